"""Cloud TPU slices by their Cloud names: the chip, its numbers, and compile-only devices.

    v2-8, v3-8, v4-8, v5p-8, …   the number counts TensorCores, two per chip: v4-8 is 4 chips
    v5e-8 (v5litepod-8), v6e-8, …   the number counts chips: v5e-8 is 8 chips (2x4)

A v4 or v5p chip is one JAX device (its two TensorCores run as one, "megacore"); a v2 or v3
chip is two, one per TensorCore, each with half the chip's HBM: v3-8 is 4 chips, 8 devices.

`slice_devices(parse_slice('v5e-8'))` returns the slice's 8 devices as libtpu describes them,
on any machine, with no TPU attached: enough to lower and compile a sharded `jax.jit` for the
slice (`python -m resnext_jax.plan`), not to run it. Needs libtpu (`pip install -e '.[tpu]'`).
"""
import dataclasses
import importlib.util
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                  # Cloud TPU version: 'v4', 'v5e', …
    device_kind: str           # what JAX calls it (`Device.device_kind`)
    hbm_bytes: int
    peak_bf16_flops: float     # dense, per chip
    hbm_bytes_per_sec: float
    libtpu_prefix: str         # libtpu's topology names: '<prefix>:2x2x1'
    cores_per_chip: int        # TensorCores per chip as the slice name counts them
    shapes: tuple              # the slice shapes Cloud TPU offers, by chips
    devices_per_chip: int = 1  # JAX devices per chip: 2 on v2 and v3 (a device per core)


GiB = 2**30
_3D = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8),
       (8, 8, 16), (8, 16, 16))
_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
# v2 and v3 slices (v2-8 … v2-512, v3-8 … v3-2048): 2D tori of 2x2-chip hosts.
_V2 = ((2, 2), (4, 4), (8, 8), (8, 16), (16, 16))
_V3 = ((2, 2), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32))

# Per-chip peak, HBM and HBM bandwidth from Google's Cloud TPU pages (the pages write "GB" for
# v5e, v5p and v6e capacities; taken here as GiB, like v4's). The v2 page gives no figures and
# points to Jouppi et al., "A Domain-Specific Supercomputer for Training Deep Neural Networks",
# CACM 63(7), 2020, which gives TPUv2 46 TFLOP/s bf16, 16 GiB, 700 GB/s:
#   v2  https://cloud.google.com/tpu/docs/v2   46 TFLOP/s bf16, 16 GiB, 700 GB/s (the paper's)
#   v3  https://cloud.google.com/tpu/docs/v3   123 TFLOP/s bf16, 32 GiB, 900 GB/s
#   v4  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB, 1200 GB/s
#   v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB, 819 GB/s
#   v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GB, 2765 GB/s
#   v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB, 1638 GB/s
# v4 and v5p run as one JAX device per chip ("megacore"); their slices use 2x2x1 chips per host.
CHIPS = {c.name: c for c in (
    Chip('v2', 'TPU v2', 16 * GiB, 46e12, 700e9, 'v2', 2, _V2, devices_per_chip=2),
    Chip('v3', 'TPU v3', 32 * GiB, 123e12, 900e9, 'v3', 2, _V3, devices_per_chip=2),
    Chip('v4', 'TPU v4', 32 * GiB, 275e12, 1200e9, 'v4', 2, _3D),
    Chip('v5e', 'TPU v5 lite', 16 * GiB, 197e12, 819e9, 'v5e', 1, _2D),
    Chip('v5p', 'TPU v5', 95 * GiB, 459e12, 2765e9, 'v5', 2, _3D + ((16, 16, 16), (16, 16, 24))),
    Chip('v6e', 'TPU v6 lite', 32 * GiB, 918e12, 1638e9, 'v6e', 1, _2D),
)}
ALIASES = {'v5litepod': 'v5e'}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str          # as given, e.g. 'v5e-8'
    chip: Chip
    shape: tuple       # chips along each axis of the slice, e.g. (2, 4)
    num_slices: int = 1

    @property
    def chips_per_slice(self):
        return math.prod(self.shape)

    @property
    def num_chips(self):
        return self.chips_per_slice * self.num_slices

    @property
    def num_devices(self):
        return self.num_chips * self.chip.devices_per_chip

    @property
    def topology_name(self):
        return f"{self.chip.libtpu_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self):
        if len(self.shape) == 3 or self.chip.devices_per_chip == 2:
            return (2, 2, 1)   # v4, v5p; v2 and v3 hosts hold 2x2 chips too
        # v5e and v6e: slices of up to 8 chips are one host, larger ones hosts of 2x2 chips.
        return (*self.shape, 1) if self.chips_per_slice <= 8 else (2, 2, 1)


def known_names():
    """One line: every slice name this module knows."""
    return '; '.join(
        f"{c.name}-{{{','.join(str(math.prod(s) * c.cores_per_chip) for s in c.shapes)}}}"
        for c in CHIPS.values()) + f" ({', '.join(f'{a} = {c}' for a, c in ALIASES.items())})"


def parse_slice(name, num_slices=1):
    """'v5e-8' → its `Slice`; ValueError naming the known slices for anything else."""
    m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name.strip().lower())
    chip = m and CHIPS.get(ALIASES.get(m.group(1), m.group(1)))
    if chip:
        chips, rest = divmod(int(m.group(2)), chip.cores_per_chip)
        shape = next((s for s in chip.shapes if math.prod(s) == chips), None) if not rest else None
        if shape:
            if num_slices < 1:
                raise ValueError(f'--num_slices must be at least 1, not {num_slices}')
            return Slice(name, chip, shape, num_slices)
    raise ValueError(f'unknown TPU topology {name!r}; known: {known_names()}')


def libtpu_installed():
    return importlib.util.find_spec('libtpu') is not None


def slice_devices(tpu_slice):
    """The compile-only devices of `tpu_slice` (all slices), from libtpu."""
    if not libtpu_installed():
        raise ValueError("libtpu is not installed: pip install -e '.[tpu]'")
    # Without a TPU VM around it, libtpu would ask the GCE metadata server what it runs on.
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    # ... and JAX then tells libtpu that this machine's TPU type and worker hostnames are a
    # WARNING text, which libtpu prints with its own complaints (`Failed to find host bounds`,
    # `E0000 … unexpected worker hostname … Source Location Trace`): a compile needs neither.
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', tpu_slice.name)
    # libtpu lets one process at a time load it (/tmp/libtpu_lockfile), to guard the chips;
    # compiling for devices that are not there needs no guard, and plans may run side by side.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies
    return topologies.get_topology_desc(
        platform='tpu', topology_name=tpu_slice.topology_name, chip_config_name=(
            'megacore' if tpu_slice.chip.cores_per_chip == 2 * tpu_slice.chip.devices_per_chip
            else 'default'),
        chips_per_host_bounds=tpu_slice.chips_per_host_bounds,
        num_slices=tpu_slice.num_slices).devices
