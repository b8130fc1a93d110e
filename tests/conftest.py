"""Test setup: 8 fake CPU devices for the sharding tests, quick compiles, quiet TensorFlow."""
import os

# Unoptimised XLA:CPU code compiles about twice as fast; the tests run small shapes.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
