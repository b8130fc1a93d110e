"""ResNeXt ("Aggregated Residual Transformations for Deep Neural Networks") in JAX/Flax.

The names below load on first use, so `import resnext_jax.runtime` (the tools' first step) and
a tool's `--help` do not wait for JAX and Flax. `resnext_jax.nnx` is the same networks as Flax
NNX modules; `load_pretrained('resnext50_32x4d.tv2_in1k')` gives published weights by name
(`resnext_jax.pretrained`).
"""
import importlib

_WHERE = {'AggregatedTransform': 'aggregated', 'FORMS': 'aggregated', 'Bottleneck': 'models',
          'GroupedBatchNorm': 'models', 'ResNeXt': 'models', 'create_model': 'models',
          'list_models': 'models', 'load_pretrained': 'pretrained'}
__all__ = sorted(_WHERE)
__version__ = '0.1.0'


def __getattr__(name):
    if name == 'nnx':   # the Flax NNX front end: resnext_jax.nnx.create_model(...)
        return importlib.import_module(f'{__name__}.nnx')
    if name not in _WHERE:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{_WHERE[name]}'), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
