"""Every device of every process as one mesh; global batches built from process-local data.

The batch is split along the mesh axis 'data'. Training state is replicated, or, with FSDP,
each large parameter and its optimizer state is split along the same axis (ZeRO-3 style: XLA
gathers a parameter where it is used and reduce-scatters its gradient).
"""
import ctypes
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


PEER_TIMEOUT_S = 60   # a process silent this long is dead to the others (JAX's default: 100)
EXIT_PEER_LOST = 69   # EX_UNAVAILABLE: another process of the run died; restart them all
_WORKER = 'RESNEXT_JAX_WORKER'


# Launchers JAX detects (jax/_src/clusters): what each sets for this process's rank on its node,
# the number of processes on the node, and the accelerators bound to the task.
LAUNCHERS = {
    'slurm': {'size': 'SLURM_NTASKS', 'local_rank': 'SLURM_LOCALID',
              'local_size': 'SLURM_STEP_TASKS_PER_NODE', 'per_task': 'SLURM_GPUS_PER_TASK'},
    'openmpi': {'size': 'OMPI_COMM_WORLD_SIZE', 'local_rank': 'OMPI_COMM_WORLD_LOCAL_RANK',
                'local_size': 'OMPI_COMM_WORLD_LOCAL_SIZE', 'per_task': None},
}
# Launchers that JAX does not detect: (what, its size variable, its rank variable).
UNDETECTED = (('MPICH / Intel MPI (PMI)', 'PMI_SIZE', 'PMI_RANK'),
              ('torchrun / torch.distributed', 'WORLD_SIZE', 'RANK'),
              ('PMIx (Open MPI 5, prterun)', 'PMIX_SIZE', 'PMIX_RANK'))


def _cluster_detected():
    env = os.environ
    return (int(env.get('SLURM_NTASKS', '1')) > 1
            or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
            or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
            # a Kubernetes Indexed Job (docs/k8s/indexed-job.yaml); JAX asks the API the rest
            or ('KUBERNETES_SERVICE_HOST' in env and 'JOB_COMPLETION_INDEX' in env))


def multi_process(coordinator_address=None):
    """Whether this is one process of a multi-process run (flags given, or a cluster found)."""
    return bool(coordinator_address) or _cluster_detected()


def _count(text, index=0):
    """Entry `index` of a Slurm per-node count such as '8', '2(x4)' or '2(x3),1' (node 0 first);
    None if there is none."""
    counts = []
    for part in (text or '').split(','):
        m = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(index, len(counts) - 1)] if counts else None


def _tasks_on_node(env, names):
    """Processes on this node: the launcher's per-node count, for this node (SLURM_NODEID)."""
    return _count(env.get(names['local_size']), int(env.get('SLURM_NODEID', 0) or 0)) or 1


def node_gpus():
    """How many NVIDIA GPUs this node has (the driver's list, read without starting CUDA);
    None where there is no NVIDIA driver."""
    try:
        return len(os.listdir('/proc/driver/nvidia/gpus'))
    except OSError:
        return None


def launched_by(env=None):
    """The launcher JAX detects for this process ('slurm', 'openmpi') with more than one
    process, else None."""
    env = os.environ if env is None else env
    for name, names in LAUNCHERS.items():
        if (_count(env.get(names['size'])) or 1) > 1 and names['local_rank'] in env:
            return name
    return None


def local_device_ids(env=None, gpus_on_node=None):
    """(ids, why): the accelerators this process should drive, as indices among those it can
    see, for a run a launcher started; (None, why) where JAX's own choice stands.

    JAX's auto-detection gives each Slurm or Open MPI process only the accelerator of its local
    rank (`jax/_src/clusters/cluster.py`: "single process per device"), which is right for one
    task per GPU and wrong for the two other ways clusters are used: one task per node driving
    all of its GPUs (4 of 32 GPUs train, silently), or tasks whose GPUs the launcher bound
    (`srun --gpus-per-task`, which sets CUDA_VISIBLE_DEVICES per task: the local rank is then
    no index of what the task sees). Here the GPUs a task sees (CUDA_VISIBLE_DEVICES, else the
    node's) are shared evenly among the tasks on the node unless Slurm bound them per task.
    `JAX_LOCAL_DEVICE_IDS` set by the user always wins."""
    env = os.environ if env is None else env
    launcher = launched_by(env)
    if launcher is None:
        return None, 'not started by Slurm or Open MPI'
    if env.get('JAX_LOCAL_DEVICE_IDS'):
        return None, f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']} (yours)"
    names = LAUNCHERS[launcher]
    visible = env.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:
        seen = len([d for d in visible.split(',') if d.strip()])
        where = f'CUDA_VISIBLE_DEVICES={visible}'
    else:
        seen = (gpus_on_node if gpus_on_node is not None else
                _count(env.get('SLURM_GPUS_ON_NODE')) or node_gpus())
        where = f'{seen} GPUs on the node'
    if not seen:
        return None, 'no GPUs'   # CPUs and TPUs: JAX's choice (it never sets TPU ids)
    rank = int(env[names['local_rank']])
    tasks = _tasks_on_node(env, names)
    bound = _count(env.get(names['per_task']))   # None for Open MPI
    if bound and seen == bound:   # the launcher gave this task its own GPUs
        return list(range(seen)), f'{where}: the {seen} GPU(s) {launcher} bound to this task'
    if seen % tasks:
        raise ValueError(
            f'{tasks} processes share the {seen} GPUs this node shows them ({where}), which do '
            'not divide evenly: launch one task per GPU (srun --ntasks-per-node=GPUS '
            '--gpus-per-task=1) or one per node, or set JAX_LOCAL_DEVICE_IDS for each')
    share = seen // tasks
    why = (f'{where}, {tasks} process(es) on this node: local rank {rank} drives '
           f'{"GPU" if share == 1 else "GPUs"} {rank * share}'
           + (f'..{(rank + 1) * share - 1}' if share > 1 else ''))
    return list(range(rank * share, (rank + 1) * share)), why


def check_launcher(coordinator_address=None, env=None):
    """ValueError in one line for processes started by a launcher JAX does not detect (each
    would train alone): what was found and which flags to pass."""
    env = os.environ if env is None else env
    if coordinator_address or launched_by(env) or 'TPU_WORKER_HOSTNAMES' in env:
        return
    for what, size, rank in UNDETECTED:
        if (_count(env.get(size)) or 1) > 1 and rank in env:
            raise ValueError(
                f'{env[size]} processes started by {what} ({size}={env[size]}, {rank}='
                f'{env[rank]}), which JAX does not detect: pass --coordinator_address='
                f'HOST0:PORT --num_processes={env[size]} --process_id=${rank} (HOST0 the host '
                f'of {rank} 0), or launch with srun or Open MPI\'s mpirun (docs/clusters.md)')


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               peer_timeout_s=PEER_TIMEOUT_S):
    """Joins the processes of a multi-host run: explicitly, or auto-detected on a TPU pod, SLURM
    or Open MPI (with `local_device_ids`' choice of accelerators). A single process needs no
    call. Must run before anything else touches JAX. A process that sends no heartbeat for
    `peer_timeout_s` seconds is dead to the others."""
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError('--coordinator_address needs --num_processes and --process_id')
    check_launcher(coordinator_address)
    if multi_process(coordinator_address):
        ids, _ = local_device_ids()
        # Cross-process collectives on CPU go through gloo; GPUs and TPUs ignore this.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=ids,
                                   heartbeat_timeout_seconds=peer_timeout_s)


def describe_processes(mesh):
    """(line, warning) for the first screen: this process's place (launcher, its devices, the
    mesh, the accelerators it drives and why) and, where its node has GPUs that none of the
    node's processes drive, a warning line (else None). (None, None) for a single process."""
    if jax.process_count() == 1:
        return None, None
    _, why = local_device_ids()
    launcher = launched_by() or '--coordinator_address'
    local = jax.local_devices()
    info = (f'process {jax.process_index()} of {jax.process_count()} ({launcher}): '
            f'{len(local)} local {local[0].platform} device(s), mesh '
            f'{" × ".join(f"{k}={v}" for k, v in mesh.shape.items())}; {why}')
    warning = None
    node, names = node_gpus(), LAUNCHERS.get(launcher)
    tasks = _tasks_on_node(os.environ, names) if names else 1
    if local[0].platform == 'gpu' and node and len(local) * tasks < node:
        warning = (f'this node has {node} GPUs but its {tasks} process(es) drive '
                   f'{len(local) * tasks}: {node - len(local) * tasks} stay idle; launch one task '
                   'per GPU or pass all of them to one task per node (docs/clusters.md)')
    return info, warning


def is_peer_lost(error):
    """Whether a runtime error from a multi-process step means another process is gone (a
    collective's connection reset, the coordination service unreachable)."""
    return jax.process_count() > 1 and re.search(
        r'gloo|nccl|connection|socket|unavailable|heartbeat|barrier|deadline', str(error), re.I)


def peer_lost_exit(error):
    """Exit at once with one line and EXIT_PEER_LOST. `os._exit`: a normal exit would wait at
    JAX's shutdown barrier for the dead process until jaxlib aborts."""
    print(f'error: process {jax.process_index()} of {jax.process_count()} lost another process '
          f'of the run ({_first_line(error)}); restart every process with the same command to '
          'resume from the newest checkpoint', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def _first_line(error):
    return ' '.join(str(error).split())[:200]


# XLA's C++ log lines at ERROR or FATAL ("E1123 19:30:43.007586   29817 file.cc:123] ..."), and
# absl's Python log lines, which show the process is still going.
_NATIVE_ERROR = re.compile(r'[EF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+\.(cc|h):\d+\]')
_PYTHON_LOG = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+\.py:\d+\]')
_COORDINATION_FATAL = 'JAX distributed service detected fatal errors'


def supervise(command):
    """Runs `command` (this process's part of a multi-process run) as a child; returns its exit
    code, or EXIT_PEER_LOST with one line when another process of the run died.

    Why a child: when a peer dies, jaxlib's coordination client aborts every survivor from a C++
    thread (SIGABRT and a stack dump, within seconds if the coordinator died, after
    PEER_TIMEOUT_S otherwise); jaxlib 0.10 offers Python no way to replace that. Here the
    child's C++ error lines are held back until it shows it is still running; if it then dies
    of that abort, they are dropped for one line. SIGTERM and SIGINT are passed on to the child
    (preemption: it saves and exits with its own code); the child dies with this process."""
    def die_with_parent():
        try:   # Linux: PR_SET_PDEATHSIG = 1, so kill -9 of this process cannot orphan the child
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    child = subprocess.Popen(command, env={**os.environ, _WORKER: '1'}, stderr=subprocess.PIPE,
                             text=True, errors='replace', preexec_fn=die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: child.send_signal(number))
    held = []
    for line in child.stderr:
        if held and _PYTHON_LOG.match(line):   # still running: what was held was not fatal
            sys.stderr.writelines(held)
            held = []
        if held or _NATIVE_ERROR.match(line):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = child.wait()
    text = ''.join(held)
    if code == EXIT_PEER_LOST:   # the child said so in its own `error:` line
        sys.stderr.writelines(l for l in held if l.startswith('error:'))
        return code
    if _COORDINATION_FATAL in text:
        sys.stderr.write(_peer_lost_line(text))
        return EXIT_PEER_LOST
    sys.stderr.writelines(held)
    return 128 - code if code < 0 else code


def _peer_lost_line(log):
    """The one line for a child that jaxlib aborted, naming the dead process where it can."""
    unhealthy = re.search(r'tasks are unhealthy[^:]*:\s*([\d,\s]+?)\s*\n', log)
    if unhealthy:
        what = f'process {", ".join(unhealthy.group(1).split())} stopped responding'
    elif re.search(r'CoordinationService/(Heartbeat|PollForError)', log):
        what = 'process 0, which runs the coordination service, died or stopped responding'
    else:
        what = 'the coordination service reported a fatal error'
    return (f'error: {what}, so this process stopped; restart every process with the same '
            'command to resume from the newest checkpoint\n')


def is_worker():
    """Whether this process is the child that `supervise` started."""
    return os.environ.get(_WORKER) == '1'


def per_device(fn, x, *replicated_args):
    """`fn(x, *replicated_args)` computed by each device on its own share of the batch.

    Under a mesh set with `jax.set_mesh` (train.py and plan.py trace their steps inside one)
    whose 'data' axis splits `x`'s batch evenly, `fn` runs under `jax.shard_map`: every device
    applies it to its rows of `x` with the other arguments replicated, and the gradient of those
    arguments is summed over the axis. Without such a mesh it is just `fn(x, ...)`.

    Why: XLA's SPMD partitioner (jaxlib 0.10) gathers the global batch onto every device for a
    grouped convolution whose groups have more than one input channel (openxla/xla#47945), so
    on CPU and GPU meshes every device would compute those layers for the whole batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or DATA not in mesh.axis_names or mesh.shape[DATA] == 1
            or x.shape[0] % mesh.shape[DATA]
            or DATA in mesh.manual_axes):
        return fn(x, *replicated_args)
    specs = (P(DATA),) + (P(),) * len(replicated_args)
    return jax.shard_map(fn, in_specs=specs, out_specs=P(DATA), axis_names={DATA})(
        x, *replicated_args)


def make_mesh():
    """A one-axis mesh over `jax.devices()` — all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA,))


def batch_sharding(mesh):
    return NamedSharding(mesh, P(DATA))


def replicated(mesh):
    return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh, fsdp=False, min_size=2**16):
    """Shardings for a pytree of arrays (or shapes): replicated, or with `fsdp` every array of at
    least `min_size` elements split along its largest axis that the mesh size divides."""
    def rule(x):
        if fsdp and np.prod(x.shape) >= min_size:
            for axis in sorted(range(len(x.shape)), key=lambda a: -x.shape[a]):
                if x.shape[axis] % mesh.size == 0:
                    spec = [None] * len(x.shape)
                    spec[axis] = DATA
                    return NamedSharding(mesh, P(*spec))
        return replicated(mesh)
    return jax.tree_util.tree_map(rule, abstract_state)


def global_batch(local_batch, mesh):
    """Global arrays, sharded over 'data', from this process's part of a batch (numpy arrays)."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
