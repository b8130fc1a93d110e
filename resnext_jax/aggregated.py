"""The aggregated transformation of Eq. 3 and its equivalent forms (Fig. 3).

    y = x + Σ_{i=1..C} τ_i(x),    τ_i: 1×1 conv (→ d) · 3×3 conv (d → d) · 1×1 conv (d → out)

`AggregatedTransform` computes Σ τ_i(x) with batch norm after every convolution and ReLU after
the first two (the last ReLU follows the residual addition, in the block). It is the only place
in the package that knows about groups. Its parameters are always the compact form's:

    conv1/kernel  (1, 1, in, C·d)     bn1
    conv2/kernel  (3, 3, d, C·d)      bn2      (path i owns output channels i·d … i·d + d - 1)
    conv3/kernel  (1, 1, C·d, out)    bn3

and `form` only chooses how they are evaluated, so checkpoints move freely between forms:

    'paths'      (a) C separate paths, each 1×1 → 3×3 → 1×1, summed
    'concat'     (b) C separate 1×1 → 3×3 paths, concatenated, one 1×1
    'grouped'    (c) 1×1 → grouped 3×3 (`feature_group_count=C`) → 1×1
    'blockdiag'  1×1 → dense 3×3 with a block-diagonal kernel → 1×1
    'sliced'     1×1 → the 3×3 as dense convolutions over channel slices of at least
                 `SLICE_WIDTH` channels (whole groups each; block-diagonal within a slice) → 1×1
    'auto'       (default) 'sliced' on CPU (measured fastest there), 'grouped' on GPU and
                 TPU (XLA's native grouped convolution; not measured on them by this project)

Why 'sliced' on CPU: XLA:CPU runs a grouped convolution's forward pass group by group and
expands the weight gradient (a `batch_group_count` convolution) into a convolution G times
larger; a 16×56×56, 128-channel, 32-group 3×3 takes 0.37 s forward, 23.6 s forward+backward.
As 16 dense slices of 8 channels it takes 0.04 s / 0.15 s; as one block-diagonal dense
convolution 0.12 s / 1.16 s (`python -m resnext_jax.benchmark --layer` measures these).

Under a mesh (`jax.set_mesh`) the 3×3 runs per device on its own images
(`parallel.per_device`), in every form.

Batch norm and ReLU act on each channel alone, so applying them to the concatenated paths is
the same as giving each path its own.
"""
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.parallel import per_device

FORMS = ('auto', 'paths', 'concat', 'grouped', 'blockdiag', 'sliced')
SLICE_WIDTH = 8  # channels per slice in 'sliced' (rounded up to whole groups)

# He normal with fan-out, no truncation: the official code's `normal(0, sqrt(2 / (k·k·out)))`.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Batch norm's constants as the official code has them (torch momentum 0.1 = a running average
# kept at 0.9): the one definition, for this module and models.py. `default_norm` is inference
# mode; the networks pass their own norm.
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
default_norm = functools.partial(nn.BatchNorm, use_running_average=True, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON)


def conv(x, kernel, strides=1, groups=1):
    """NHWC convolution with an HWIO kernel and symmetric 'same' padding (as PyTorch pads).

    A 1×1 convolution is computed as a matrix product: the same numbers, and on XLA:CPU 3-5×
    faster forward and backward (16×56×56, 256→128: 0.92 s → 0.19 s forward+backward).
    """
    if kernel.shape[:2] == (1, 1) and groups == 1:
        return jnp.einsum('nhwc,co->nhwo', x[:, ::strides, ::strides], kernel[0, 0])
    pad = kernel.shape[0] // 2
    return lax.conv_general_dilated(
        x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def block_diagonal(kernel, groups):
    """A grouped kernel (kh, kw, d_in, G·d_out) as the dense kernel (kh, kw, G·d_in, G·d_out)."""
    kh, kw, d_in, out = kernel.shape
    k = kernel.reshape(kh, kw, d_in, groups, out // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    return jnp.einsum('hwigo,Gg->hwGigo', k, eye).reshape(kh, kw, groups * d_in, out)


def check_form(form):
    if form not in FORMS:
        raise ValueError(f'unknown form {form!r}; choose one of {", ".join(FORMS)}')
    return form


def resolve_form(form, backend=None):
    """The form that runs: 'auto' becomes the fastest on `backend` (default: JAX's)."""
    if check_form(form) != 'auto':
        return form
    return 'sliced' if (backend or jax.default_backend()) == 'cpu' else 'grouped'


def sliced_conv(x, kernel, groups, strides=1, min_width=SLICE_WIDTH):
    """A grouped convolution as dense convolutions over channel slices of ≥ `min_width`."""
    d = kernel.shape[2]
    per = min(-(-min_width // d), groups)  # groups per slice: a divisor of `groups`
    while groups % per:
        per += 1
    if per == groups:
        return conv(x, block_diagonal(kernel, groups), strides)
    slices = groups // per
    return jnp.concatenate([
        conv(xs, ks if per == 1 else block_diagonal(ks, per), strides)
        for xs, ks in zip(jnp.split(x, slices, -1), jnp.split(kernel, slices, -1))], -1)


class Kernel(nn.Module):
    """One convolution kernel, stored as `<name>/kernel` like `nn.Conv` stores it."""
    shape: tuple
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param('kernel', conv_init, self.shape, self.param_dtype)


class AggregatedTransform(nn.Module):
    """Σ_{i=1..C} τ_i(x) and its batch norm, for C = `cardinality` paths of width d = width / C."""
    cardinality: int
    width: int                    # C·d, the channels of the grouped 3×3 convolution
    features: int                 # output channels
    strides: int = 1              # in the 3×3 convolution, as in the official code
    form: str = 'auto'
    norm: Callable[..., nn.Module] = default_norm
    zero_init_last: bool = False  # start each block as the identity (γ = 0 in bn3)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C, form = self.cardinality, resolve_form(self.form)
        if self.width % C:
            raise ValueError(f'width {self.width} is not divisible by cardinality {C}')
        d = self.width // C
        w1 = Kernel((1, 1, x.shape[-1], self.width), self.param_dtype, name='conv1')()
        w2 = Kernel((3, 3, d, self.width), self.param_dtype, name='conv2')()
        w3 = Kernel((1, 1, self.width, self.features), self.param_dtype, name='conv3')()
        x, w1, w2, w3 = nn.dtypes.promote_dtype(x, w1, w2, w3, dtype=self.dtype)
        bn1, bn2 = self.norm(name='bn1'), self.norm(name='bn2')
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        bn3 = self.norm(name='bn3', scale_init=last_scale)
        return aggregated_branch(x, w1, w2, w3, bn1, bn2, bn3, C, self.strides, form)


def aggregated_branch(x, w1, w2, w3, bn1, bn2, bn3, cardinality, strides=1, form='grouped'):
    """Eq. 3 without the shortcut: Σ_{i=1..C} τ_i(x) and its batch norm, each τ_i a 1×1
    convolution to d channels, a 3×3 d → d (stride `strides`) and a 1×1 to the output, with
    batch norm and ReLU after the first two and batch norm after the sum: in the form `form`
    (resolved: not 'auto'), from the kernels w1 (1, 1, in, C·d), w2 (3, 3, d, C·d), w3 (1, 1,
    C·d, out) and the three norms (callables). The Linen and NNX modules both call it."""
    C = cardinality

    def split(a, axis=-1):
        return jnp.split(a, C, axis=axis)

    def transform_3x3(h, w2):  # the only layer whose form matters
        if form == 'grouped':
            return conv(h, w2, strides, groups=C)
        if form == 'sliced':
            return sliced_conv(h, w2, C, strides)
        if form == 'blockdiag':
            return conv(h, block_diagonal(w2, C), strides)
        return jnp.concatenate(   # 'paths', 'concat': one 3×3 per path
            [conv(hi, wi, strides) for hi, wi in zip(split(h), split(w2))], -1)

    if form in ('paths', 'concat'):
        h = jnp.concatenate([conv(x, w) for w in split(w1)], -1)
    else:
        h = conv(x, w1)
    h = nn.relu(bn2(per_device(transform_3x3, nn.relu(bn1(h)), w2)))
    if form == 'paths':
        y = sum(conv(hi, wi) for hi, wi in zip(split(h), split(w3, axis=2)))
    else:
        y = conv(h, w3)
    return bn3(y)
