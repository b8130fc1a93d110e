"""Train and evaluate a ResNeXt: python train.py --config=configs/NAME.py --workdir=DIR.

    python train.py --workdir=/tmp/quickstart                  # configs/quickstart.py, offline
    python train.py --config=configs/paper.py:table7_cifar10_resnext29_8x64d --workdir=runs/c10 \\
        --config.batch_size=256 --config.dtype=bfloat16
    python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Runs resume from the newest checkpoint in --workdir. On TPU pods, SLURM and Open MPI the
processes find each other by themselves; elsewhere pass the three multi-process flags.
Exit codes: 0 done, 1 bad input (one `error:` line), 75 preempted (saved; run the same command
again), 130 interrupted by Ctrl-C (saved at the next step; a second Ctrl-C stops at once), 69
another process of a multi-process run died (restart all of them; they resume).
"""
import importlib.util
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnext_jax import cli

HERE = os.path.dirname(os.path.abspath(__file__))
HINT = 'python train.py --helpfull describes every flag'
try:   # with no --config on the command line, the default recipe and its overrides load now
    config_flags.DEFINE_config_file(
        'config', os.path.join(HERE, 'configs', 'quickstart.py'),
        'Training recipe (a configs/ file).')
except Exception as e:   # noqa: BLE001 (a config file may raise anything)
    sys.exit(cli.flag_error(e, sys.argv, HINT))
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard files.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
flags.DEFINE_integer('peer_timeout_s', 60, 'Multi-process runs: a process silent this many '
                     'seconds is dead, and the others stop (exit code 69).', lower_bound=1)
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: saved at a preemption notice; re-run to resume
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report a Ctrl-C


class _OwnInfoOnly(pylogging.Filter):
    """Keeps the console to our progress lines: libraries' INFO chatter (orbax, JAX) is dropped,
    their warnings and errors are not. Ours: records from this file or the package's files."""
    PACKAGE = os.path.dirname(importlib.util.find_spec('resnext_jax').origin) + os.sep

    def filter(self, record):
        return (record.levelno >= pylogging.WARNING or record.pathname == __file__
                or record.pathname.startswith(self.PACKAGE))


def follow_image_size(config):
    """`--config.image_size=N` alone (no eval_image_size or eval_resize on the command line):
    the recipe's evaluation sizes scaled by the same factor, so that a smaller training crop
    is evaluated at the recipe's ratio (torchvision V2: 176 → 224 from 232; at 64: 81 from 84).
    The recipe's own sizes come from its file, read again."""
    overrides = config_flags.get_override_values(FLAGS['config'])
    if 'image_size' not in overrides or {'eval_image_size', 'eval_resize'} & set(overrides):
        return config
    path, _, row = config_flags.get_config_filename(FLAGS['config']).partition(':')
    spec = importlib.util.spec_from_file_location('recipe', path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    original = recipe.get_config(row) if row else recipe.get_config()
    if not original.image_size:   # 0: published weights' sizes (configs/finetune.py)
        return config
    scale = config.image_size / original.image_size
    for field in ('eval_image_size', 'eval_resize'):
        if original.get(field):
            setattr(config, field, max(1, round(original[field] * scale)))
    return config


def parse_flags(argv):
    """absl's flag parsing with each bad flag one `error:` line (`resnext_jax.cli`)."""
    return cli.parse_flags(argv, HINT, info=True)


def main(argv):
    del argv   # parse_flags refused positional arguments
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    # The imports below take seconds, a minute on a first run after installing (Python
    # compiles JAX's, Flax's and TensorFlow's files): say so before them.
    logging.info('starting: loading JAX, Flax and TensorFlow')
    from resnext_jax import parallel
    if parallel.multi_process(FLAGS.coordinator_address) and not parallel.is_worker():
        # The run itself goes in a child, so that a dead peer ends it with one line.
        sys.exit(parallel.supervise([sys.executable] + sys.orig_argv[1:]))
    from resnext_jax import checkpoint, pretrained, train, validate  # after flags: JAX starts
    try:
        # What init_from's published weights decide (configs/finetune.py: network, sizes).
        config = pretrained.configure(follow_image_size(FLAGS.config))
        validate.check_config(config)
        with train.tidy_failed_start(FLAGS.workdir):
            validate.check_workdir(FLAGS.workdir)
            parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                FLAGS.process_id, FLAGS.peer_timeout_s)
            train.train_and_evaluate(config, FLAGS.workdir)
    except checkpoint.Preempted as e:  # saved: the scheduler may restart the same command
        print(e, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED if isinstance(e, checkpoint.Interrupted) else EXIT_PREEMPTED)
    except KeyboardInterrupt:   # before the training loop, or a second Ctrl-C in it
        print(f'interrupted: stopped without saving; {FLAGS.workdir} keeps its newest complete '
              'checkpoint: run the same command again to resume from it', file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (ValueError, OSError, FloatingPointError) as e:   # OSError: FileNotFoundError, …
        sys.exit(f'error: {" ".join(str(e).split())}')
    except RuntimeError as e:   # JaxRuntimeError too: a collective that lost its peer
        if parallel.is_peer_lost(e):
            parallel.peer_lost_exit(e)
        raise


if __name__ == '__main__':
    from resnext_jax import runtime
    runtime.prepare_process()
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:   # while the libraries load, before main's own handling
        sys.exit(EXIT_INTERRUPTED)
