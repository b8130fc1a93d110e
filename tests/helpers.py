"""What several test files share: the tiny recipe, reading a run's metrics, comparing trees, and
running train.py as a user does (one process, or several over loopback)."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'stage_sizes': (1, 1, 1), 'stem_width': 8, 'base_features': 16}


def tiny_config(**overrides):
    """The quick-start recipe shrunk: 8×8 digits, ResNeXt 2×4d with one block per stage."""
    c = quickstart.get_config()
    c.model, c.model_options = 'resnext29_2x4d', dict(TINY)
    c.image_size, c.batch_size, c.num_train_steps = 8, 16, 6
    c.augment, c.schedule, c.warmup_epochs = 'cifar', 'step', 0.0
    c.log_every_steps, c.checkpoint_every_steps, c.eval_every_epochs = 1, 2, 100.0
    c.update(overrides)
    return c


def tiny_config_file(directory, overrides=''):
    """A --config file whose get_config() is `tiny_config(OVERRIDES)`."""
    path = directory / 'tiny.py'
    path.write_text(f'import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
                    'from helpers import MODERN, tiny_config\n'
                    f'def get_config():\n    return tiny_config({overrides})\n')
    return path


class Preempted(Exception):
    """Raised from a patched input pipeline to stop a run in the middle."""


def stop_input_at(monkeypatch, batch_index):
    """Patches `data.train_batches` to raise `Preempted` instead of yielding batch
    `batch_index` (0-based): steps 1 … batch_index run. Returns the real function."""
    from resnext_jax import data
    real = data.train_batches

    def stopping(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == batch_index:
                raise Preempted
            yield batch

    monkeypatch.setattr(data, 'train_batches', stopping)
    return real


def read_metrics(workdir, split='train'):
    """metrics.jsonl records of one split, without the wall-clock speed."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != 'images_per_sec'}
            for r in records if r['split'] == split]


def assert_trees_close(a, b, rtol=0.0, atol=0.0):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def run_cli(*args, **env):
    """`python train.py ARGS` to completion."""
    return subprocess.run(
        [sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, timeout=300)


def start_cli(workdir, *args):
    """`python train.py --workdir=WORKDIR ARGS`, running."""
    return subprocess.Popen(
        [sys.executable, 'train.py', f'--workdir={workdir}', *args], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_processes(workdir, *args, n=2, log_dir=None):
    """A run of `n` processes over loopback, 8 // n fake devices each, as a multi-host run is
    started: the same command on every host but --process_id. Output goes to
    LOG_DIR/process_I.log (default: beside the workdir)."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={8 // n} '
                        '--xla_backend_optimization_level=0'}
    address = f'127.0.0.1:{free_port()}'
    log_dir = log_dir or workdir.parent
    procs = []
    for i in range(n):
        log = open(log_dir / f'{workdir.name}_process_{i}.log', 'w+')
        procs.append(subprocess.Popen(
            [sys.executable, 'train.py', f'--workdir={workdir}', *args,
             f'--coordinator_address={address}', f'--num_processes={n}', f'--process_id={i}'],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log = log
    return procs


def output(proc):
    """Everything a process started by `start_processes` printed so far."""
    proc.log.flush()
    with open(proc.log.name) as f:
        return f.read()


# Every recipe ingredient at once (configs/modern.py's fields and the paper's colour noise),
# sized for tiny_config: 89 steps per epoch, so the warm-up (and the EMA's copying) lasts 2
# steps. The per-pixel ones run in the step (`augment_on='device'`, the default).
MODERN = dict(optimizer='lamb', learning_rate=5e-3, weight_decay=0.02, decay_bn_and_bias=False,
              clip_grad_norm=1.0, loss='bce', bce_target_thresh=0.2, label_smoothing=0.1,
              drop_path_rate=0.1, dropout=0.1, mixup_alpha=0.2, cutmix_alpha=1.0,
              ema_decay=0.9, ema_every_steps=2, warmup_epochs=2 / 89, schedule='cosine',
              repeated_augments=2, auto_augment='rand-m9-n2-mstd0.5', random_erase=0.25,
              color_jitter=0.4, pca_lighting=0.1)
