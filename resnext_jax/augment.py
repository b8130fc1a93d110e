"""Per-pixel training augmentation on the accelerators, inside the jitted training step.

With `augment_on='device'` (which the default 'auto' is, but for auto-augment on TPUs:
`image_settings.augment_place`) the host's input pipeline (`resnext_jax.preprocess`) reads,
decodes the crop, resizes and flips, and sends uint8 pixels; everything per pixel after
that runs here, in the order the host would run it: the official code's colour jitter and PCA
lighting, RandAugment or TrivialAugment-Wide (`resnext_jax.policies`), normalisation, random
erasing; Mixup/CutMix follow in the step (`resnext_jax.mixup`). On the host these cost 1–3 ms
of a core per image, which halves the images each host core feeds; in the step, a small share
of the step (docs/input.md, docs/pods.md).

Each image is augmented alone (a `vmap` over the batch, which stays split over 'data' as the
batch is: no cross-device traffic), with a key that is a function of (seed, step, its row in
the global batch) only, so that a resumed run and any number of processes draw the same.

The ops hold the same definitions as the host's (`resnext_jax.autoaugment`,
`preprocess._colour`), which follow PIL as timm and torchvision run it on uint8 images, and the
tests hold both to the same references (Pillow, timm, torchvision). A RandAugment or
TrivialAugment-Wide layer applies one op per image, but a batch holds every op at once: each
layer runs as one look-up table (invert, posterize, solarize, autocontrast, equalize), one
blend with a degenerate image (brightness, colour, contrast, sharpness) and one affine warp
(shear, translate, rotate), each the identity for the images whose op is another, so its cost
does not grow with the number of ops in the policy.

Where we differ from the host (all within one grey level):
  * colour noise and lighting start from the flipped crop rounded to whole grey levels (the
    host adds them before rounding);
  * PIL computes the autocontrast table in double precision, which lands one level below the
    exact value for 0.14 % of (min, max, value) triples; here the exact integer value;
  * coordinates of the affine warps are float32 (PIL's: double).
"""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax import policies
from resnext_jax.image_settings import PCA_EIGVAL, PCA_EIGVEC, normalisation, on_device, per_pixel

F32, I32 = jnp.float32, jnp.int32
LUMA = (0.299, 0.587, 0.114)                 # the official code's grey for colour jitter
# preprocess._colour's six orders of (brightness, contrast, saturation), in its order.
COLOUR_ORDERS = tuple(itertools.permutations(range(3)))
NEAREST, BILINEAR = 'NEAREST', 'BILINEAR'


# ---- colour noise (fb.resnet.torch, as preprocess._colour) ----------------------------------

def _luma(image):
    return image[..., 0] * LUMA[0] + image[..., 1] * LUMA[1] + image[..., 2] * LUMA[2]


def colour_jitter(image, alphas, order):
    """Brightness, contrast and saturation with factors `alphas` (3,), applied in `order` (a
    row of COLOUR_ORDERS): blends with black, the mean grey and the grey image."""
    for slot in range(3):
        op = order[slot]
        grey = _luma(image)
        other = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(grey), grey))[..., None]
        alpha = alphas[op]
        image = image * alpha + other * (1 - alpha)
    return image


def colour_draws(key, strength):
    """The official code's colour jitter draws: factors U(1 − s, 1 + s) and one of the six
    orders, uniformly."""
    order_key, alpha_key = jax.random.split(key)
    return {'alphas': jax.random.uniform(alpha_key, (3,), F32, 1 - strength, 1 + strength),
            'order': jax.random.randint(order_key, (), 0, len(COLOUR_ORDERS))}


def lighting(image, alpha):
    """AlexNet's PCA lighting: + 255 · eigvec · (alpha · eigval) to every pixel (0..255)."""
    eigvec, weights = np.asarray(PCA_EIGVEC, np.float32), alpha * jnp.asarray(PCA_EIGVAL, F32)
    # Three products summed by hand: jaxlib 0.10.2's XLA:CPU computes a reduction over this
    # axis of 3 wrongly once fused with the broadcast to the pixels of over ~1,300 images.
    rgb = sum(eigvec[:, j] * weights[j] for j in range(3))
    return image + 255.0 * rgb


# ---- the auto-augment ops: float32 (H, W, 3) whole numbers in 0..255 → the same --------------

LEVELS = np.arange(256)


def lookup(image, lut):
    """Per-channel look-up: lut (3, 256) of image (H, W, 3) whole numbers."""
    index = image.astype(I32) + jnp.array([0, 256, 512], I32)
    return jnp.take(lut.reshape(-1).astype(F32), index, mode='clip')


def invert_lut():
    return jnp.broadcast_to(255.0 - LEVELS.astype(np.float32), (3, 256))


def posterize_lut(bits):
    """ImageOps.posterize: keep the `bits` high bits (clipped to 0..8; 0 gives black)."""
    step = 2.0 ** (8.0 - jnp.clip(jnp.asarray(bits, F32), 0.0, 8.0))
    return jnp.broadcast_to(jnp.floor(LEVELS / step) * step, (3, 256))


def solarize_lut(threshold):
    """ImageOps.solarize: values ≥ threshold inverted."""
    levels = jnp.asarray(LEVELS, F32)
    return jnp.broadcast_to(jnp.where(levels < threshold, levels, 255.0 - levels), (3, 256))


def solarize_add_lut(add, threshold=128):
    """timm `solarize_add`: values < threshold get `add`, up to 255."""
    levels = jnp.asarray(LEVELS, F32)
    added = jnp.minimum(levels + add, 255.0)
    return jnp.broadcast_to(jnp.where(levels < threshold, added, levels), (3, 256))


def auto_contrast_lut(low, high):
    """ImageOps.autocontrast (cutoff 0) per channel: ⌊(v − min) · 255 / (max − min)⌋ clipped
    to 0..255, exactly (integers); the identity for a constant channel."""
    low, high = low.astype(I32)[:, None], high.astype(I32)[:, None]
    levels = jnp.asarray(LEVELS, I32)[None]
    lut = jnp.clip((levels - low) * 255 // jnp.maximum(high - low, 1), 0, 255)
    return jnp.where(high > low, lut, levels)


def histogram(image):
    """(3, 256) int32 counts of each channel's whole values. On TPUs a small matrix product
    (`histogram_by_product`: their matrix units count; their scatters are slow), elsewhere a
    scatter-add (GPUs' atomics; on XLA:CPU 35× faster than the product)."""
    return jax.lax.platform_dependent(image, tpu=histogram_by_product,
                                      default=histogram_by_scatter)


def histogram_by_scatter(image):
    index = image.astype(I32) + jnp.array([0, 256, 512], I32)
    return jnp.zeros(768, I32).at[index.reshape(-1)].add(1).reshape(3, 256)


def histogram_by_product(image):
    """Two one-hots of 16 (each value's high and low four bits) multiplied: 32 comparisons per
    pixel instead of 256, and the counting (0/1 products summed in float32: exact) on the
    matrix units."""
    values = image.reshape(-1, 3).astype(I32)
    sixteen = jnp.arange(16, dtype=I32)
    high = (values[..., None] >> 4 == sixteen).astype(F32)      # (P, 3, 16)
    low = (values[..., None] & 15 == sixteen).astype(F32)
    counts = jnp.einsum('pca,pcb->cab', high, low, preferred_element_type=F32)
    return counts.reshape(3, 256).astype(I32)


def equalize_lut(hist):
    """ImageOps.equalize per channel: step = (pixels − count of the top value) // 255,
    LUT[i] = (step // 2 + pixels below i) // step (at most 255), identity when step is 0."""
    levels = jnp.asarray(LEVELS, I32)
    present = hist > 0
    top = 255 - jnp.argmax(present[:, ::-1], axis=1)                   # the largest value
    top_count = jnp.take_along_axis(hist, top[:, None], axis=1)
    step = (jnp.sum(hist, 1, keepdims=True) - top_count) // 255
    below = jnp.cumsum(hist, 1) - hist
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut, levels[None])


def pil_grey(image):
    """PIL's RGB → L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, as float32 whole numbers."""
    rgb = image.astype(I32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768)
            >> 16).astype(F32)


def grey_mean(image):
    """ImageEnhance.Contrast's mean: int(mean of the L image + 0.5), in integers."""
    total = jnp.sum(pil_grey(image).astype(I32))
    count = image.shape[0] * image.shape[1]
    return ((2 * total + count) // (2 * count)).astype(F32)


def smooth(image):
    """ImageFilter.SMOOTH (3×3 kernel 1 1 1 / 1 5 1 / 1 1 1, ÷ 13, rounded); the border pixels
    stay as they are."""
    rows = image[:-2] + image[1:-1] + image[2:]                 # whole sums: exact in float32
    total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * image[1:-1, 1:-1]
    inner = jnp.round(total / 13.0)
    return image.at[1:-1, 1:-1].set(inner)


def blend(degenerate, image, factor):
    """Image.blend(degenerate, image, factor) on uint8: truncated, clipped to 0..255."""
    return jnp.clip(jnp.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def affine(image, matrix, fill, interpolation):
    """Image.transform(size, AFFINE, matrix, resample, fillcolor=fill): output pixel (i, j)
    samples the input at (a x + b y + c, d x + e y + f) for its centre (x, y) = (j + 0.5,
    i + 0.5); points outside [0, W) × [0, H) get `fill`, bilinear neighbours beyond the edges
    are clamped and values truncated, as PIL's. `interpolation`: NEAREST or BILINEAR."""
    h, w = image.shape[0], image.shape[1]
    a, b, c, d, e, f = (jnp.asarray(v, F32) for v in matrix)
    xs = jnp.arange(w, dtype=F32)[None, :] + 0.5
    ys = jnp.arange(h, dtype=F32)[:, None] + 0.5
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    pixels = image.reshape(h * w, 3)

    def at(row, col):
        index = jnp.clip(row, 0, h - 1) * w + jnp.clip(col, 0, w - 1)
        return jnp.take(pixels, index.reshape(-1), axis=0, mode='clip').reshape(h, w, 3)

    if interpolation == NEAREST:
        out = at(jnp.floor(y_in).astype(I32), jnp.floor(x_in).astype(I32))
    else:
        x_in, y_in = x_in - 0.5, y_in - 0.5
        x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
        dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
        col, row = x0.astype(I32), y0.astype(I32)
        top, right_top = at(row, col), at(row, col + 1)
        bottom, right_bottom = at(row + 1, col), at(row + 1, col + 1)
        upper = top + (right_top - top) * dx                # PIL: a + (b − a) · d
        lower = bottom + (right_bottom - bottom) * dx
        # a hair above, so float32 lands on whole values PIL hits (as autoaugment.affine)
        out = jnp.clip(jnp.floor(upper + (lower - upper) * dy + 1e-3), 0.0, 255.0)
    return jnp.where(inside[..., None], out, jnp.asarray(fill, F32))


def shear_x_matrix(factor):
    return (1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y_matrix(factor):
    return (1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_matrix(dx, dy):
    """The content moves by (−dx, −dy) pixels."""
    return (1.0, 0.0, dx, 0.0, 1.0, dy)


def rotate_matrix(degrees, size):
    """Image.rotate(degrees) (counter-clockwise about (W/2, H/2), same size); cos and sin below
    1e-7 are 0, as PIL's rounding to 15 decimals makes them at multiples of 90°."""
    h, w = size
    angle = -jnp.asarray(degrees, F32) * (math.pi / 180.0)
    cos, sin = (jnp.where(jnp.abs(v) < 1e-7, 0.0, v) for v in (jnp.cos(angle), jnp.sin(angle)))
    cx, cy = w / 2.0, h / 2.0
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# Single ops, as autoaugment's (the tests hold each to Pillow).

def invert(image):
    return lookup(image, invert_lut())


def posterize(image, bits):
    return lookup(image, posterize_lut(bits))


def solarize(image, threshold):
    return lookup(image, solarize_lut(threshold))


def solarize_add(image, add, threshold=128):
    return lookup(image, solarize_add_lut(add, threshold))


def auto_contrast(image):
    return lookup(image, auto_contrast_lut(jnp.min(image, (0, 1)), jnp.max(image, (0, 1))))


def equalize(image):
    return lookup(image, equalize_lut(histogram(image)))


def brightness(image, factor):
    return blend(jnp.zeros_like(image), image, factor)


def color(image, factor):
    return blend(pil_grey(image)[..., None], image, factor)


def contrast(image, factor):
    return blend(grey_mean(image), image, factor)


def sharpness(image, factor):
    return blend(smooth(image), image, factor)


def shear_x(image, factor, fill, interpolation):
    return affine(image, shear_x_matrix(factor), fill, interpolation)


def shear_y(image, factor, fill, interpolation):
    return affine(image, shear_y_matrix(factor), fill, interpolation)


def translate(image, dx, dy, fill, interpolation):
    return affine(image, translate_matrix(dx, dy), fill, interpolation)


def rotate(image, degrees, fill, interpolation):
    return affine(image, rotate_matrix(degrees, image.shape[:2]), fill, interpolation)


# ---- policies: each op as a table, a blend or a warp with its arguments ----------------------

@dataclasses.dataclass(frozen=True)
class Table:
    """A look-up-table op: lut(stats, m, s) → (3, 256); `stats` names what it reads of the
    image: 'range' (per-channel min and max), 'hist' (`histogram`)."""
    lut: object
    stats: tuple = ()


@dataclasses.dataclass(frozen=True)
class Blend:
    """An ImageEnhance op: a blend with `degenerate` (one of DEGENERATES) by factor(m, s)."""
    degenerate: str
    factor: object


@dataclasses.dataclass(frozen=True)
class Warp:
    """An affine op: matrix(m, s) → its six coefficients."""
    matrix: object


IDENTITY = Table(lambda stats, m, s: jnp.broadcast_to(jnp.asarray(LEVELS, F32), (3, 256)))
IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
DEGENERATES = {'black': jnp.zeros_like, 'mean': grey_mean,    # what each enhance op blends with
               'grey': lambda image: pil_grey(image)[..., None], 'smooth': smooth}


AUTO_CONTRAST = Table(lambda st, m, s: auto_contrast_lut(st['low'], st['high']), ('range',))
EQUALIZE = Table(lambda st, m, s: equalize_lut(st['hist']), ('hist',))


def _rand_ops(size):
    """timm's ops with their level-to-arg functions (`LEVEL_TO_ARG`), m the magnitude (noised
    and clipped), s the sign ±1."""
    h, w = size

    def level(m):
        return m / policies.LEVEL_DENOM

    def enhance(degenerate):            # timm `_enhance_level_to_arg`: [0.1, 1.9]
        return Blend(degenerate, lambda m, s: level(m) * 1.8 + 0.1)

    def enhance_increasing(degenerate):  # timm `_enhance_increasing_level_to_arg`: 1 ± 0.9 l
        return Blend(degenerate, lambda m, s: jnp.maximum(1.0 + s * level(m) * 0.9, 0.1))

    def bits(m):                        # timm `_posterize_level_to_arg`: int(level · 4)
        return jnp.floor(level(m) * 4)

    def threshold(m):                   # timm `_solarize_level_to_arg`: min(256, int(l · 256))
        return jnp.minimum(jnp.floor(level(m) * 256), 256.0)

    return {
        'AutoContrast': AUTO_CONTRAST, 'Equalize': EQUALIZE,
        'Invert': Table(lambda st, m, s: invert_lut()),
        'Rotate': Warp(lambda m, s: rotate_matrix(s * level(m) * 30.0, size)),   # ±30°·level
        'Posterize': Table(lambda st, m, s: posterize_lut(bits(m))),
        'PosterizeIncreasing': Table(lambda st, m, s: posterize_lut(4 - bits(m))),
        'Solarize': Table(lambda st, m, s: solarize_lut(threshold(m))),
        'SolarizeIncreasing': Table(lambda st, m, s: solarize_lut(256 - threshold(m))),
        # timm `_solarize_add_level_to_arg`: min(128, int(level · 110)), threshold 128
        'SolarizeAdd': Table(lambda st, m, s: solarize_add_lut(
            jnp.minimum(jnp.floor(level(m) * 110), 128.0))),
        'Color': enhance('grey'), 'ColorIncreasing': enhance_increasing('grey'),
        'Contrast': enhance('mean'), 'ContrastIncreasing': enhance_increasing('mean'),
        'Brightness': enhance('black'), 'BrightnessIncreasing': enhance_increasing('black'),
        'Sharpness': enhance('smooth'), 'SharpnessIncreasing': enhance_increasing('smooth'),
        'ShearX': Warp(lambda m, s: shear_x_matrix(s * level(m) * 0.3)),    # ±0.3·level
        'ShearY': Warp(lambda m, s: shear_y_matrix(s * level(m) * 0.3)),
        # timm `_translate_rel_level_to_arg` (translate_pct 0.45) × the image side
        'TranslateXRel': Warp(lambda m, s: translate_matrix(s * level(m) * 0.45 * w, 0.0)),
        'TranslateYRel': Warp(lambda m, s: translate_matrix(0.0, s * level(m) * 0.45 * h)),
    }


def torch_linspace(top, bins):
    """torch.linspace(0, top, bins) as torch computes it in float32: k·step below bins // 2,
    top − (bins − 1 − k)·step (fused) above; so TranslateX's bin 15 is 15.999999, which int()
    makes 15 pixels. A constant table: the bins are known when tracing."""
    top = np.float64(np.float32(top))
    step = np.float64(np.float32(top) / np.float32(bins - 1))
    k = np.arange(bins, dtype=np.float64)
    return np.where(k < bins // 2, k * step, top - (bins - 1 - k) * step).astype(np.float32)


def _ta_wide_ops(size, bins):
    """torchvision's TrivialAugment-Wide ops (`_augmentation_space`), m the bin (0..bins − 1),
    s the sign ±1."""
    def table(top):
        values = jnp.asarray(torch_linspace(top, bins))
        return lambda k: values[k]

    shear, shift, degrees, factor, solar = (table(t) for t in (0.99, 32.0, 135.0, 0.99, 255.0))
    # 8 − round(k / ((bins − 1) / 6)): 8 (identity) down to 2 bits
    bits = jnp.asarray(8 - np.round(np.arange(bins, dtype=np.float32)
                                    / np.float32((bins - 1) / 6)), F32)

    def enhance(degenerate):             # 1 ± linspace(0, 0.99)
        return Blend(degenerate, lambda k, s: 1.0 + s * factor(k))

    return {
        'Identity': IDENTITY,
        # F.affine shear=atan(m) in degrees, centre (0, 0): the inverse matrix (1, m, 0, ...)
        'ShearX': Warp(lambda k, s: shear_x_matrix(s * shear(k))),
        'ShearY': Warp(lambda k, s: shear_y_matrix(s * shear(k))),
        # F.affine translate=[int(±linspace(0, 32))]: the content moves by it
        'TranslateX': Warp(lambda k, s: translate_matrix(-s * jnp.floor(shift(k)), 0.0)),
        'TranslateY': Warp(lambda k, s: translate_matrix(0.0, -s * jnp.floor(shift(k)))),
        'Rotate': Warp(lambda k, s: rotate_matrix(s * degrees(k), size)),
        'Brightness': enhance('black'), 'Color': enhance('grey'),
        'Contrast': enhance('mean'), 'Sharpness': enhance('smooth'),
        'Posterize': Table(lambda st, k, s: posterize_lut(bits[k])),
        'Solarize': Table(lambda st, k, s: solarize_lut(255.0 - solar(k))),
        'AutoContrast': AUTO_CONTRAST, 'Equalize': EQUALIZE,
    }


def _signs(key, shape):
    """±1, −1 with probability 1/2 (timm `_randomly_negate`, torchvision's coin)."""
    return jnp.where(jax.random.uniform(key, shape) < 0.5, 1.0, -1.0).astype(F32)


def rand_augment_draws(policy, key):
    """RandAugment's random choices, one per layer, as `autoaugment.rand_augment_draws`: `ops`
    (int32 [n], an index of policy.ops, uniform with replacement, or len(policy.ops) where the
    layer is skipped, with probability 1 − prob), `magnitudes` ([n], noised as timm's
    `AugmentOp` does, then clipped to [0, magnitude_max]) and `signs` (±1, [n])."""
    n, count = policy.num_layers, len(policy.ops)
    op_key, apply_key, noise_key, sign_key = jax.random.split(key, 4)
    ops = jax.random.randint(op_key, (n,), 0, count)
    applied = jax.random.uniform(apply_key, (n,)) < policy.prob
    m = jnp.full((n,), float(policy.magnitude), F32)
    if policy.magnitude_std == math.inf:     # timm: uniform in [0, magnitude]
        m = m * jax.random.uniform(noise_key, (n,))
    elif policy.magnitude_std > 0:           # timm: gauss(magnitude, magnitude_std)
        m = m + policy.magnitude_std * jax.random.normal(noise_key, (n,))
    return {'ops': jnp.where(applied, ops, count),
            'magnitudes': jnp.clip(m, 0.0, float(policy.magnitude_max)),
            'signs': _signs(sign_key, (n,))}


def trivial_augment_draws(policy, key):
    """TrivialAugment-Wide's random choices: `op` (an index of TA_WIDE_OPS), `bin` (0..num_bins
    − 1) and `sign` (±1), each uniform."""
    op_key, bin_key, sign_key = jax.random.split(key, 3)
    return {'op': jax.random.randint(op_key, (), 0, len(policies.TA_WIDE_OPS)),
            'bin': jax.random.randint(bin_key, (), 0, policy.num_bins),
            'sign': _signs(sign_key, ())}


def apply_op(image, ops, op, m, s, fill, interpolation):
    """ops[op] of `ops` (Table, Blend or Warp each; op == len(ops): none) at (m, s), as one
    table look-up, one blend and one warp, each the identity unless `op` is of its kind: under
    `vmap`, each image of a batch its own op."""
    ops = list(ops) + [IDENTITY]

    def chosen(values, dtype=F32):   # values[op]
        return jnp.stack([jnp.asarray(v, dtype) for v in values])[op]

    tables = [o if isinstance(o, Table) else IDENTITY for o in ops]
    if any(o is not IDENTITY for o in tables):
        needs = {need for o in tables for need in o.stats}
        stats = {}
        if 'range' in needs:
            stats['low'], stats['high'] = jnp.min(image, (0, 1)), jnp.max(image, (0, 1))
        if 'hist' in needs:
            stats['hist'] = histogram(image)
        image = lookup(image, chosen([o.lut(stats, m, s) for o in tables]))
    blends = [o if isinstance(o, Blend) else None for o in ops]
    if any(blends):
        names = list(DEGENERATES)
        which = chosen([names.index(o.degenerate) if o else -1 for o in blends], I32)
        factor = chosen([o.factor(m, s) if o else 1.0 for o in blends])
        base = jnp.zeros_like(image)                                   # 'black'
        for name in sorted({o.degenerate for o in blends if o} - {'black'}):
            base = jnp.where(which == names.index(name), DEGENERATES[name](image), base)
        image = jnp.where(which >= 0, blend(base, image, factor), image)
    warps = [o if isinstance(o, Warp) else None for o in ops]
    if any(warps):
        matrix = chosen([jnp.stack([jnp.asarray(v, F32) for v in
                                    (o.matrix(m, s) if o else IDENTITY_MATRIX)])
                         for o in warps])
        warped = affine(image, tuple(matrix), fill, interpolation)
        image = jnp.where(chosen([o is not None for o in warps], bool), warped, image)
    return image


def auto_augment(policy, image, key, fill=policies.TIMM_FILL):
    """`policy` (`policies.parse`; None: unchanged) on float32 (H, W, 3) pixels in 0..255 units,
    first rounded and clipped to whole numbers 0..255 as the uint8 images PIL works on, as
    `autoaugment.augment`: RandAugment fills uncovered areas with `fill` (timm's `img_mean`),
    bilinear; TrivialAugment-Wide with 0, nearest (torchvision)."""
    if policy is None:
        return image
    image = jnp.clip(jnp.round(image), 0.0, 255.0)
    size = image.shape[:2]
    if isinstance(policy, policies.TrivialAugmentWide):
        table = _ta_wide_ops(size, policy.num_bins)
        draws = trivial_augment_draws(policy, key)
        return apply_op(image, [table[name] for name in policies.TA_WIDE_OPS], draws['op'],
                        draws['bin'], draws['sign'], (0.0, 0.0, 0.0), NEAREST)
    table = _rand_ops(size)
    ops = [table[name] for name in policy.ops]
    draws = rand_augment_draws(policy, key)
    for i in range(policy.num_layers):
        image = apply_op(image, ops, draws['ops'][i], draws['magnitudes'][i],
                         draws['signs'][i], fill, BILINEAR)
    return image


# ---- random erasing (timm, mode 'pixel') -----------------------------------------------------

def random_erase(image, key, prob):
    """timm's RandomErasing, mode 'pixel', one box, on normalised pixels, as
    `autoaugment.random_erase`: with probability `prob`, up to 10 attempts of area
    U(0.02, 1/3)·H·W and aspect h/w = exp U(log 0.3, log 1/0.3), h, w rounded; the first with
    h < H and w < W is placed uniformly (top in 0..H−h) and filled with N(0, 1) per pixel and
    channel."""
    h_img, w_img = image.shape[0], image.shape[1]
    apply_key, area_key, aspect_key, place_key, noise_key = jax.random.split(key, 5)
    attempts = 10
    area = jax.random.uniform(area_key, (attempts,), F32, 0.02, 1 / 3) * (h_img * w_img)
    aspect = jnp.exp(jax.random.uniform(aspect_key, (attempts,), F32, math.log(0.3),
                                        -math.log(0.3)))
    hs, ws = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
    fits = (ws < w_img) & (hs < h_img)
    first = jnp.argmax(fits)
    h, w = hs[first].astype(I32), ws[first].astype(I32)
    place = jax.random.uniform(place_key, (2,))
    top = jnp.minimum((place[0] * (h_img - h + 1)).astype(I32), h_img - h)
    left = jnp.minimum((place[1] * (w_img - w + 1)).astype(I32), w_img - w)
    erase = (jax.random.uniform(apply_key) < prob) & jnp.any(fits)
    rows, cols = jnp.arange(h_img)[:, None], jnp.arange(w_img)[None, :]
    box = erase & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = jax.random.normal(noise_key, image.shape, F32)
    return jnp.where(box[..., None], noise, image)


# ---- the step's augmentation -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What the training step applies per image, from a config (`from_config`)."""
    mean: tuple
    std: tuple
    color_jitter: float = 0.0
    pca_lighting: float = 0.0
    policy: object = None           # policies.RandAugment | TrivialAugmentWide | None
    random_erase: float = 0.0

    def image(self, key, pixels):
        """One image: (H, W, 3) pixels in 0..255 (uint8) → normalised float32."""
        colour_key, light_key, auto_key, erase_key = jax.random.split(key, 4)
        x = pixels.astype(F32)
        if self.color_jitter:
            draws = colour_draws(colour_key, self.color_jitter)
            x = colour_jitter(x, draws['alphas'], jnp.asarray(COLOUR_ORDERS)[draws['order']])
        if self.pca_lighting:
            x = lighting(x, self.pca_lighting * jax.random.normal(light_key, (3,), F32))
        if self.policy is not None:
            fill = ((0.0, 0.0, 0.0) if isinstance(self.policy, policies.TrivialAugmentWide)
                    else tuple(min(255, round(float(v))) for v in self.mean))   # timm img_mean
            x = auto_augment(self.policy, x, auto_key, fill)
        x = (x - jnp.asarray(self.mean, F32)) / jnp.asarray(self.std, F32)
        if self.random_erase:
            x = random_erase(x, erase_key, self.random_erase)
        return x

    def __call__(self, key, images):
        """A batch (B, H, W, 3) of uint8 pixels → normalised float32: image i of the global
        batch with the key fold_in(key, i), whatever devices hold it."""
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
            jnp.arange(images.shape[0], dtype=jnp.uint32))
        return jax.vmap(self.image)(keys, images)


def from_config(config):
    """The `Augmentation` the training step of `config` runs, or None where the host does it
    (`augment_on='host'`) or there is nothing per pixel to do (`image_settings.per_pixel`)."""
    if not (on_device(config) and per_pixel(config)):
        return None
    mean, std = normalisation(config)
    try:
        policy = policies.parse(config.get('auto_augment', ''))
    except ValueError as e:
        raise ValueError(f'{e}: fix --config.auto_augment') from None
    return Augmentation(mean=mean, std=std, color_jitter=config.color_jitter,
                        pca_lighting=config.pca_lighting, policy=policy,
                        random_erase=config.get('random_erase', 0.0))
