"""Every device of every process as one mesh; global batches built from process-local data.

The batch is split along the mesh axis 'data'. Training state is replicated, or, with FSDP,
each large parameter and its optimizer state is split along the same axis (ZeRO-3 style: XLA
gathers a parameter where it is used and reduce-scatters its gradient).
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = 'data'


def _cluster_detected():
    env = os.environ
    return (int(env.get('SLURM_NTASKS', '1')) > 1
            or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
            or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Joins the processes of a multi-host run: explicitly, or auto-detected on a TPU pod, SLURM
    or Open MPI. A single process needs no call. Must run before anything else touches JAX."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError('--coordinator_address needs --num_processes and --process_id')
        # Cross-process collectives on CPU go through gloo; GPUs and TPUs ignore this.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


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
