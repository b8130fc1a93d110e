"""Train and evaluate a ResNeXt: python train.py --config=configs/NAME.py --workdir=DIR.

    python train.py --workdir=/tmp/quickstart                  # configs/quickstart.py, offline
    python train.py --config=configs/paper.py:table7_cifar10_resnext29_8x64d --workdir=runs/c10 \\
        --config.batch_size=256 --config.dtype=bfloat16
    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Runs resume from the newest checkpoint in --workdir. On TPU pods, SLURM and Open MPI the
processes find each other by themselves; elsewhere pass the three multi-process flags.
"""
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    'config', os.path.join(HERE, 'configs', 'quickstart.py'), 'Training recipe (a configs/ file).')
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard files.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


class _OwnInfoOnly(pylogging.Filter):
    """Keeps the console to our progress lines: libraries' INFO chatter (orbax, JAX) is dropped,
    their warnings and errors are not."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or 'resnext_jax' in record.pathname or (
            record.pathname == __file__)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    from resnext_jax import parallel, train  # after flags: JAX starts only now
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info('config:\n%s', FLAGS.config)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    from resnext_jax import runtime
    runtime.prepare_process()
    app.run(main)
