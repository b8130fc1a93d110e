"""Runs that survive a pod: no non-finite checkpoint, preemption is a save, damaged checkpoints
are passed over, mismatched ones refused, one run per workdir. Every test ends by checking
that what was restorable before still is, and is finite."""
import errno
import gc
import logging
import os
import random
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from resnext_jax import checkpoint, train
from helpers import (assert_trees_close, read_metrics, start_cli, tiny_config,
                     tiny_config_file)

# Leaks (unclosed pipes and files) and errors in orbax's background threads and event loops fail
# the test that has them, instead of passing with a warning.
pytestmark = pytest.mark.filterwarnings('error::ResourceWarning', 'error::RuntimeWarning',
                                        'error::pytest.PytestUnraisableExceptionWarning',
                                        'error::pytest.PytestUnhandledThreadExceptionWarning')


def steps_in(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints'))
                  if p.isdigit())


def assert_restorable_and_finite(workdir, steps):
    for step in steps:
        state, meta = checkpoint.load_checkpoint(workdir, step)
        assert meta['step'] == step
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state))


# ------------------------------------------------------------------------------ divergence

def test_a_diverged_state_is_never_saved(tmp_path):
    """The loss is not looked at before the save (log_every_steps=100): the state check alone
    must stop the save of the step-6 state, whose weights are infinite after step 5."""
    train.train_and_evaluate(tiny_config(num_train_steps=4), tmp_path)
    assert steps_in(tmp_path) == [2, 4]
    with pytest.raises(FloatingPointError, match=(
            r'^the training state is not finite at step 6 \(the run diverged\) and is not '
            r'saved: the newest finite checkpoint is step 4 in .*checkpoints; lower '
            r'--config.learning_rate and re-run to resume from it$')):
        train.train_and_evaluate(tiny_config(num_train_steps=8, learning_rate=1e30,
                                             log_every_steps=100), tmp_path)
    assert steps_in(tmp_path) == [2, 4]
    assert_restorable_and_finite(tmp_path, [2, 4])

    with pytest.raises(FloatingPointError, match='no checkpoint was saved in .*; lower '
                                                 '--config.learning_rate and start again'):
        train.train_and_evaluate(tiny_config(learning_rate=1e30, log_every_steps=100),
                                 tmp_path / 'fresh')
    assert not (tmp_path / 'fresh').exists()   # nothing saved: the failed start left nothing


# ------------------------------------------------------------------------------ damaged checkpoints

def truncate_data_files(step_dir):
    for root, _, names in os.walk(step_dir / 'state'):
        if os.path.basename(root) == 'd':
            for name in names:
                path = os.path.join(root, name)
                with open(path, 'r+b') as f:
                    f.truncate(os.path.getsize(path) // 2)


def remove(*parts):
    def damage(step_dir):
        os.remove(os.path.join(step_dir, *parts))
    return damage


@pytest.mark.parametrize('damage', [remove('state', 'manifest.ocdbt'),
                                    remove('state', '_METADATA')],
                         ids=['no-manifest', 'no-state-metadata'])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, damage,
                                                                           caplog):
    config = tiny_config(num_train_steps=6, eval_every_epochs=100.0)
    full = train.train_and_evaluate(config, tmp_path / 'full')
    train.train_and_evaluate(tiny_config(num_train_steps=4), tmp_path / 'run')
    damage(tmp_path / 'run' / 'checkpoints' / '4')
    with caplog.at_level(logging.INFO):
        resumed = train.train_and_evaluate(config, tmp_path / 'run')
    assert f'checkpoint {tmp_path / "run" / "checkpoints"}/4 is unreadable (' in caplog.text
    assert resumed == full
    assert read_metrics(tmp_path / 'run') == read_metrics(tmp_path / 'full')
    assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '4.unreadable')   # kept, not deleted
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'run')[0],
                       checkpoint.load_checkpoint(tmp_path / 'full')[0])


def test_truncated_data_files_are_found_by_a_restarted_run(tmp_path):
    """A fresh process (as after a crash): in the process that wrote the checkpoint, TensorStore
    may serve the data from its cache."""
    config_file = tiny_config_file(tmp_path, 'num_train_steps=6')
    train.train_and_evaluate(tiny_config(num_train_steps=4), tmp_path / 'run')
    truncate_data_files(tmp_path / 'run' / 'checkpoints' / '4')
    proc = start_cli(tmp_path / 'run', f'--config={config_file}')
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert f'checkpoint {tmp_path / "run" / "checkpoints"}/4 is unreadable (' in stderr
    assert 'resumed from' in stderr and 'at step 2' in stderr
    assert steps_in(tmp_path / 'run') == [4, 6]
    assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '4.unreadable')
    assert_restorable_and_finite(tmp_path / 'run', [4, 6])


def test_no_readable_checkpoint_is_one_error(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=2), tmp_path)
    remove('state', 'manifest.ocdbt')(tmp_path / 'checkpoints' / '2')
    with pytest.raises(ValueError, match=r'^no readable checkpoint in .*checkpoints: steps 2 are '
                                         r'damaged \(moved aside as <step>.unreadable\)'):
        train.train_and_evaluate(tiny_config(num_train_steps=4), tmp_path)
    assert os.listdir(tmp_path / 'checkpoints') == ['2.unreadable']


# ------------------------------------------------------------------------------ refusals

def test_a_checkpoint_of_other_model_options_is_refused_not_overwritten(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=2), tmp_path)
    other = tiny_config(num_train_steps=4)
    other.model_options['stem_width'] = 16
    with pytest.raises(ValueError, match=(
            r"^the checkpoint at step 2 in .* has model_options=.*'stem_width': 8.* but the "
            r"config says .*'stem_width': 16.*; use a new --workdir or the same setting$")):
        train.train_and_evaluate(other, tmp_path)
    assert steps_in(tmp_path) == [2]
    assert_restorable_and_finite(tmp_path, [2])


def test_two_runs_cannot_share_a_workdir(tmp_path):
    with checkpoint.WorkdirLock(tmp_path):
        with pytest.raises(ValueError, match=rf'^another run is using {tmp_path} \(pid '
                                             rf'{os.getpid()} on .* holds .*run.lock\)'):
            train.train_and_evaluate(tiny_config(num_train_steps=2), tmp_path)
    assert not os.path.exists(tmp_path / 'metrics.jsonl')
    train.train_and_evaluate(tiny_config(num_train_steps=2), tmp_path)   # released
    assert steps_in(tmp_path) == [2]


def test_a_failed_save_is_one_line_and_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    train.train_and_evaluate(tiny_config(num_train_steps=2), tmp_path)
    real_save = ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full)
    with pytest.raises(OSError, match=(
            r'^could not write the checkpoint of step 4 to .*checkpoints \(OSError: \[Errno 28\] '
            r'No space left on device\); the older checkpoints there are intact')):
        train.train_and_evaluate(tiny_config(num_train_steps=6), tmp_path)
    assert steps_in(tmp_path) == [2]
    assert_restorable_and_finite(tmp_path, [2])


def disk_full_at(step):
    """A replacement for orbax's `async_path.write_text` under which the files it writes into the
    checkpoint of `step` fail with ENOSPC, as on a full disk: the save fails in orbax's
    background thread, while TensorStore's writes of the same save are in flight."""
    write_text = async_path.write_text

    async def full(path, text):
        if f'/{step}.orbax-checkpoint-tmp/' in os.fspath(path):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return await write_text(path, text)
    return full


FULL_DISK_ERROR = (r'could not write the checkpoint of step 4 to .*checkpoints \(OSError: '
                   r'\[Errno 28\] No space left on device\); the older checkpoints there are '
                   r'intact: fix the cause \(e.g. free disk space\) and re-run to resume')


def test_a_disk_that_fills_in_a_background_save_is_one_error_and_nothing_left_running(
        tmp_path, monkeypatch, capfd, caplog):
    """The error names the step whose save failed, and orbax's event loops end only after the
    save's other writes: none is left to fail later on a closed loop."""
    monkeypatch.setattr(async_path, 'write_text', disk_full_at(4))
    with pytest.raises(OSError, match=f'^{FULL_DISK_ERROR}$'):
        train.train_and_evaluate(tiny_config(num_train_steps=6), tmp_path)
    time.sleep(1)   # for any write still in flight to end
    gc.collect()    # a task whose exception nobody retrieved is reported when it is collected
    stderr = capfd.readouterr().err
    assert 'Event loop is closed' not in stderr and 'Traceback' not in stderr, stderr[-3000:]
    for text in ('Event loop is closed', 'never retrieved', 'destroyed but it is pending'):
        assert text not in caplog.text
    assert steps_in(tmp_path) == [2]

    monkeypatch.undo()   # space again: the run resumes from step 2
    train.train_and_evaluate(tiny_config(num_train_steps=6), tmp_path)
    assert steps_in(tmp_path) == [4, 6]
    assert_restorable_and_finite(tmp_path, [4, 6])


def test_cli_a_disk_that_fills_ends_in_the_one_error_line_without_tracebacks(tmp_path):
    config_file = tmp_path / 'full_disk.py'
    config_file.write_text(
        f'import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
        'from orbax.checkpoint._src.path import async_path\n'
        'from helpers import tiny_config\n'
        'from test_checkpoint import disk_full_at\n'
        'async_path.write_text = disk_full_at(4)\n'
        'def get_config():\n    return tiny_config(num_train_steps=6)\n')
    proc = start_cli(tmp_path / 'run', f'--config={config_file}')
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr, stderr[-3000:]
    assert re.fullmatch(f'error: {FULL_DISK_ERROR}', stderr.strip().splitlines()[-1])
    assert steps_in(tmp_path / 'run') == [2]
    assert_restorable_and_finite(tmp_path / 'run', [2])


# ------------------------------------------------------------------------------ preemption

def test_a_second_ctrl_c_stops_at_once_and_leaves_only_whole_checkpoints(tmp_path):
    """Ctrl-C twice in quick succession in the middle of training: the run stops without a
    traceback (exit 130, one line), every checkpoint left is readable, and the same command
    resumes and finishes."""
    config_file = tiny_config_file(tmp_path, 'num_train_steps=400, checkpoint_every_steps=3')
    proc = start_cli(tmp_path / 'run', f'--config={config_file}')
    metrics = tmp_path / 'run' / 'metrics.jsonl'
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith('interrupted: ')
    assert_restorable_and_finite(tmp_path / 'run', steps_in(tmp_path / 'run'))
    resumed = start_cli(tmp_path / 'run', f'--config={config_file}', '--config.num_train_steps=12')
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]


@pytest.mark.parametrize('stop, code, word', [(signal.SIGTERM, 75, 'preempted'),
                                              (signal.SIGINT, 130, 'interrupted')],
                         ids=['SIGTERM', 'SIGINT'])
def test_sigterm_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, stop, code, word):
    """A preemption notice (SIGTERM) or a Ctrl-C (SIGINT) at a random step: the run saves the
    step it is at, says so in one line, exits 75 or 130, and the same command resumes it to
    the end of an uninterrupted run."""
    config_file = tiny_config_file(
        tmp_path, 'num_train_steps=16, checkpoint_every_steps=100, eval_every_epochs=8 / 89')
    args = [f'--config={config_file}']
    uninterrupted = start_cli(tmp_path / 'full', *args)
    _, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr[-2000:]

    signal_after = random.Random().randint(3, 12)
    proc = start_cli(tmp_path / 'run', *args)
    metrics = tmp_path / 'run' / 'metrics.jsonl'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= signal_after:
            proc.send_signal(stop)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, (signal_after, stderr[-2000:])
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f'{word}: saved step ') and last.endswith(
        'run the same command again to resume'), last
    saved = int(last.split('saved step ')[1].split()[0])
    assert steps_in(tmp_path / 'run') == [saved] and signal_after <= saved < 16
    assert_restorable_and_finite(tmp_path / 'run', [saved])

    resumed = start_cli(tmp_path / 'run', *args)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    for split in ('train', 'eval'):
        assert read_metrics(tmp_path / 'run', split) == read_metrics(tmp_path / 'full', split)
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'run')[0],
                       checkpoint.load_checkpoint(tmp_path / 'full')[0])
    shutil.rmtree(tmp_path / 'full')
