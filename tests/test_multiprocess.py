"""Multi-process runs as on a pod, over loopback: 2 processes × 4 fake CPU devices, gloo.

The same training as one process with 8 devices; a preemption notice on one process saves one
agreed step on every process, and the resumed run equals an uninterrupted one exactly; a peer
killed or hung stops the survivor within the peer timeout with one line, and restarting every
process resumes from the newest checkpoint.
"""
import os
import random
import signal
import time

import numpy as np
import pytest

from helpers import (assert_trees_close, output, read_metrics, start_processes, tiny_config,
                     tiny_config_file)
from resnext_jax import checkpoint, parallel, train
from test_checkpoint import assert_restorable_and_finite, steps_in

RESUME_LINE = 'restart every process with the same command to resume from the newest checkpoint'


def wait_for_step(proc, step, timeout=300):
    deadline = time.time() + timeout
    while f'step {step}/' not in output(proc):
        assert proc.poll() is None and time.time() < deadline, output(proc)[-3000:]
        time.sleep(0.05)


def finish(procs, timeout=300):
    return [p.wait(timeout=timeout) for p in procs]


def last_line(proc):
    return output(proc).strip().splitlines()[-1]


def worker_pid(proc):
    """The child that train.py's supervisor runs the process's share of the run in."""
    with open(f'/proc/{proc.pid}/task/{proc.pid}/children') as f:
        return int(f.read().split()[0])


def test_a_preempted_two_process_run_resumes_and_equals_one_process(tmp_path):
    """SIGTERM (a spot VM's preemption notice) to one process at a random step: both processes
    save the same step and exit 75; the same command resumes, and the run ends as an
    uninterrupted one-process run with 8 devices does (equal up to float summation order:
    every step's loss, the eval, the parameters)."""
    steps = 6   # float summation order differs with 2 processes: the runs drift after ~6 steps
    config_file = tiny_config_file(tmp_path,
                                   f'num_train_steps={steps}, checkpoint_every_steps=100')
    args = [f'--config={config_file}']
    signal_at, victim = random.Random().randint(1, 3), random.Random().randint(0, 1)
    run = start_processes(tmp_path / 'run', *args)
    wait_for_step(run[0], signal_at)
    run[victim].send_signal(signal.SIGTERM)
    assert finish(run) == [75, 75], (signal_at, victim, output(run[victim])[-3000:])
    assert '8 devices in 2 processes' in output(run[0])
    saved = set()
    for proc in run:
        assert 'Traceback' not in output(proc)
        line = last_line(proc)
        assert line.startswith('preempted: saved step ') and line.endswith(
            'run the same command again to resume'), line
        saved.add(int(line.split('saved step ')[1].split()[0]))
    (step,) = saved
    assert signal_at <= step < steps and step in steps_in(tmp_path / 'run')
    assert_restorable_and_finite(tmp_path / 'run', [step])

    resumed = start_processes(tmp_path / 'run', *args)
    assert finish(resumed) == [0, 0], output(resumed[0])[-3000:]
    assert f'at step {step}' in output(resumed[0])

    one = train.train_and_evaluate(tiny_config(num_train_steps=steps, checkpoint_every_steps=100),
                                   tmp_path / 'one')
    two_train, one_train = read_metrics(tmp_path / 'run'), read_metrics(tmp_path / 'one')
    assert [r['step'] for r in two_train] == [r['step'] for r in one_train] == list(
        range(1, steps + 1))
    for a, b in zip(two_train, one_train):
        np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
    (two_eval,) = read_metrics(tmp_path / 'run', 'eval')
    assert two_eval['num_examples'] == one['num_examples'] == 360
    np.testing.assert_allclose(two_eval['loss'], one['loss'], rtol=1e-4)
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'run')[0],
                       checkpoint.load_checkpoint(tmp_path / 'one')[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('victim, how', [(1, 'killed'), (0, 'hung')])
def test_a_dead_peer_stops_the_survivor_with_one_line_and_a_restart_resumes(tmp_path, victim,
                                                                            how):
    """'killed': kill -9 of the process the scheduler started (its child dies with it; the
    survivor's next collective fails). 'hung': the coordinator's worker stopped (SIGSTOP), as a
    frozen host: its collectives never answer, and jaxlib's heartbeat check gives up on it after
    --peer_timeout_s and aborts the survivor, which the supervisor turns into one line."""
    config_file = tiny_config_file(tmp_path, 'num_train_steps=1000')
    args = [f'--config={config_file}', '--peer_timeout_s=10']
    procs = start_processes(tmp_path / 'run', *args)
    wait_for_step(procs[0], 3)
    worker = worker_pid(procs[victim])
    if how == 'killed':
        procs[victim].kill()
    else:
        os.kill(worker, signal.SIGSTOP)
    t0 = time.time()
    survivor = procs[1 - victim]
    assert survivor.wait(timeout=120) == parallel.EXIT_PEER_LOST, output(survivor)[-3000:]
    assert time.time() - t0 < 60
    out = output(survivor)
    for noise in ('Traceback', 'Check failure', 'Fatal Python error', 'Aborted', 'F11'):
        assert noise not in out, out[-3000:]
    assert [l for l in out.splitlines() if l.startswith('error:')] == [last_line(survivor)]
    assert last_line(survivor).endswith(RESUME_LINE), last_line(survivor)
    if how == 'hung':
        assert last_line(survivor).startswith(
            'error: process 0, which runs the coordination service, died or stopped responding')
        os.kill(worker, signal.SIGKILL)
        procs[victim].wait(timeout=60)
    else:
        time.sleep(1)
        assert not os.path.exists(f'/proc/{worker}'), 'the killed process left its worker'
    saved = steps_in(tmp_path / 'run')
    assert saved and saved[-1] >= 2
    assert_restorable_and_finite(tmp_path / 'run', saved)
    if how == 'killed':
        return

    # Every process restarted with the same command (fewer steps, to be quick) resumes.
    restarted = start_processes(tmp_path / 'run', *args,
                                f'--config.num_train_steps={saved[-1] + 2}')
    assert finish(restarted) == [0, 0], output(restarted[0])[-3000:]
    assert f'at step {saved[-1]}' in output(restarted[0])
    steps = [r['step'] for r in read_metrics(tmp_path / 'run')]
    assert steps == list(range(1, saved[-1] + 3))
