"""ResNeXt ("Aggregated Residual Transformations for Deep Neural Networks") in JAX/Flax."""
from resnext_jax.aggregated import FORMS, AggregatedTransform
from resnext_jax.models import (Bottleneck, GroupedBatchNorm, ResNeXt, create_model,
                                list_models)

__all__ = ['AggregatedTransform', 'Bottleneck', 'FORMS', 'GroupedBatchNorm', 'ResNeXt',
           'create_model', 'list_models']
__version__ = '0.1.0'
