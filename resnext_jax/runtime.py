"""Process settings for the command-line entry points: a quiet start, and a faster XLA:CPU.

`prepare_process()` is the first thing train.py, `python -m resnext_jax.benchmark` and
`python -m resnext_jax.predict` do. Importing the library changes nothing; a program of your own
gets the same speed by calling `resnext_jax.runtime.prepare_process()` first in its
`if __name__ == '__main__':` block, before JAX starts a backend. Two settings, each measured on
the development machine (README "Performance") and each left alone when you chose otherwise:

1. **YNNPACK fusions.** XLA:CPU (jaxlib 0.10) hands single matrix products to the YNNPACK
   library; `--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce` also gives
   it elementwise and reduction fusions (batch norm, ReLU, the residual adds and their
   gradients): ResNeXt-50 training step +25-30 %. Added to `XLA_FLAGS` with jaxlib 0.10.x, the
   version it was measured with, unless `XLA_FLAGS` already names
   `xla_cpu_experimental_ynn_fusion_type`. Results agree with the default compilation as
   closely as two forms of the model do (tests/test_runtime.py).
2. **Transparent huge pages for malloc** (Linux, glibc >= 2.35). XLA:CPU takes the temporary
   buffer of a compiled step from malloc and returns it after the step; for a ResNeXt-50
   training step at batch 16 that is one 2.8 GB mapping per step, which the kernel zero-fills
   in 4 KiB pages (≈ 700 thousand page faults, 12-16 % of the step's CPU time). glibc's
   `glibc.malloc.hugetlb=1` makes malloc ask for huge pages, which removes almost all of them.
   Tunables are read when a process starts, so the process restarts itself once (same
   interpreter, same arguments) with the tunable added to `GLIBC_TUNABLES`. Not done when
   `GLIBC_TUNABLES` already names it (`glibc.malloc.hugetlb=0` opts out), off Linux, with an
   older glibc, or when the kernel's transparent huge pages are not in `madvise` mode
   (`always` gives them anyway, `never` forbids them).

`quiet_start()` (also called by `prepare_process`) keeps libraries' start-up chatter off the
screen, for every tool: TensorFlow's oneDNN banner (`TF_ENABLE_ONEDNN_OPTS=0`: oneDNN speeds
TensorFlow's matrix products, which the input pipeline does not run) and its C++ INFO
lines (`TF_CPP_MIN_LOG_LEVEL=2`), and, on a machine with libtpu installed (the `tpu` extra) but
no TPU chip and no GPU plugin, libtpu's failed probe for TPU hosts (`JAX_PLATFORMS=cpu`; the
probe prints `E0000 … unexpected worker hostname …` once TensorFlow is loaded). Each is left
alone when the variable is already set.
"""
import contextlib
import os
import re
import sys

YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FUSIONS = 'individual_dot,eltwise,reduce'
YNN_JAXLIB = (0, 10)  # the jaxlib minor version the flag was measured with
TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def xla_flags_with_ynn_fusions(xla_flags, jaxlib_version):
    """`XLA_FLAGS` with the YNNPACK fusions added, or unchanged (see the module doc)."""
    if tuple(jaxlib_version[:2]) != YNN_JAXLIB or YNN_FLAG in xla_flags:
        return xla_flags
    return f'{xla_flags} --{YNN_FLAG}={YNN_FUSIONS}'.strip()


def jaxlib_version():
    """(major, minor) of the installed jaxlib."""
    import jaxlib.version
    return tuple(int(p) for p in re.findall(r'\d+', jaxlib.version.__version__)[:2])


def glibc_version():
    """(major, minor) of the running glibc, or None elsewhere."""
    try:
        _, version = os.confstr('CS_GNU_LIBC_VERSION').split()
        return tuple(int(part) for part in version.split('.')[:2])
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path=THP_SETTING):
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open(path) as f:
            match = re.search(r'\[(\w+)\]', f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def huge_pages_wanted(environ, glibc, thp):
    """Whether a process with this environment, glibc version and THP mode should restart."""
    return (glibc is not None and glibc >= (2, 35) and thp == 'madvise'
            and TUNABLE not in environ.get('GLIBC_TUNABLES', ''))


GOOGLE_PCI_VENDOR = '0x1ae0'   # how JAX and libtpu recognise TPU chips on the PCI bus
GPU_PLUGIN = re.compile(r'jax_(cuda|rocm)\d+_plugin')   # jax[cuda12]'s jax_cuda12_plugin, …


def tpu_chip_present(pci_devices='/sys/bus/pci/devices'):
    """Whether a Google (TPU) device sits on the PCI bus; True where that cannot be read."""
    try:
        names = os.listdir(pci_devices)
    except OSError:
        return True
    for name in names:
        try:
            with open(os.path.join(pci_devices, name, 'vendor')) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def quiet_environment(environ, tpu_chip, gpu_plugin):
    """The variables `quiet_start` sets: {name: value} for those not set in `environ`."""
    wanted = {'TF_ENABLE_ONEDNN_OPTS': '0', 'TF_CPP_MIN_LOG_LEVEL': '2'}
    if not tpu_chip and not gpu_plugin:
        wanted['JAX_PLATFORMS'] = 'cpu'
    return {k: v for k, v in wanted.items() if k not in environ}


def quiet_start():
    """Sets `quiet_environment`'s variables (see the module doc). Call it before TensorFlow
    is imported and before JAX starts a backend."""
    import pkgutil
    gpu = any(GPU_PLUGIN.fullmatch(m.name) for m in pkgutil.iter_modules())
    settings = quiet_environment(os.environ, tpu_chip_present(), gpu)
    os.environ.update(settings)
    if 'JAX_PLATFORMS' in settings and 'jax' in sys.modules:   # JAX read it when imported
        sys.modules['jax'].config.update('jax_platforms', settings['JAX_PLATFORMS'])


def prepare_process():
    """Applies `quiet_start` and both speed settings; may restart the process. Call it before
    JAX starts a backend."""
    quiet_start()
    flags = xla_flags_with_ynn_fusions(os.environ.get('XLA_FLAGS', ''), jaxlib_version())
    if flags:
        os.environ['XLA_FLAGS'] = flags
    argv = getattr(sys, 'orig_argv', None)
    if (not sys.platform.startswith('linux') or not argv or not sys.executable
            or not huge_pages_wanted(os.environ, glibc_version(), thp_mode())):
        return
    previous = os.environ.get('GLIBC_TUNABLES')
    os.environ['GLIBC_TUNABLES'] = f'{previous}:{TUNABLE}=1' if previous else f'{TUNABLE}=1'
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable] + argv[1:])
    except OSError:  # cannot restart: carry on without huge pages
        if previous is None:
            del os.environ['GLIBC_TUNABLES']
        else:
            os.environ['GLIBC_TUNABLES'] = previous


@contextlib.contextmanager
def native_stderr_silenced():
    """Native libraries' stderr (file descriptor 2) goes to /dev/null inside: libjpeg's
    `Improper call to JPEG library in state 201` and TensorFlow's `W0000 … local_rendezvous`
    for an image that cannot be decoded, which the caller reports in its own line. For short
    calls on the main thread only: everything written to the descriptor meanwhile is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
