"""Test setup: 8 fake CPU devices for the sharding tests, quick compiles, quiet TensorFlow.

JAX is pinned to the CPU so that an installed CUDA jaxlib or libtpu (the `tpu` extra, for
`resnext_jax.plan`) does not take the tests' devices; subprocesses inherit the setting.
"""
import os

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# Unoptimised XLA:CPU code compiles about twice as fast; the tests run small shapes.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')   # as the tools run TensorFlow (runtime.py)
# Many tests compile the same tiny steps (each run, resume and subprocess anew): JAX's
# persistent compilation cache, in a directory of this session only, compiles each once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    import tempfile
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='resnext_jax_xla_cache_')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

try:  # torch 2.14 / torchvision 0.29 (CUDA builds) crash when imported after TensorFlow 2.21
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass
