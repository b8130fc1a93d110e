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


def _cluster_detected():
    env = os.environ
    return (int(env.get('SLURM_NTASKS', '1')) > 1
            or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
            or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))


def multi_process(coordinator_address=None):
    """Whether this is one process of a multi-process run (flags given, or a cluster found)."""
    return bool(coordinator_address) or _cluster_detected()


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               peer_timeout_s=PEER_TIMEOUT_S):
    """Joins the processes of a multi-host run: explicitly, or auto-detected on a TPU pod, SLURM
    or Open MPI. A single process needs no call. Must run before anything else touches JAX.
    A process that sends no heartbeat for `peer_timeout_s` seconds is dead to the others."""
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError('--coordinator_address needs --num_processes and --process_id')
    if multi_process(coordinator_address):
        # Cross-process collectives on CPU go through gloo; GPUs and TPUs ignore this.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=peer_timeout_s)


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
