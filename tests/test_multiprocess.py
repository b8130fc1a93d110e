"""Multi-process runs as on a pod, over loopback: 2 processes × 4 fake CPU devices, gloo.

The same training as one process with 8 devices; a preemption notice on one process saves one
agreed step on every process, and the resumed run equals a one-process run; a peer
killed stops the survivor with one line, and restarting every process resumes from the newest
checkpoint; jaxlib's abort of a survivor (a frozen peer) becomes one line too.
"""
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import (MODERN, REPO, assert_trees_close, output, read_metrics, start_processes,
                     tiny_config, tiny_config_file)
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


def running(pid):
    """Whether process `pid` exists and is not a zombie (dead, not yet reaped)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_a_preempted_two_process_run_resumes_and_equals_one_process(tmp_path):
    """SIGTERM (a spot VM's preemption notice) to one process at a random step: both processes
    save the same step and exit 75; the same command resumes, and the run ends as an
    uninterrupted one-process run with 8 devices does (equal up to float summation order:
    every step's loss, the eval, the parameters and their EMA). Every modern-recipe ingredient
    is on (`helpers.MODERN`: colour jitter, lighting, RandAugment and random erasing in the
    step, repeated augmentation, Mixup/CutMix, drop path, dropout, LAMB, BCE, EMA), so the
    2 × 4 run draws what the 1 × 8 run draws."""
    steps = 6   # float summation order differs with 2 processes: the runs drift after ~6 steps
    config_file = tiny_config_file(
        tmp_path, f'**MODERN, num_train_steps={steps}, checkpoint_every_steps=100')
    args = [f'--config={config_file}']
    signal_at, victim = random.Random().randint(1, 3), random.Random().randint(0, 1)
    run = start_processes(tmp_path / 'run', *args)
    wait_for_step(run[0], signal_at)
    run[victim].send_signal(signal.SIGTERM)
    assert finish(run) == [75, 75], (signal_at, victim, output(run[victim])[-3000:])
    assert '8 cpu devices in 2 processes' in output(run[0])
    saved = set()
    for proc in run:
        assert 'Traceback' not in output(proc)
        line = last_line(proc)
        assert line.startswith('preempted: saved step ') and line.endswith(
            'run the same command again to resume'), line
        saved.add(int(line.split('saved step ')[1].split()[0]))
    (step,) = saved
    # The processes agree on the step to save at; on a loaded machine they may reach the last
    # step before they hear of the signal, and then the resumed run only evaluates.
    assert signal_at <= step <= steps and step in steps_in(tmp_path / 'run')
    assert_restorable_and_finite(tmp_path / 'run', [step])

    resumed = start_processes(tmp_path / 'run', *args)
    assert finish(resumed) == [0, 0], output(resumed[0])[-3000:]
    assert f'at step {step}' in output(resumed[0])

    one = train.train_and_evaluate(
        tiny_config(**MODERN, num_train_steps=steps, checkpoint_every_steps=100),
        tmp_path / 'one')
    two_train, one_train = read_metrics(tmp_path / 'run'), read_metrics(tmp_path / 'one')
    assert [r['step'] for r in two_train] == [r['step'] for r in one_train] == list(
        range(1, steps + 1))
    for a, b in zip(two_train, one_train):
        np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
    (two_eval,) = read_metrics(tmp_path / 'run', 'eval')
    assert two_eval['num_examples'] == one['num_examples'] == 360
    np.testing.assert_allclose(two_eval['loss'], one['loss'], rtol=1e-4)
    np.testing.assert_allclose(two_eval['ema_loss'], one['ema_loss'], rtol=1e-4)
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'run')[0],
                       checkpoint.load_checkpoint(tmp_path / 'one')[0], rtol=1e-4, atol=1e-6)


def test_a_killed_peer_stops_the_survivor_with_one_line_and_a_restart_resumes(tmp_path):
    """kill -9 of the process the scheduler started: its worker dies with it, the survivor's
    next collective fails, and it exits 69 with one line at once; restarting every process with
    the same command resumes from the newest checkpoint."""
    config_file = tiny_config_file(tmp_path, 'num_train_steps=1000')
    args = [f'--config={config_file}', '--peer_timeout_s=10']
    procs = start_processes(tmp_path / 'run', *args)
    wait_for_step(procs[0], 3)
    worker = worker_pid(procs[1])
    procs[1].kill()
    t0 = time.time()
    survivor = procs[0]
    assert survivor.wait(timeout=120) == parallel.EXIT_PEER_LOST, output(survivor)[-3000:]
    assert time.time() - t0 < 60
    out = output(survivor)
    for noise in ('Traceback', 'Check failure', 'Fatal Python error', 'Aborted', 'F11'):
        assert noise not in out, out[-3000:]
    assert [l for l in out.splitlines() if l.startswith('error:')] == [last_line(survivor)]
    assert last_line(survivor).endswith(RESUME_LINE), last_line(survivor)
    deadline = time.time() + 10
    while running(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(worker), 'the killed process left its worker running'
    saved = steps_in(tmp_path / 'run')
    assert saved and saved[-1] >= 2
    assert_restorable_and_finite(tmp_path / 'run', saved)

    restarted = start_processes(tmp_path / 'run', *args,
                                f'--config.num_train_steps={saved[-1] + 2}')   # quick
    assert finish(restarted) == [0, 0], output(restarted[0])[-3000:]
    assert f'at step {saved[-1]}' in output(restarted[0])
    steps = [r['step'] for r in read_metrics(tmp_path / 'run')]
    assert steps == list(range(1, saved[-1] + 3))


# What jaxlib 0.10 writes before it aborts a survivor (SIGABRT), as seen here: with process 1
# killed or frozen (on the coordinator, after the heartbeat timeout), and with the coordinator
# frozen (on process 1). A frozen peer is how a dead host looks on TPU and GPU, where the
# collectives wait instead of failing; the supervisor must turn this into one line.
JAXLIB_ABORTS = {
    'process 1 stopped responding': """\
E1123 19:30:43.007586   29817 coordination_service.cc:1549] [4773800109204106768] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1123 19:30:43.007930   29828 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1123 19:30:43.008088   29828 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output.
*** Check failure stack trace: ***
""",
    'process 0, which runs the coordination service, died or stopped responding': """\
F1123 19:47:59.231676    1194 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/Heartbeat
*** Check failure stack trace: ***
    @     0x7f98cbc40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
""",
}
PROGRESS = 'I1123 19:30:40.100000 140502868077440 train.py:254] step 7/1000  loss 2.3168\n'
NOT_FATAL = ('E1123 19:30:41.000000   29817 gloo_collectives.cc:10] a transient error\n'
             'details of it\n')


def supervised(tmp_path, stderr, then):
    """`parallel.supervise` of a stand-in child that writes `stderr` and then runs `then`."""
    child = tmp_path / 'child.py'
    child.write_text(f'import os, sys\nsys.stderr.write({stderr!r})\nsys.stderr.flush()\n{then}\n')
    code = ('import sys; from resnext_jax import parallel; '
            f'sys.exit(parallel.supervise([sys.executable, {str(child)!r}]))')
    return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize('what', sorted(JAXLIB_ABORTS))
def test_the_supervisor_turns_jaxlibs_abort_into_one_line(tmp_path, what):
    out = supervised(tmp_path, PROGRESS + NOT_FATAL + PROGRESS + JAXLIB_ABORTS[what],
                     'os.abort()')
    assert out.returncode == parallel.EXIT_PEER_LOST
    assert out.stderr.splitlines() == [
        PROGRESS.strip(), *NOT_FATAL.splitlines(), PROGRESS.strip(),
        f'error: {what}, so this process stopped; {RESUME_LINE}']


def test_the_supervisor_passes_other_endings_through(tmp_path):
    out = supervised(tmp_path, PROGRESS + NOT_FATAL, 'sys.exit(3)')
    assert (out.returncode, out.stderr) == (3, PROGRESS + NOT_FATAL)
    out = supervised(tmp_path, PROGRESS + NOT_FATAL, 'os.abort()')   # a crash of its own
    assert (out.returncode, out.stderr) == (128 + signal.SIGABRT, PROGRESS + NOT_FATAL)
