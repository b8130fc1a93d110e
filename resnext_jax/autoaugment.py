"""Automatic augmentation of one training image on the host, as TensorFlow ops for tf.data
`map`, seeded by a stateless [2] seed (`augment_on='host'`): timm's RandAugment and
torchvision's TrivialAugment-Wide (the policies: `resnext_jax.policies`) and timm's random
erasing in 'pixel' mode (timm/data/random_erasing.py). `resnext_jax.augment` runs the same on
the accelerators.

The ops take float32 (H, W, 3) images holding whole numbers in 0..255 (`augment` rounds and
clips its input to them) and return the same, as PIL computes them on uint8 images, which is
what timm and torchvision (on PIL images) run: look-up-table ops (invert, posterize, solarize,
autocontrast, equalize) exactly; ImageEnhance's blends truncate as PIL's `Image.blend` does;
affine ops sample at PIL's pixel centres (x + 0.5), fill points that fall outside the input
and clamp neighbours at the edges, as PIL's `Image.transform` does.

Where we differ from the sources:
  * timm's training recipe picks bilinear or bicubic at random per op ('random' interpolation);
    ImageProjectiveTransformV3 has no bicubic, so RandAugment always samples bilinearly.
  * timm's Posterize keeps int(level·4) bits: 0 below M 2.5 (PosterizeIncreasing at M 10).
    Pillow 13's ImageOps.posterize refuses 0 bits; we give black, what older Pillow's mask
    i & ~(2**8 − 1) gave.
  * TrivialAugment-Wide samples nearest, the class default; torchvision's reference training
    recipe (references/classification/presets.py) passes its bilinear interpolation instead.
  * timm turns colour jitter off when auto-augment is on; here the config decides.
"""
import math

import numpy as np
import tensorflow as tf

from resnext_jax.policies import LEVEL_DENOM, TA_WIDE_OPS, TIMM_FILL, TrivialAugmentWide


# ---- the ops: float32 (H, W, 3) whole numbers in 0..255 → the same, as PIL on uint8 ----------

def invert(image):
    """ImageOps.invert."""
    return 255.0 - image


def posterize(image, bits):
    """ImageOps.posterize: keep the `bits` high bits (clipped to 0..8; 8 is the identity)."""
    bits = tf.clip_by_value(tf.cast(bits, tf.float32), 0.0, 8.0)
    step = tf.pow(2.0, 8.0 - bits)
    return tf.floor(image / step) * step


def solarize(image, threshold):
    """ImageOps.solarize: values ≥ threshold are inverted."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image, add, threshold=128):
    """timm `solarize_add`: values < threshold get `add`, up to 255."""
    added = tf.minimum(image + tf.cast(add, tf.float32), 255.0)
    return tf.where(image < tf.cast(threshold, tf.float32), added, image)


def _lookup(image, lut):
    """Per-channel look-up: image (H, W, 3) whole numbers, lut (3, 256)."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.gather(tf.reshape(tf.cast(lut, tf.float32), [-1]), index)


def auto_contrast(image):
    """ImageOps.autocontrast (cutoff 0), per channel: LUT[v] = int(v·scale + offset) clipped to
    0..255, scale = 255 / (max − min), offset = −min·scale, in double precision as PIL's
    Python LUT is; the identity for a constant channel."""
    lo = tf.cast(tf.reduce_min(image, [0, 1]), tf.float64)[:, None]
    hi = tf.cast(tf.reduce_max(image, [0, 1]), tf.float64)[:, None]
    scale = tf.math.divide_no_nan(tf.constant(255.0, tf.float64), hi - lo)
    levels = tf.range(256, dtype=tf.float64)[None]
    lut = tf.clip_by_value(tf.floor(levels * scale + -lo * scale), 0.0, 255.0)
    return _lookup(image, tf.where(hi > lo, lut, levels))


def equalize(image):
    """ImageOps.equalize, per channel: step = (pixels − count of the top value) // 255,
    LUT[i] = (step // 2 + pixels below i) // step (clipped to 255), identity when step is 0."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    hist = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])
    top = tf.cast(tf.reduce_max(image, [0, 1]), tf.int32)
    top_count = tf.gather(hist, top[:, None], batch_dims=1)
    step = (tf.reduce_sum(hist, 1, keepdims=True) - top_count) // 255
    below = tf.cumsum(hist, 1, exclusive=True)
    lut = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    return _lookup(image, tf.where(step > 0, lut, tf.range(256)[None]))


def _blend(degenerate, image, factor):
    """Image.blend(degenerate, image, factor) on uint8: truncated, clipped to 0..255."""
    factor = tf.cast(factor, tf.float32)
    return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image):
    """PIL's RGB → L conversion: (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
    rgb = tf.cast(image, tf.int32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536


def brightness(image, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(tf.zeros_like(image), image, factor)


def color(image, factor):
    """ImageEnhance.Color: blend with the L (grey) image."""
    return _blend(tf.cast(_grey(image), tf.float32)[..., None], image, factor)


def contrast(image, factor):
    """ImageEnhance.Contrast: blend with the L image's mean, int(mean + 0.5)."""
    mean = tf.reduce_mean(tf.cast(_grey(image), tf.float64))
    return _blend(tf.cast(tf.floor(mean + 0.5), tf.float32), image, factor)


def sharpness(image, factor):
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3×3 kernel 1 1 1 / 1 5 1 / 1 1 1,
    ÷ 13, rounded), which leaves the border pixels as they are."""
    h, w = image.shape[0], image.shape[1]
    rows = image[:-2] + image[1:-1] + image[2:]            # whole sums: exact in float32
    total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * image[1:-1, 1:-1]
    smooth = tf.pad(tf.round(total / 13.0), [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros([h - 2, w - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]],
                    constant_values=True)
    return _blend(tf.where(border, image, smooth), image, factor)


def affine(image, matrix, fill, interpolation):
    """Image.transform(size, AFFINE, matrix, resample, fillcolor=fill): output pixel (i, j)
    samples the input at (a x + b y + c, d x + e y + f) for its centre (x, y) = (j + 0.5,
    i + 0.5); points outside [0, W) × [0, H) get `fill`, bilinear neighbours beyond the edges
    are clamped and values truncated, as PIL's. `interpolation`: 'NEAREST' or 'BILINEAR'."""
    h, w = image.shape[0], image.shape[1]
    a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in matrix)
    # PIL's coordinates put pixel i's centre at i + 0.5; the TF op puts it at i.
    transform = tf.cast(tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5,
                                  0.0, 0.0]), tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=[h, w],
        fill_value=0.0, interpolation=interpolation, fill_mode='NEAREST')[0]
    xs = tf.range(w, dtype=tf.float64)[None, :] + 0.5
    ys = tf.range(h, dtype=tf.float64)[:, None] + 0.5
    x_in = tf.cast(a * xs + c, tf.float32) + tf.cast(b * ys, tf.float32)
    y_in = tf.cast(d * xs + f, tf.float32) + tf.cast(e * ys, tf.float32)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    if interpolation == 'BILINEAR':  # a hair above, so float32 lands on whole values PIL hits
        out = tf.clip_by_value(tf.floor(out + 1e-3), 0.0, 255.0)
    return tf.where(inside[..., None], out, tf.constant(fill, tf.float32))


def shear_x(image, factor, fill, interpolation):
    """timm `shear_x` / torchvision ShearX (centre (0, 0)): affine (1, factor, 0, 0, 1, 0)."""
    return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill, interpolation)


def shear_y(image, factor, fill, interpolation):
    """timm `shear_y` / torchvision ShearY: affine (1, 0, 0, factor, 1, 0)."""
    return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill, interpolation)


def translate(image, dx, dy, fill, interpolation):
    """affine (1, 0, dx, 0, 1, dy): the content moves by (−dx, −dy) pixels."""
    return affine(image, (1.0, 0.0, dx, 0.0, 1.0, dy), fill, interpolation)


def rotate(image, degrees, fill, interpolation):
    """Image.rotate(degrees) (counter-clockwise, about (W/2, H/2), same size): PIL's matrix,
    its entries rounded to 15 decimals as PIL rounds them."""
    h, w = image.shape[0], image.shape[1]
    angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
    cos, sin = (tf.round(v * 1e15) / 1e15 for v in (tf.cos(angle), tf.sin(angle)))
    cx, cy = w / 2.0, h / 2.0
    matrix = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    return affine(image, matrix, fill, interpolation)


# ---- policies ---------------------------------------------------------------------------------

def _rand_op(name, size, fill):
    """timm's op `name` with its level-to-arg function (`LEVEL_TO_ARG`): f(image, magnitude,
    sign) for a float64 magnitude (already noised and clipped) and sign ±1."""
    h, w = size
    bilinear = 'BILINEAR'

    def level(m):
        return m / LEVEL_DENOM

    def enhance(op):            # timm `_enhance_level_to_arg`: [0.1, 1.9]
        return lambda x, m, s: op(x, level(m) * 1.8 + 0.1)

    def enhance_increasing(op):  # timm `_enhance_increasing_level_to_arg`: 1 ± 0.9 level, ≥ 0.1
        return lambda x, m, s: op(x, tf.maximum(1.0 + s * level(m) * 0.9, 0.1))

    def posterize_bits(m):      # timm `_posterize_level_to_arg`: int(level · 4)
        return tf.floor(level(m) * 4)

    def solarize_threshold(m):  # timm `_solarize_level_to_arg`: min(256, int(level · 256))
        return tf.minimum(tf.floor(level(m) * 256), 256.0)

    ops = {
        'AutoContrast': lambda x, m, s: auto_contrast(x),
        'Equalize': lambda x, m, s: equalize(x),
        'Invert': lambda x, m, s: invert(x),
        # timm `_rotate_level_to_arg`: ±30°·level
        'Rotate': lambda x, m, s: rotate(x, s * level(m) * 30.0, fill, bilinear),
        'Posterize': lambda x, m, s: posterize(x, posterize_bits(m)),
        'PosterizeIncreasing': lambda x, m, s: posterize(x, 4 - posterize_bits(m)),
        'Solarize': lambda x, m, s: solarize(x, solarize_threshold(m)),
        'SolarizeIncreasing': lambda x, m, s: solarize(x, 256 - solarize_threshold(m)),
        # timm `_solarize_add_level_to_arg`: min(128, int(level · 110)), threshold 128
        'SolarizeAdd': lambda x, m, s: solarize_add(
            x, tf.minimum(tf.floor(level(m) * 110), 128.0)),
        'Color': enhance(color), 'ColorIncreasing': enhance_increasing(color),
        'Contrast': enhance(contrast), 'ContrastIncreasing': enhance_increasing(contrast),
        'Brightness': enhance(brightness),
        'BrightnessIncreasing': enhance_increasing(brightness),
        'Sharpness': enhance(sharpness), 'SharpnessIncreasing': enhance_increasing(sharpness),
        # timm `_shear_level_to_arg`: ±0.3·level
        'ShearX': lambda x, m, s: shear_x(x, s * level(m) * 0.3, fill, bilinear),
        'ShearY': lambda x, m, s: shear_y(x, s * level(m) * 0.3, fill, bilinear),
        # timm `_translate_rel_level_to_arg` (translate_pct 0.45) × the image side
        'TranslateXRel': lambda x, m, s: translate(x, s * level(m) * 0.45 * w, 0.0, fill,
                                                   bilinear),
        'TranslateYRel': lambda x, m, s: translate(x, 0.0, s * level(m) * 0.45 * h, fill,
                                                   bilinear),
    }
    return ops[name]


def _ta_wide_op(name, size, bins):
    """torchvision's TrivialAugment-Wide op `name`: f(image, bin, sign) for bin 0..bins-1 of its
    magnitude range (`_augmentation_space`), fill 0, nearest sampling."""
    fill, nearest = (0.0, 0.0, 0.0), 'NEAREST'

    def linspace(top, k):
        """torch.linspace(0, top, bins)[k] as torch computes it in float32: k·step below bins // 2,
        top − (bins − 1 − k)·step (fused) above; so TranslateX's bin 15 is 15.999999, which
        int() makes 15 pixels."""
        top = float(np.float32(top))
        step = float(np.float32(top) / np.float32(bins - 1))
        value = tf.where(k < bins // 2, k * step, top - (bins - 1 - k) * step)
        return tf.cast(tf.cast(value, tf.float32), tf.float64)

    def enhance(op):           # 1 ± linspace(0, 0.99)
        return lambda x, k, s: op(x, 1.0 + s * linspace(0.99, k))

    def shift(k, s):           # F.affine translate=[int(±linspace(0, 32))]: content moves by it
        return -s * tf.floor(linspace(32.0, k))

    ops = {
        'Identity': lambda x, k, s: x,
        # F.affine shear=atan(m) in degrees, centre (0, 0): the inverse matrix (1, m, 0, ...)
        'ShearX': lambda x, k, s: shear_x(x, s * linspace(0.99, k), fill, nearest),
        'ShearY': lambda x, k, s: shear_y(x, s * linspace(0.99, k), fill, nearest),
        'TranslateX': lambda x, k, s: translate(x, shift(k, s), 0.0, fill, nearest),
        'TranslateY': lambda x, k, s: translate(x, 0.0, shift(k, s), fill, nearest),
        'Rotate': lambda x, k, s: rotate(x, s * linspace(135.0, k), fill, nearest),
        'Brightness': enhance(brightness), 'Color': enhance(color),
        'Contrast': enhance(contrast), 'Sharpness': enhance(sharpness),
        # 8 − round(k / ((bins − 1) / 6)): 8 (identity) down to 2 bits
        'Posterize': lambda x, k, s: posterize(x, 8 - tf.round(k / ((bins - 1) / 6))),
        'Solarize': lambda x, k, s: solarize(x, 255.0 - linspace(255.0, k)),
        'AutoContrast': lambda x, k, s: auto_contrast(x),
        'Equalize': lambda x, k, s: equalize(x),
    }
    return ops[name]


def _signs(seed, shape):
    """±1 (float64), −1 with probability 1/2 (timm `_randomly_negate`, torchvision's coin)."""
    return tf.where(tf.random.stateless_uniform(shape, seed) < 0.5,
                    tf.constant(1.0, tf.float64), -1.0)


def rand_augment_draws(policy, seed):
    """RandAugment's random choices for `seed`, one per layer: `ops` (int32 [n], an index of
    policy.ops, uniform with replacement, or len(policy.ops) where the layer is skipped, with
    probability 1 − prob), `magnitudes` (float64 [n]: noised as timm's `AugmentOp` does, then
    clipped to [0, magnitude_max]) and `signs` (±1 [n])."""
    n, count = policy.num_layers, len(policy.ops)
    op_seed, apply_seed, noise_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    ops = tf.random.stateless_uniform([n], op_seed, 0, count, tf.int32)
    applied = tf.random.stateless_uniform([n], apply_seed) < policy.prob
    m = tf.fill([n], tf.constant(float(policy.magnitude), tf.float64))
    if policy.magnitude_std == math.inf:     # timm: uniform in [0, magnitude]
        m = m * tf.random.stateless_uniform([n], noise_seed, dtype=tf.float64)
    elif policy.magnitude_std > 0:           # timm: gauss(magnitude, magnitude_std)
        m = m + policy.magnitude_std * tf.random.stateless_normal([n], noise_seed,
                                                                  dtype=tf.float64)
    return {'ops': tf.where(applied, ops, count),
            'magnitudes': tf.clip_by_value(m, 0.0, float(policy.magnitude_max)),
            'signs': _signs(sign_seed, [n])}


def rand_augment(policy, image, seed, fill=TIMM_FILL):
    """timm's RandAugment (`RandAugment.__call__` and `AugmentOp.__call__`) on whole-number
    pixels; `fill`: the colour of uncovered areas (timm: `img_mean`, the mean rounded)."""
    size = image.shape[:2]
    branches = [_rand_op(name, size, fill) for name in policy.ops]
    draws = rand_augment_draws(policy, seed)
    for i in range(policy.num_layers):
        m, sign = draws['magnitudes'][i], draws['signs'][i]
        image = tf.switch_case(draws['ops'][i],
                               [lambda f=f, x=image, m=m, s=sign: f(x, m, s) for f in branches]
                               + [lambda x=image: x])              # the last: skipped
        image = tf.reshape(image, [*size, 3])
    return image


def trivial_augment_draws(policy, seed):
    """TrivialAugment-Wide's random choices for `seed`: `op` (int32, an index of TA_WIDE_OPS),
    `bin` (int32 in 0..num_bins − 1) and `sign` (±1), each uniform."""
    op_seed, bin_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    return {'op': tf.random.stateless_uniform([], op_seed, 0, len(TA_WIDE_OPS), tf.int32),
            'bin': tf.random.stateless_uniform([], bin_seed, 0, policy.num_bins, tf.int32),
            'sign': _signs(sign_seed, [])}


def trivial_augment_wide(policy, image, seed):
    """torchvision's TrivialAugmentWide.forward on whole-number pixels."""
    size = image.shape[:2]
    branches = [_ta_wide_op(name, size, policy.num_bins) for name in TA_WIDE_OPS]
    draws = trivial_augment_draws(policy, seed)
    k, sign = tf.cast(draws['bin'], tf.float64), draws['sign']
    image = tf.switch_case(draws['op'], [lambda f=f: f(image, k, sign) for f in branches])
    return tf.reshape(image, [*size, 3])


@tf.autograph.experimental.do_not_convert  # plain TF ops: quicker to trace
def augment(policy, image, seed, mean=None):
    """`policy` (`policies.parse`; None: unchanged) on float32 (H, W, 3) pixels in 0..255 units,
    first rounded and clipped to whole numbers 0..255 as the uint8 images PIL works on.
    RandAugment fills uncovered areas with `mean` rounded (timm's `img_mean`; None: timm's
    (128, 128, 128)); TrivialAugment-Wide with 0 (torchvision)."""
    if policy is None:
        return image
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    if isinstance(policy, TrivialAugmentWide):
        return trivial_augment_wide(policy, image, seed)
    fill = TIMM_FILL if mean is None else tuple(min(255, round(float(v))) for v in mean)
    return rand_augment(policy, image, seed, fill)


@tf.autograph.experimental.do_not_convert  # plain TF ops: quicker to trace
def random_erase(image, seed, prob, mean=0.0, std=1.0):
    """timm's RandomErasing, mode 'pixel', one box: with probability `prob`, up to 10 attempts
    of area U(0.02, 1/3)·H·W and aspect h/w = exp U(log 0.3, log 1/0.3), h, w rounded; the
    first with h < H and w < W is placed uniformly (top in 0..H−h) and filled per pixel and
    channel with N(0, 1), which is `mean + std·N(0, 1)` for unnormalised pixels."""
    h_img, w_img = image.shape[0], image.shape[1]
    apply_seed, area_seed, aspect_seed, place_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    attempts = 10
    area = tf.random.stateless_uniform([attempts], area_seed, 0.02, 1 / 3) * (h_img * w_img)
    aspect = tf.exp(tf.random.stateless_uniform([attempts], aspect_seed, math.log(0.3),
                                                -math.log(0.3)))
    hs, ws = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (ws < w_img) & (hs < h_img)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    h, w = tf.cast(hs[first], tf.int32), tf.cast(ws[first], tf.int32)
    place = tf.random.stateless_uniform([2], place_seed)
    top = tf.minimum(tf.cast(place[0] * tf.cast(h_img - h + 1, tf.float32), tf.int32), h_img - h)
    left = tf.minimum(tf.cast(place[1] * tf.cast(w_img - w + 1, tf.float32), tf.int32),
                      w_img - w)
    erase = (tf.random.stateless_uniform([], apply_seed) < prob) & tf.reduce_any(fits)

    def erased():
        rows, cols = tf.range(h_img)[:, None], tf.range(w_img)[None, :]
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        noise = tf.random.stateless_normal([h_img, w_img, 3], noise_seed)
        return tf.where(box[..., None], mean + std * noise, image)

    return tf.cond(erase, erased, lambda: image)
