"""The launchers clusters run, for real: a one-node Slurm (Debian's slurm-wlm and munge: munged,
slurmctld and slurmd started here, `proctrack/linuxproc`, `task/none`) and Open MPI's mpirun
start train.py, which finds its peers through JAX's own detection; and which accelerators each
process drives under each GPU layout (`parallel.local_device_ids`), read from the launchers'
variables. `.ci/run` installs the packages; the real-launcher tests skip only where they are
not installed."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, read_metrics, tiny_config, tiny_config_file
from resnext_jax import parallel, train

ENV = {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
       'XLA_FLAGS': '--xla_force_host_platform_device_count=4 '
                    '--xla_backend_optimization_level=0'}   # 2 processes × 4 = 8 devices


# ------------------------------------------------------------------------------ GPU layouts

# (launch, what the launcher sets, JAX's own choice, ours): 8 GPUs a node.
LAYOUTS = [
    ('srun --ntasks-per-node=8 --gpus-per-node=8 (one task per GPU)',
     dict(SLURM_NTASKS='16', SLURM_LOCALID='3', SLURM_STEP_TASKS_PER_NODE='8(x2)',
          SLURM_NODEID='1', SLURM_GPUS_ON_NODE='8'), [3], [3]),
    ('srun --ntasks-per-node=1 --gpus-per-node=8 (one task per node)',
     dict(SLURM_NTASKS='4', SLURM_LOCALID='0', SLURM_STEP_TASKS_PER_NODE='1(x4)',
          SLURM_NODEID='2', SLURM_GPUS_ON_NODE='8',
          CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'), [0], list(range(8))),
    ('srun --ntasks-per-node=8 --gpus-per-task=1 (Slurm binds one GPU a task)',
     dict(SLURM_NTASKS='16', SLURM_LOCALID='5', SLURM_STEP_TASKS_PER_NODE='8(x2)',
          SLURM_GPUS_PER_TASK='1', CUDA_VISIBLE_DEVICES='5'), [5], [0]),
    ('srun --ntasks-per-node=2 --gpus-per-node=8 (two tasks of four GPUs)',
     dict(SLURM_NTASKS='4', SLURM_LOCALID='1', SLURM_STEP_TASKS_PER_NODE='2(x2)',
          SLURM_GPUS_ON_NODE='8'), [1], [4, 5, 6, 7]),
    ('mpirun -np 16 --npernode 8',
     dict(OMPI_COMM_WORLD_SIZE='16', OMPI_COMM_WORLD_LOCAL_RANK='6',
          OMPI_COMM_WORLD_LOCAL_SIZE='8'), [6], [6]),
    ('mpirun -np 4 --npernode 1',
     dict(OMPI_COMM_WORLD_SIZE='4', OMPI_COMM_WORLD_LOCAL_RANK='0',
          OMPI_COMM_WORLD_LOCAL_SIZE='1'), [0], list(range(8))),
]


@pytest.mark.parametrize('launch,env,jax_default,ours', LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_each_process_drives_the_gpus_its_layout_gives_it(launch, env, jax_default, ours):
    """JAX's auto-detection gives each process [local rank] (jax/_src/clusters/cluster.py);
    ours is right for one task per GPU, one per node, and GPUs that Slurm bound per task."""
    assert [int(env.get('SLURM_LOCALID', env.get('OMPI_COMM_WORLD_LOCAL_RANK')))] == jax_default
    ids, why = parallel.local_device_ids(env, gpus_on_node=8)
    assert ids == ours, why


def test_layouts_that_do_not_divide_or_that_the_user_set():
    env = dict(SLURM_NTASKS='3', SLURM_LOCALID='0', SLURM_STEP_TASKS_PER_NODE='3',
               SLURM_GPUS_ON_NODE='8')
    with pytest.raises(ValueError, match=r'^3 processes share the 8 GPUs .*do not divide evenly'):
        parallel.local_device_ids(env)
    assert parallel.local_device_ids({**env, 'JAX_LOCAL_DEVICE_IDS': '0,1'})[0] is None
    assert parallel.local_device_ids({**env, 'SLURM_GPUS_ON_NODE': '0'}, gpus_on_node=0)[0] is None
    assert parallel.local_device_ids({'SLURM_NTASKS': '1', 'SLURM_LOCALID': '0'})[0] is None
    # heterogeneous nodes: '2(x3),1' is two tasks on nodes 0-2 and one on node 3
    ids, _ = parallel.local_device_ids(dict(
        SLURM_NTASKS='7', SLURM_LOCALID='0', SLURM_STEP_TASKS_PER_NODE='2(x3),1',
        SLURM_NODEID='3'), gpus_on_node=8)
    assert ids == list(range(8))


def test_launchers_jax_does_not_detect_are_named():
    for env, what in ((dict(WORLD_SIZE='4', RANK='0', LOCAL_RANK='0'), 'torchrun'),
                      (dict(PMIX_SIZE='2', PMIX_RANK='0'), 'PMIx')):
        with pytest.raises(ValueError, match=what + r'.* --num_processes=\d --process_id=\$'):
            parallel.check_launcher(env=env)
    parallel.check_launcher(env=dict(WORLD_SIZE='4', RANK='0', SLURM_NTASKS='4',
                                     SLURM_LOCALID='0'))   # srun: JAX detects it
    parallel.check_launcher('10.0.0.1:1234', env=dict(PMI_SIZE='2', PMI_RANK='1'))   # flags


def test_a_launcher_jax_does_not_detect_is_one_line(tmp_path):
    env, what = dict(PMI_SIZE='2', PMI_RANK='1'), 'MPICH / Intel MPI'
    r = subprocess.run([sys.executable, 'train.py', f'--workdir={tmp_path / "run"}',
                        f'--config={tiny_config_file(tmp_path)}'], cwd=REPO, text=True,
                       capture_output=True, env={**os.environ, **ENV, **env}, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    (line,) = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert line == r.stderr.strip().splitlines()[-1] and what in line
    assert '--coordinator_address=HOST0:PORT --num_processes=' in line
    assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------ real Slurm

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd on this machine, one node with every core; the daemons
    stop at the end. The environment to run srun, scancel and squeue with."""
    needed = ('munged', 'slurmctld', 'slurmd', 'srun', 'scancel', 'squeue')
    missing = [tool for tool in needed if not shutil.which(tool)]
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed (apt-get install slurm-wlm munge; '
                    '.ci/run does)')
    d = tmp_path_factory.mktemp('slurm')
    (d / 'state').mkdir()
    (d / 'spool').mkdir()
    (d / 'munge.key').write_bytes(os.urandom(1024))
    os.chmod(d / 'munge.key', 0o600)
    host = socket.gethostname().split('.')[0]
    (d / 'slurm.conf').write_text(f'''ClusterName=resnextjax
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=60
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
''')
    env = {**os.environ, **ENV, 'SLURM_CONF': str(d / 'slurm.conf')}
    t0 = time.time()
    subprocess.run(['munged', '--force', f'--key-file={d}/munge.key', f'--socket={d}/munge.sock',
                    f'--pid-file={d}/munged.pid', f'--log-file={d}/munged.log',
                    f'--seed-file={d}/munged.seed'], check=True)
    subprocess.run(['slurmctld', '-f', str(d / 'slurm.conf')], check=True, env=env)
    subprocess.run(['slurmd', '-f', str(d / 'slurm.conf'), '-N', host], check=True, env=env)
    try:
        deadline = time.time() + 60
        while subprocess.run(['sinfo', '-h', '-o', '%t'], env=env, text=True,
                             capture_output=True).stdout.strip() != 'idle':   # not 'idle*'
            assert time.time() < deadline, (d / 'slurmctld.log').read_text()[-2000:]
            time.sleep(0.2)
        print(f'munged, slurmctld and slurmd up in {time.time() - t0:.2f} s')
        yield env
    finally:
        for pid_file in ('slurmd.pid', 'slurmctld.pid', 'munged.pid'):
            try:
                os.kill(int((d / pid_file).read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def train_args(tmp_path, steps, workdir):
    config = tiny_config_file(tmp_path, f'num_train_steps={steps}, checkpoint_every_steps=1000')
    return ['python', 'train.py', f'--config={config}', f'--workdir={workdir}']


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The same 4 steps as one process over 8 devices: (workdir, final evaluation)."""
    workdir = tmp_path_factory.mktemp('one') / 'run'
    return workdir, train.train_and_evaluate(
        tiny_config(num_train_steps=4, checkpoint_every_steps=1000), workdir)


def assert_equals_one_process(one_process, run, steps=4):
    """The run's training losses and evaluation equal a one-process run over 8 devices (up to
    float summation order)."""
    reference, one = one_process
    ours, theirs = read_metrics(run), read_metrics(reference)
    assert [r['step'] for r in ours] == [r['step'] for r in theirs] == list(range(1, steps + 1))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
    (evaluated,) = read_metrics(run, 'eval')
    np.testing.assert_allclose(evaluated['loss'], one['loss'], rtol=1e-4)


def test_srun_two_tasks_train_as_one_process_does(slurm, one_process, tmp_path):
    r = subprocess.run(['srun', '-n', '2', *train_args(tmp_path, 4, tmp_path / 'run')],
                       cwd=REPO, env=slurm, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count('8 cpu devices in 2 processes') == 2
    for i in range(2):
        assert f'process {i} of 2 (slurm): 4 local cpu device(s), mesh data=8' in r.stderr
    assert_equals_one_process(one_process, tmp_path / 'run')


def test_scancel_saves_and_the_same_command_resumes(slurm, tmp_path):
    """`scancel --signal=TERM` (what Slurm sends before a time limit or a preemption): both
    tasks save one agreed step and stop; the same srun command resumes from it."""
    command = ['srun', '-n', '2', '--job-name=rx-scancel',
               *train_args(tmp_path, 20, tmp_path / 'run')]
    job = subprocess.Popen(command, cwd=REPO, env=slurm, text=True, stderr=subprocess.PIPE)
    seen = ''
    for line in job.stderr:
        seen += line
        if 'step 2/20' in line:
            break
    ids = subprocess.run(['squeue', '-h', '-n', 'rx-scancel', '-o', '%i'], env=slurm,
                         text=True, capture_output=True).stdout.split()
    subprocess.run(['scancel', '--signal=TERM', ids[0]], env=slurm, check=True)
    seen += job.stderr.read()
    assert job.wait(timeout=300) == 75, seen[-3000:]   # EXIT_PREEMPTED
    saved = [l for l in seen.splitlines() if l.startswith('preempted: saved step ')]
    assert len(saved) == 2 and len(set(saved)) == 1, seen[-3000:]
    step = int(saved[0].split('saved step ')[1].split()[0])
    assert 2 <= step < 20 and 'Traceback' not in seen
    r = subprocess.run(command, cwd=REPO, env=slurm, text=True, capture_output=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'resumed from {tmp_path / "run" / "checkpoints"} at step {step}' in r.stderr
    assert [m['step'] for m in read_metrics(tmp_path / 'run')][-1] == 20


def test_mpirun_two_ranks_train_as_one_process_does(one_process, tmp_path):
    if not shutil.which('mpirun'):
        pytest.skip('mpirun not installed (apt-get install openmpi-bin; .ci/run does)')
    env = {**os.environ, **ENV}
    r = subprocess.run(['mpirun', '--allow-run-as-root', '--oversubscribe', '-np', '2',
                        *[a for k in ENV for a in ('-x', k)],
                        *train_args(tmp_path, 4, tmp_path / 'run')],
                       cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = r.stdout + r.stderr
    for i in range(2):
        assert f'process {i} of 2 (openmpi): 4 local cpu device(s), mesh data=8' in out
    assert_equals_one_process(one_process, tmp_path / 'run')


# ------------------------------------------------------------------------------ Kubernetes

def test_the_kubernetes_manifest_is_valid_and_gives_jax_what_it_reads():
    """docs/k8s/indexed-job.yaml against Kubernetes 1.37's schemas (kubernetes-validate,
    strict), and against what JAX's Kubernetes detection reads: an Indexed Job whose pods have
    a headless Service as subdomain and may read pods, services and jobs."""
    kv = pytest.importorskip('kubernetes_validate')
    yaml = pytest.importorskip('yaml')
    with open(os.path.join(REPO, 'docs', 'k8s', 'indexed-job.yaml')) as f:
        docs = {d['kind']: d for d in yaml.safe_load_all(f)}
    for doc in docs.values():
        kv.validate(doc, '1.37.0', strict=True)
    broken = {**docs['Job'], 'spec': {**docs['Job']['spec'], 'parallelism': 'four'}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, '1.37.0', strict=True)
    job, service = docs['Job']['spec'], docs['Service']
    pod = job['template']
    assert job['completionMode'] == 'Indexed' and job['parallelism'] == job['completions']
    assert pod['spec']['subdomain'] == service['metadata']['name']
    assert service['spec']['clusterIP'] == 'None'
    assert service['spec']['selector'].items() <= pod['metadata']['labels'].items()
    assert pod['spec']['serviceAccountName'] == docs['RoleBinding']['subjects'][0]['name']
    granted = {(g, r, v) for rule in docs['Role']['rules'] for g in rule['apiGroups']
               for r in rule['resources'] for v in rule['verbs']}
    assert {('', 'pods', 'list'), ('', 'services', 'list'), ('batch', 'jobs', 'get')} <= granted
    assert pod['spec']['containers'][0]['ports'][0]['containerPort'] == 55527


def test_an_indexed_job_is_a_multi_process_run(monkeypatch):
    monkeypatch.setenv('KUBERNETES_SERVICE_HOST', '10.0.0.1')
    monkeypatch.setenv('JOB_COMPLETION_INDEX', '3')
    assert parallel.multi_process()
    monkeypatch.delenv('JOB_COMPLETION_INDEX')
    assert not parallel.multi_process()


def test_sigterm_to_the_mpirun_ranks_saves_and_the_same_command_resumes(tmp_path):
    """A scheduler's SIGTERM reaching the ranks (here rank 0's process): both ranks save one
    agreed step and exit 75, so mpirun does; the same mpirun command resumes. (SIGTERM to
    mpirun itself is not forwarded as a notice: Open MPI 4 kills the ranks, docs/clusters.md.)"""
    if not shutil.which('mpirun'):
        pytest.skip('mpirun not installed (apt-get install openmpi-bin; .ci/run does)')
    command = ['mpirun', '--allow-run-as-root', '--oversubscribe', '-np', '2',
               *[a for k in ENV for a in ('-x', k)], *train_args(tmp_path, 20, tmp_path / 'run')]
    env = {**os.environ, **ENV}
    job = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    seen = ''
    for line in job.stdout:
        seen += line
        if 'step 2/20' in line:
            break
    with open(f'/proc/{job.pid}/task/{job.pid}/children') as f:
        ranks = sorted(int(p) for p in f.read().split())
    os.kill(ranks[0], signal.SIGTERM)
    seen += job.stdout.read()
    assert job.wait(timeout=300) == 75, seen[-3000:]
    saved = [l for l in seen.splitlines() if l.startswith('preempted: saved step ')]
    assert len(saved) == 2 and len(set(saved)) == 1 and 'Traceback' not in seen, seen[-3000:]
    step = int(saved[0].split('saved step ')[1].split()[0])
    r = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f'at step {step}' in r.stdout + r.stderr
    assert [m['step'] for m in read_metrics(tmp_path / 'run')][-1] == 20
