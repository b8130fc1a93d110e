"""ResNeXt networks (Sec. 3.1 template) and the name registry.

A network is named by its depth (→ stage sizes), cardinality C and bottleneck width d. Stage s
(s = 0, 1, …) repeats one block: aggregated transformation of width C·d·2^s with output
`base_features`·2^s; the first block of every stage but the first has stride 2 in its 3×3 conv
and a projection shortcut. ResNet is C = 1. ImageNet and CIFAR networks differ only in the stem.
"""
import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.aggregated import (BN_EPSILON, BN_MOMENTUM, AggregatedTransform, Kernel,
                                    check_form, conv, default_norm)

# Depth 26 is timm's resnet26 (two blocks a stage); the paper's are 50, 101, 152 and 200.
IMAGENET_STAGES = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
                   200: (3, 24, 36, 3)}
CIFAR_STAGES = {29: (3, 3, 3)}
STEMS = ('imagenet', 'cifar')


class GroupedBatchNorm(nn.Module):
    """Batch norm whose training statistics come from groups of `group_size` consecutive images.

    This is what unsynchronised BN on several GPUs computes (the paper: 32 images per GPU). The
    variables are those of `nn.BatchNorm`; the running averages move towards the mean over groups
    of the per-group mean and (biased) variance.

    The activation is never regrouped: one pass reads it for every image's per-channel mean and
    mean square (float32 reductions over height and width, as `nn.BatchNorm` computes its
    statistics), the small (images, channels) arrays are then grouped, and each image is
    normalised with its group's statistics broadcast to it. Reshaping the activation's batch
    axis into (groups, group_size) instead, as this class once did, costs a relayout copy of
    every batch norm input on TPU, whose layouts tile the batch axis together with the channels:
    about twice the memory traffic and memory of the whole training step.
    """
    group_size: int
    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
        bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
        y, stats = grouped_batch_norm(x, scale, bias, ra_mean.value, ra_var.value,
                                      self.group_size, self.epsilon, self.momentum,
                                      not self.use_running_average)
        if stats is not None and not self.is_initializing():
            ra_mean.value, ra_var.value = stats
        return y.astype(self.dtype)


def grouped_batch_norm(x, scale, bias, mean, var, group_size, epsilon, momentum, training):
    """`GroupedBatchNorm`'s arithmetic, which the Linen and NNX modules both call: (the float32
    output, (new running mean, new running var) in training or None)."""
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if not training:
        return (x32 - mean) * (lax.rsqrt(var + epsilon) * scale) + bias, None
    n, g = x.shape[0], group_size
    if n % g:
        raise ValueError(f'batch norm groups of {g} images do not divide the batch of {n} '
                         'images; change bn_group_size or the batch size')
    axes = tuple(range(1, x.ndim - 1))
    per_image = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)   # (n, c) each
    group_mean, mean_sq = (s.reshape(n // g, g, c).mean(1) for s in per_image)  # (groups, c)
    group_var = jnp.maximum(0.0, mean_sq - jnp.square(group_mean))   # as nn.BatchNorm does
    stats = (momentum * mean + (1 - momentum) * group_mean.mean(0),
             momentum * var + (1 - momentum) * group_var.mean(0))
    # y = x·a + b per image, a and b its group's: the backward pass then keeps x, which the
    # convolution's gradient keeps anyway, not a float32 copy of x − mean.
    a = lax.rsqrt(group_var + epsilon) * scale
    a, b = (jnp.repeat(t, g, 0).reshape((n,) + (1,) * (x.ndim - 2) + (c,))
            for t in (a, bias - group_mean * a))
    return x32 * a + b, stats

class Stem(nn.Module):
    """ImageNet: 7×7/2 conv, BN, ReLU, 3×3/2 max-pool. CIFAR: 3×3 conv, BN, ReLU."""
    kind: str
    features: int
    norm: Callable[..., nn.Module]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        size, strides, pool = stem_layout(self.kind)
        w = Kernel((size, size, x.shape[-1], self.features), self.param_dtype, name='conv')()
        x, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
        x = nn.relu(self.norm(name='bn')(conv(x, w, strides)))
        return max_pool_3x3_s2(x) if pool else x


def stem_layout(kind):
    """(kernel size, stride, whether a 3×3/2 max-pool follows) of the stem `kind`."""
    return (7, 2, True) if kind == 'imagenet' else (3, 1, False)


def max_pool_3x3_s2(x):
    """3×3 max-pool, stride 2, padding 1, as the maximum of nine strided slices: the same
    values as `nn.max_pool`, and on XLA:CPU 4× faster forward+backward than its
    select-and-scatter gradient (16×112×112×64: 0.30 s → 0.08 s)."""
    h, w = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return functools.reduce(jnp.maximum, [xp[:, i:i + 2 * h:2, j:j + 2 * w:2]
                                          for i in range(3) for j in range(3)])


def drop_path(x, rate, rng):
    """Stochastic depth (Huang et al. 2016) as timm's `drop_path`: each image's `x` is zeroed
    with probability `rate` and otherwise scaled by 1 / (1 - rate), which keeps the
    expectation. One draw per image over the global batch axis: jax's threefry is
    partitionable (the default in jax 0.10), so the mask does not depend on the sharding."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path_rates(rate, num_blocks):
    """timm's linear rule (`make_blocks` in timm/models/resnet.py): block i of N gets
    rate · i / (N - 1), the first block 0 and the last `rate`; a single block gets 0."""
    return tuple(rate * i / max(num_blocks - 1, 1) for i in range(num_blocks))


def block_layout(stage_sizes, cardinality, bottleneck_width, base_features, drop_path_rate=0.0):
    """The template (Sec. 3.1), one dict per block in order, for both front ends: its 'stage'
    and 'block' (from 0), the aggregated 'width' C·d·2^s, the output 'features' base·2^s,
    'strides' (2 in the first block of every stage but the first) and its 'drop_path' rate."""
    rates = drop_path_rates(drop_path_rate, sum(stage_sizes))
    layout = []
    for s, num_blocks in enumerate(stage_sizes):
        for b in range(num_blocks):
            layout.append(dict(stage=s, block=b, width=cardinality * bottleneck_width * 2**s,
                               features=base_features * 2**s,
                               strides=2 if s and not b else 1, drop_path=rates[len(layout)]))
    return layout


class Bottleneck(nn.Module):
    """y = relu(shortcut(x) + Σ τ_i(x)); projection shortcut when the shape changes.

    `drop_path` > 0 and `train`: the branch Σ τ_i(x) goes through `drop_path` (rng stream
    'dropout'), where timm applies it, after the last batch norm and before the addition."""
    cardinality: int
    width: int
    features: int
    strides: int = 1
    form: str = 'auto'
    norm: Callable[..., nn.Module] = default_norm
    zero_init_last: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    drop_path: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            w = Kernel((1, 1, x.shape[-1], self.features), self.param_dtype, name='proj_conv')()
            xs, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
            shortcut = self.norm(name='proj_bn')(conv(xs, w, self.strides))
        y = AggregatedTransform(
            self.cardinality, self.width, self.features, self.strides, self.form, self.norm,
            self.zero_init_last, self.dtype, self.param_dtype, name='aggregated')(x)
        if self.drop_path and self.train:
            y = drop_path(y, self.drop_path, self.make_rng('dropout'))
        return nn.relu(shortcut + y)


class Stage(nn.Module):
    """`num_blocks` blocks of one width; the first one may stride and project. Block b gets
    the drop-path rate `drop_path_rates[b]` (none: 0)."""
    num_blocks: int
    strides: int
    block: Callable[..., nn.Module]
    drop_path_rates: Sequence[float] = ()

    @nn.compact
    def __call__(self, x):
        for b in range(self.num_blocks):
            rate = self.drop_path_rates[b] if self.drop_path_rates else 0.0
            x = self.block(strides=self.strides if b == 0 else 1, drop_path=rate,
                           name=f'block{b + 1}')(x)
        return x


class ResNeXt(nn.Module):
    """ResNeXt (ResNet when cardinality = 1), NHWC images in, float32 logits out.

    `model.apply(variables, images, train=True, mutable=['batch_stats'])` trains;
    `return_features=True` returns the stage outputs {'C2', 'C3', …} (strides 4, 8, 16, 32 on
    ImageNet) instead of logits, for detection and segmentation backbones; `num_classes=0`
    returns the globally pooled features.

    Training regularisers (timm's `drop_path_rate` and `drop_rate`), active only with
    `train=True` and then drawing from the rng stream 'dropout' (`rngs={'dropout': key}`):
    `drop_path_rate` is stochastic depth on every block's branch, the rate linear in the
    block's depth (`drop_path_rates`); `dropout` is dropout on the pooled features before the
    classifier. At 0, their default, the network is as without them.
    """
    stage_sizes: Sequence[int]
    cardinality: int = 1
    bottleneck_width: int = 64
    num_classes: int = 1000
    stem: str = 'imagenet'
    stem_width: int = 64
    base_features: int = 256
    form: str = 'auto'
    zero_init_last_bn: bool = False
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    bn_group_size: int | None = None  # training BN statistics per group of images, not batch
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        if x.ndim != 4:
            raise ValueError('expected a batch of NHWC images (batch, height, width, channels), '
                             f'got an array of shape {tuple(x.shape)}')
        if self.stem not in STEMS:
            raise ValueError(f'unknown stem {self.stem!r}; choose one of {", ".join(STEMS)}')
        check_form(self.form)
        norm = functools.partial(
            functools.partial(GroupedBatchNorm, self.bn_group_size) if self.bn_group_size
            else nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Stem(self.stem, self.stem_width, norm, self.dtype, self.param_dtype, name='stem')(x)
        features = {}
        layout = block_layout(self.stage_sizes, self.cardinality, self.bottleneck_width,
                              self.base_features, self.drop_path_rate)
        for s in range(len(self.stage_sizes)):
            blocks = [b for b in layout if b['stage'] == s]
            block = functools.partial(
                Bottleneck, cardinality=self.cardinality, width=blocks[0]['width'],
                features=blocks[0]['features'], form=self.form, norm=norm,
                zero_init_last=self.zero_init_last_bn, dtype=self.dtype,
                param_dtype=self.param_dtype, train=train)
            x = Stage(len(blocks), blocks[0]['strides'], block,
                      tuple(b['drop_path'] for b in blocks), name=f'stage{s + 1}')(x)
            features[f'C{s + 2}'] = x
        if return_features:
            return features
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes:
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                         name='head')(x)
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Registry: every network of the paper's Tables 1, 3, 4, 5, 7 and Fig. 7, plus torchvision's
# resnext101_32x8d. Any other `resnext{29,50,101,152,200}_<C>x<d>d` name is built on demand.
# ----------------------------------------------------------------------------------------------

REGISTERED = (
    'resnet50', 'resnet101', 'resnet152', 'resnet200', 'resnet101_1x100d',
    'resnext50_2x40d', 'resnext50_4x24d', 'resnext50_8x14d', 'resnext50_32x4d',
    'resnext101_2x40d', 'resnext101_4x24d', 'resnext101_8x14d', 'resnext101_32x4d',
    'resnext101_2x64d', 'resnext101_64x4d', 'resnext101_32x8d', 'resnext152_32x4d',
    'resnext29_1x64d', 'resnext29_2x64d', 'resnext29_4x64d', 'resnext29_8x64d',
    'resnext29_16x64d',
)
_NAME = re.compile(r'(resnet|resnext)(\d+)(?:_(\d+)x(\d+)d)?')
OPTIONS = tuple(f.name for f in dataclasses.fields(ResNeXt) if f.name not in ('parent', 'name'))


def list_models():
    """The registered network names."""
    return list(REGISTERED)


def model_spec(name):
    """The ResNeXt fields that a network name stands for."""
    m = _NAME.fullmatch(name)
    depth = int(m.group(2)) if m else None
    if not m or depth not in {**IMAGENET_STAGES, **CIFAR_STAGES}:
        raise ValueError(
            f'unknown model {name!r}; use one of list_models() (python -m resnext_jax.summary '
            '--list prints them) or resnext<depth>_<C>x<d>d with depth in '
            f'{sorted(IMAGENET_STAGES)} (ImageNet) or {sorted(CIFAR_STAGES)} (CIFAR)')
    family, c, d = m.group(1), m.group(3), m.group(4)
    cardinality, width = (int(c), int(d)) if c else (1, 64)
    if family == 'resnext' and not c:
        raise ValueError(f'{name!r} needs a cardinality and width, e.g. {name}_32x4d')
    if family == 'resnet' and cardinality != 1:
        raise ValueError(f'{name!r}: a ResNet has cardinality 1; did you mean resnext{depth}_…?')
    cifar = depth in CIFAR_STAGES
    return dict(stage_sizes=(CIFAR_STAGES if cifar else IMAGENET_STAGES)[depth],
                cardinality=cardinality, bottleneck_width=width,
                stem='cifar' if cifar else 'imagenet', num_classes=10 if cifar else 1000)


def create_model(name, num_classes=None, **overrides):
    """A `ResNeXt` module by name, e.g. `create_model('resnext50_32x4d', dtype='bfloat16')`.

    `num_classes` defaults to 1000 for ImageNet networks and 10 for CIFAR ones; `overrides` set
    any other `ResNeXt` field (cardinality, bottleneck_width, form, dtype, ...).
    """
    return ResNeXt(**model_fields(name, num_classes, overrides))


def model_fields(name, num_classes=None, overrides=None):
    """The `ResNeXt` fields of network `name` with `overrides` (dtype names as dtypes); the
    Linen and NNX `create_model` both build from them. TypeError for an unknown option."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise TypeError(f'create_model: unknown option(s) {", ".join(unknown)}; '
                        f'valid options: {", ".join(OPTIONS)}')
    spec = model_spec(name)
    if num_classes is not None:
        spec['num_classes'] = num_classes
    for key in ('dtype', 'param_dtype'):
        if isinstance(overrides.get(key), str):
            overrides[key] = jnp.dtype(overrides[key])
    return {**spec, **overrides}
