"""Test setup: 8 fake CPU devices for the sharding tests, quick compiles, quiet TensorFlow.

JAX is pinned to the CPU so that an installed CUDA jaxlib or libtpu (the `tpu` extra, for
`resnext_jax.plan`) does not take the tests' devices; subprocesses inherit the setting.
"""
import os
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# Unoptimised XLA:CPU code compiles about twice as fast; the tests run small shapes.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')   # as the tools run TensorFlow (runtime.py)
# Nothing leaves this machine: huggingface_hub's endpoint is a closed loopback port unless a
# test's local Hub server (tests/hub_server.py) is named, its agent look-up is off, and its
# caches and ours are this session's own.
os.environ['HF_ENDPOINT'] = 'http://127.0.0.1:9'
os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'
os.environ.pop('HF_HUB_OFFLINE', None)
os.environ['HF_HUB_CACHE'] = tempfile.mkdtemp(prefix='resnext_jax_hf_cache_')
os.environ['RESNEXT_JAX_CACHE'] = tempfile.mkdtemp(prefix='resnext_jax_cache_')
# Many tests compile the same tiny steps (each run, resume and subprocess anew): JAX's
# persistent compilation cache, in a directory of this session only, compiles each once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='resnext_jax_xla_cache_')
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

try:  # torch 2.14 / torchvision 0.29 (CUDA builds) crash when imported after TensorFlow 2.21
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass
