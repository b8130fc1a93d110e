"""The networks as Flax NNX modules: stateful, `model.train()` / `model.eval()`, parameters as
`nnx.Param` and batch-norm statistics as `nnx.BatchStat`.

    from flax import nnx
    import resnext_jax.nnx
    model = resnext_jax.nnx.create_model('resnext50_32x4d', rngs=nnx.Rngs(0))
    logits = model(images)                  # training mode: batch statistics, drop path
    model.eval(); logits = model(images)    # running statistics, no dropout

The architecture is the Linen modules' (`resnext_jax.models`, `resnext_jax.aggregated`): the
stem, the stage layout (`models.block_layout`), the aggregated transformation in every form
(`aggregated.aggregated_branch`), grouped batch norm (`models.grouped_batch_norm`) and drop path
are the same functions, called from either front end. The NNX model's state is named as the
Linen variables are, so weights move both ways without conversion: `variables(model)` gives
Linen's {'params', 'batch_stats'}, `load_variables(model, variables)` takes them (a Linen
checkpoint, `convert.load_model`'s torchvision or timm weights, an exported weights file), and
`from_linen(linen_model, variables, rngs=...)` builds the NNX model of a Linen one.

Training: split the model once and jit a function of its state (`nnx.split` / `nnx.merge`
inside), as in docs/models.md; graph-mode `nnx.jit` traverses the module graph on every call.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from resnext_jax import aggregated, models
from resnext_jax.aggregated import BN_EPSILON, BN_MOMENTUM, conv

__all__ = ['ResNeXt', 'create_model', 'variables', 'load_variables', 'from_linen', 'train_step']


class Kernel(nnx.Module):
    """One convolution kernel as `<name>/kernel`, as the Linen `aggregated.Kernel`."""

    def __init__(self, shape, param_dtype, rngs, init=aggregated.conv_init):
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))


class GroupedBatchNorm(nnx.Module):
    """`models.GroupedBatchNorm` in NNX: training statistics per group of `group_size` images."""

    def __init__(self, num_features, group_size, *, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                 dtype=jnp.float32, param_dtype=jnp.float32, scale_init=nn.initializers.ones,
                 rngs):
        self.group_size, self.momentum, self.epsilon, self.dtype = (
            group_size, momentum, epsilon, dtype)
        self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average = False

    def __call__(self, x):
        y, stats = models.grouped_batch_norm(
            x, self.scale.value, self.bias.value, self.mean.value, self.var.value,
            self.group_size, self.epsilon, self.momentum, not self.use_running_average)
        if stats is not None:
            self.mean.value, self.var.value = stats
        return y.astype(self.dtype)


def _norm(features, *, group_size, momentum, epsilon, dtype, param_dtype, rngs,
          scale_init=nn.initializers.ones):
    if group_size:
        return GroupedBatchNorm(features, group_size, momentum=momentum, epsilon=epsilon,
                                dtype=dtype, param_dtype=param_dtype, scale_init=scale_init,
                                rngs=rngs)
    return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, dtype=dtype,
                         param_dtype=param_dtype, scale_init=scale_init, rngs=rngs)


class AggregatedTransform(nnx.Module):
    """Σ_{i=1..C} τ_i(x) and its batch norm (Eq. 3): `aggregated.aggregated_branch`."""

    def __init__(self, in_features, cardinality, width, features, strides, form, norm,
                 zero_init_last, dtype, param_dtype, rngs):
        if width % cardinality:
            raise ValueError(f'width {width} is not divisible by cardinality {cardinality}')
        self.cardinality, self.strides, self.form, self.dtype = (
            cardinality, strides, aggregated.check_form(form), dtype)
        self.conv1 = Kernel((1, 1, in_features, width), param_dtype, rngs)
        self.conv2 = Kernel((3, 3, width // cardinality, width), param_dtype, rngs)
        self.conv3 = Kernel((1, 1, width, features), param_dtype, rngs)
        self.bn1, self.bn2 = norm(width), norm(width)
        self.bn3 = norm(features, scale_init=(nn.initializers.zeros if zero_init_last
                                              else nn.initializers.ones))

    def __call__(self, x):
        x, w1, w2, w3 = nn.dtypes.promote_dtype(
            x, self.conv1.kernel.value, self.conv2.kernel.value, self.conv3.kernel.value,
            dtype=self.dtype)
        return aggregated.aggregated_branch(x, w1, w2, w3, self.bn1, self.bn2, self.bn3,
                                            self.cardinality, self.strides,
                                            aggregated.resolve_form(self.form))


class Bottleneck(nnx.Module):
    """relu(shortcut(x) + Σ τ_i(x)), drop path on the branch in training (`models.Bottleneck`)."""

    def __init__(self, in_features, cardinality, width, features, strides, form, norm,
                 zero_init_last, dtype, param_dtype, drop_path, rngs):
        self.strides, self.dtype, self.drop_path = strides, dtype, drop_path
        if strides != 1 or in_features != features:
            self.proj_conv = Kernel((1, 1, in_features, features), param_dtype, rngs)
            self.proj_bn = norm(features)
        else:
            self.proj_conv = self.proj_bn = None
        self.aggregated = AggregatedTransform(in_features, cardinality, width, features,
                                              strides, form, norm, zero_init_last, dtype,
                                              param_dtype, rngs)
        self.deterministic = False
        self.rngs = rngs if drop_path else None

    def __call__(self, x):
        shortcut = x
        if self.proj_conv is not None:
            xs, w = nn.dtypes.promote_dtype(x, self.proj_conv.kernel.value, dtype=self.dtype)
            shortcut = self.proj_bn(conv(xs, w, self.strides))
        y = self.aggregated(x)
        if self.drop_path and not self.deterministic:
            y = models.drop_path(y, self.drop_path, self.rngs.dropout())
        return nn.relu(shortcut + y)


class Stem(nnx.Module):
    """`models.Stem`: ImageNet 7×7/2 conv, BN, ReLU, 3×3/2 max-pool; CIFAR 3×3 conv, BN, ReLU."""

    def __init__(self, kind, in_features, features, norm, dtype, param_dtype, rngs):
        self.size, self.strides, self.pool = models.stem_layout(kind)
        self.dtype = dtype
        self.conv = Kernel((self.size, self.size, in_features, features), param_dtype, rngs)
        self.bn = norm(features)

    def __call__(self, x):
        x, w = nn.dtypes.promote_dtype(x, self.conv.kernel.value, dtype=self.dtype)
        x = nn.relu(self.bn(conv(x, w, self.strides)))
        return models.max_pool_3x3_s2(x) if self.pool else x


class Stage(nnx.Module):
    """The blocks of one stage, `block1`, `block2`, … as in Linen."""

    def __init__(self, blocks):
        self.num_blocks = len(blocks)
        for b, block in enumerate(blocks):
            setattr(self, f'block{b + 1}', block)

    def __call__(self, x):
        for b in range(self.num_blocks):
            x = getattr(self, f'block{b + 1}')(x)
        return x


class ResNeXt(nnx.Module):
    """`models.ResNeXt` in NNX, with the same fields; `rngs` initialises the parameters and
    draws drop path and dropout. Built in training mode; `eval()` for inference."""

    def __init__(self, stage_sizes, cardinality=1, bottleneck_width=64, num_classes=1000,
                 stem='imagenet', stem_width=64, base_features=256, form='auto',
                 zero_init_last_bn=False, bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON,
                 bn_group_size=None, drop_path_rate=0.0, dropout=0.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, in_channels=3, *, rngs):
        if stem not in models.STEMS:
            raise ValueError(f'unknown stem {stem!r}; choose one of {", ".join(models.STEMS)}')
        self.stage_sizes, self.num_classes = tuple(stage_sizes), num_classes
        self.dtype = dtype
        norm = functools.partial(_norm, group_size=bn_group_size, momentum=bn_momentum,
                                 epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
        self.stem = Stem(stem, in_channels, stem_width, norm, dtype, param_dtype, rngs)
        features, stages = stem_width, {}
        for spec in models.block_layout(stage_sizes, cardinality, bottleneck_width,
                                        base_features, drop_path_rate):
            stages.setdefault(spec['stage'], []).append(Bottleneck(
                features, cardinality, spec['width'], spec['features'], spec['strides'], form,
                norm, zero_init_last_bn, dtype, param_dtype, spec['drop_path'], rngs))
            features = spec['features']
        for s, blocks in stages.items():
            setattr(self, f'stage{s + 1}', Stage(blocks))
        self.head = (nnx.Linear(features, num_classes, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if num_classes else None)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if num_classes and dropout else None

    def __call__(self, x, return_features=False):
        if x.ndim != 4:
            raise ValueError('expected a batch of NHWC images (batch, height, width, channels), '
                             f'got an array of shape {tuple(x.shape)}')
        x = self.stem(x)
        features = {}
        for s in range(len(self.stage_sizes)):
            x = getattr(self, f'stage{s + 1}')(x)
            features[f'C{s + 2}'] = x
        if return_features:
            return features
        x = jnp.mean(x, axis=(1, 2))
        if self.head is not None:
            if self.dropout is not None:
                x = self.dropout(x)
            x = self.head(x)
        return x.astype(jnp.float32)


def create_model(name, num_classes=None, *, rngs, **overrides):
    """An NNX `ResNeXt` by name, as `resnext_jax.create_model` builds the Linen one (same names,
    options and defaults), e.g. `create_model('resnext50_32x4d', rngs=nnx.Rngs(0))`."""
    return ResNeXt(**models.model_fields(name, num_classes, overrides), rngs=rngs)


def variables(model):
    """The model's weights as Linen variables: {'params': …, 'batch_stats': …} (numpy-free jax
    arrays, the same tree `models.ResNeXt.init` gives)."""
    return {'params': nnx.state(model, nnx.Param).to_pure_dict(),
            'batch_stats': nnx.state(model, nnx.BatchStat).to_pure_dict()}


def load_variables(model, variables):
    """Puts Linen variables ({'params', 'batch_stats'}) into `model`, in place; ValueError
    (one line) where their tree or shapes are not the model's."""
    for collection, kind in (('params', nnx.Param), ('batch_stats', nnx.BatchStat)):
        state = nnx.state(model, kind)
        ours = jax.tree_util.tree_map(jnp.shape, state.to_pure_dict())
        theirs = jax.tree_util.tree_map(jnp.shape, dict(variables.get(collection, {})))
        if ours != theirs:
            raise ValueError(f'the {collection} do not fit this network: its tree and shapes '
                             'differ from theirs (another network, options or classes?)')
        state.replace_by_pure_dict(jax.tree_util.tree_map(jnp.asarray, variables[collection]))
        nnx.update(model, state)
    return model


def from_linen(linen_model, variables, *, rngs=None):
    """The NNX model of a Linen `models.ResNeXt` with its variables."""
    fields = {f: getattr(linen_model, f) for f in models.OPTIONS}
    return load_variables(ResNeXt(**fields, rngs=rngs or nnx.Rngs(0)), variables)


def load_pretrained(name, *, rngs=None, **overrides):
    """(NNX model with the weights loaded, meta) of published weights by registry name, e.g.
    `load_pretrained('resnext50_32x4d.tv2_in1k')`: `resnext_jax.load_pretrained`'s weights and
    metadata (preprocessing, classes, published accuracy) in the NNX module."""
    from resnext_jax import pretrained   # noqa: PLC0415
    linen_model, weights, meta = pretrained.load_pretrained(name, **overrides)
    return from_linen(linen_model, weights, rngs=rngs), meta


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(model, optimizer, loss=cross_entropy):
    """(step, state): the model and its `nnx.Optimizer` split once into a graph and a flat
    state, and `step(state, images, labels) → (state, loss value)` jitted over that state (the
    graph merged inside, the state donated): one optimizer step in training mode. Put the
    result back with `nnx.update((model, optimizer), state)`. Graph-mode `nnx.jit` would walk
    the module graph on every call; this pays that once (docs/models.md measures both)."""
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        value, grads = nnx.value_and_grad(lambda m: loss(m(images), labels))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), value

    return step, state
