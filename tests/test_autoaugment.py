"""Automatic augmentation and colour noise, on the host (resnext_jax.autoaugment, TensorFlow) and
on the device (resnext_jax.augment, JAX), held to the same references: each op against Pillow,
the policies against timm's and torchvision's definitions, the draws' distributions, random
erasing's statistics, the official code's colour noise; then host against device, sample for
sample of the whole augmentation; the spec parser and the training preprocessing that uses
them."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from configs import default
from helpers import tiny_config
from resnext_jax import augment as dev
from resnext_jax import autoaugment as aa
from resnext_jax import image_settings, policies, preprocess, validate

H, W = 18, 22                      # not square, so that height and width cannot be swapped
FILL = (124, 116, 104)             # timm's img_mean for the ImageNet mean
MEAN, STD = image_settings.IMAGENET_MEAN, image_settings.IMAGENET_STD


def noise_image(seed=0, low=0, high=256, shape=(H, W, 3)):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


def gradient_image():
    """Smooth content, where bilinear and nearest sampling barely differ from one another."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 11, y * 13, (x + y) * 6], -1).astype(np.uint8)


def pil(pixels):
    return Image.fromarray(pixels)


class Host:
    """The host's TensorFlow ops; seeds are [key, i]."""
    name = 'host'

    def op(self, name):
        f = getattr(aa, name)

        def run(pixels, *args):
            out = f(tf.constant(pixels, tf.float32), *args).numpy()
            assert out.shape == pixels.shape and out.dtype == np.float32
            return out
        return run

    def draws(self, fn, policy, n, key=11):
        """fn(policy, seed) for seeds (key, 0..n-1), in one tf.data pass."""
        f = getattr(aa, fn)
        ds = tf.data.Dataset.range(n).map(
            lambda i: f(policy, tf.stack([tf.constant(key, tf.int64), i])))
        return {k: v.numpy() for k, v in next(iter(ds.batch(n))).items()}

    def augmenter(self, policy, fill=None):
        """f(pixels, key, i) → `aa.augment` for the seed the draws of (key, i) come from."""
        augment = tf.function(lambda x, s: aa.augment(policy, x, s, fill))
        return lambda x, key, i: augment(tf.constant(x, tf.float32),
                                         tf.constant([key, i], tf.int64)).numpy()


class Device:
    """The device's JAX ops, jitted; keys are fold_in(key(key), i)."""
    name = 'device'

    def op(self, name):
        f = jax.jit(getattr(dev, name), static_argnums=(3,) if name in (
            'shear_x', 'shear_y', 'rotate') else (4,) if name == 'translate' else ())

        def run(pixels, *args):
            args = tuple(tuple(a) if isinstance(a, tuple) else a for a in args)
            out = np.asarray(f(jnp.asarray(pixels, jnp.float32), *args))
            assert out.shape == pixels.shape and out.dtype == np.float32
            return out
        return run

    def draws(self, fn, policy, n, key=11):
        f = getattr(dev, fn)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(key), i))(jnp.arange(n))
        return {k: np.asarray(v) for k, v in jax.jit(jax.vmap(lambda k: f(policy, k)))(
            keys).items()}

    def augmenter(self, policy, fill=None):
        """As `Host.augmenter`; TrivialAugment-Wide fills with 0 whatever `fill` says."""
        fill = fill or policies.TIMM_FILL
        augment = jax.jit(lambda x, k: dev.auto_augment(policy, x, k, fill))
        return lambda x, key, i: np.asarray(augment(
            jnp.asarray(x, jnp.float32), jax.random.fold_in(jax.random.key(key), i)))


BACKENDS = [Host(), Device()]
backends = pytest.mark.parametrize('backend', BACKENDS, ids=lambda b: b.name)


# ---- each op against Pillow ------------------------------------------------------------------

@backends
def test_lookup_ops_equal_pillow(backend):
    """The ops that are per-value look-up tables in PIL are exact; the device's autocontrast is
    the exact integer table, which PIL's double arithmetic misses by one level for some ranges
    (`test_device_auto_contrast_table_is_exact`): within a grey level, and exact for images
    that span 0..255."""
    invert, auto_contrast, equalize, posterize, solarize, solarize_add = (backend.op(n) for n in (
        'invert', 'auto_contrast', 'equalize', 'posterize', 'solarize', 'solarize_add'))
    images = [noise_image(0), noise_image(1, 40, 168), gradient_image()]
    narrow = noise_image(2, 90, 130)
    narrow[..., 2] = 77                        # a constant channel: autocontrast leaves it
    two = np.where(noise_image(3) < 128, 30, 200).astype(np.uint8)
    skewed = (noise_image(4).astype(float) ** 2 / 255).astype(np.uint8)
    constant = np.full((H, W, 3), 99, np.uint8)
    for x in images + [narrow, two, skewed, constant]:
        np.testing.assert_array_equal(invert(x), ImageOps.invert(pil(x)))
        contrasted = auto_contrast(x) - np.asarray(ImageOps.autocontrast(pil(x)), np.float32)
        if backend.name == 'host':
            assert not contrasted.any()
        else:
            assert set(np.unique(contrasted)) <= {0.0, 1.0}
            assert not contrasted.any() or (x.min((0, 1)) > 0).any() or (x.max((0, 1)) < 255).any()
        np.testing.assert_array_equal(equalize(x), ImageOps.equalize(pil(x)))
    x = images[0]
    for bits in (1, 2, 4, 7, 8):
        np.testing.assert_array_equal(posterize(x, bits), ImageOps.posterize(pil(x), bits))
    # Pillow 13 refuses 0 bits; older Pillow (timm's Posterize at M < 2.5) kept no bit: black
    np.testing.assert_array_equal(posterize(x, 0), np.zeros_like(x))
    for threshold in (0, 1, 100, 128.5, 255, 256):
        np.testing.assert_array_equal(solarize(x, threshold),
                                      ImageOps.solarize(pil(x), threshold))
    for add in (0, 37, 110):   # timm's solarize_add: below 128, add and cap at 255
        expected = pil(x).point(lambda i: min(255, i + add) if i < 128 else i)
        np.testing.assert_array_equal(solarize_add(x, add), expected)


def test_device_histograms_are_pillows():
    """Both ways the device counts (a scatter on CPU and GPU, a matrix product on TPU) give
    Image.histogram()'s 3 × 256 counts."""
    for x in (noise_image(15), gradient_image(), np.full((H, W, 3), 255, np.uint8)):
        expected = np.asarray(pil(x).histogram()).reshape(3, 256)
        for count in (dev.histogram, dev.histogram_by_scatter, dev.histogram_by_product):
            np.testing.assert_array_equal(jax.jit(count)(jnp.asarray(x, jnp.float32)),
                                          expected)


def test_device_auto_contrast_table_is_exact():
    """For every (min, max) of a channel, the device's table is ⌊(v − min)·255 / (max − min)⌋
    clipped to 0..255; Pillow's (computed here as ImageOps.autocontrast computes it, in
    double precision) is the same or, for about 0.14 % of the entries, one level lower."""
    low, high = np.triu_indices(256, 1)
    tables = np.asarray(jax.jit(jax.vmap(lambda lo, hi: dev.auto_contrast_lut(
        jnp.full(3, lo), jnp.full(3, hi))[0]))(low, high))
    v = np.arange(256)
    exact = np.clip((v - low[:, None]) * 255 // (high - low)[:, None], 0, 255)
    np.testing.assert_array_equal(tables, exact)
    scale = 255.0 / (high - low)[:, None]
    pillow = np.clip(np.trunc(v * scale + -low[:, None] * scale), 0, 255)
    missed = exact - pillow
    assert set(np.unique(missed)) == {0, 1} and missed.mean() < 0.002
    # ... and the constant channel is left as it is
    np.testing.assert_array_equal(dev.auto_contrast_lut(jnp.full(3, 7), jnp.full(3, 7)),
                                  np.broadcast_to(v, (3, 256)))


@backends
@pytest.mark.parametrize('name', ['Brightness', 'Color', 'Contrast', 'Sharpness'])
def test_enhance_ops_match_pillow(backend, name):
    """ImageEnhance within one grey level: PIL blends in C float and truncates to uint8, so a
    value that lands a rounding error from a whole number may truncate the other way (on these
    images they are in fact equal)."""
    op = backend.op({'Brightness': 'brightness', 'Color': 'color', 'Contrast': 'contrast',
                     'Sharpness': 'sharpness'}[name])
    for x in (noise_image(5), gradient_image()):
        for factor in (0.0, 0.1, 0.55, 1.0, 1.37, 1.9, 1.99):
            expected = np.asarray(getattr(ImageEnhance, name)(pil(x)).enhance(factor))
            assert np.abs(op(x, factor) - expected).max() <= 1, factor


def geometric_cases():
    """(op name, its arguments, PIL's equivalent), for both resampling filters."""
    for interpolation, resample in (('NEAREST', Image.NEAREST), ('BILINEAR', Image.BILINEAR)):
        def transform(matrix, resample=resample):
            return lambda im: im.transform(im.size, Image.AFFINE, matrix, resample,
                                           fillcolor=FILL)
        for f in (0.3, -0.3, 0.99):
            yield 'shear_x', (f, FILL, interpolation), transform((1, f, 0, 0, 1, 0))
            yield 'shear_y', (f, FILL, interpolation), transform((1, 0, 0, f, 1, 0))
        for dx, dy in ((9.9, 0), (-3, 4), (0, -7.3)):
            yield 'translate', (dx, dy, FILL, interpolation), transform((1, 0, dx, 0, 1, dy))
        for degrees in (17, -30, 45, 90, 135, 180):
            yield 'rotate', (degrees, FILL, interpolation), (
                lambda im, d=degrees, r=resample: im.rotate(d, r, fillcolor=FILL))


@backends
def test_geometric_ops_match_pillow(backend):
    """Image.transform / Image.rotate, PIL's pixel centres, fill and edge clamping: at most one
    line of pixels (1 / min(H, W) of them) off by more than one grey level. Nearest sampling
    may pick the other neighbour where a sample point lies exactly between two pixels (at
    multiples of 45°, a whole diagonal), as PIL steps in fixed point; bilinear values may
    truncate the other way (float32 here, double in PIL)."""
    for name, args, reference in geometric_cases():
        for x in (noise_image(6), gradient_image()):
            diff = np.abs(backend.op(name)(x, *args) - np.asarray(reference(pil(x))))
            assert (diff > 1).mean() <= 1 / min(H, W), (name, args, (diff > 1).mean())
            assert diff.mean() < 3, (name, args)
    # the fill: a translation by the width leaves nothing of the image
    empty = backend.op('translate')(noise_image(7), W, 0.0, FILL, 'BILINEAR')
    np.testing.assert_array_equal(empty, np.broadcast_to(FILL, empty.shape))


# ---- the policies against timm's and torchvision's definitions -------------------------------

def timm_reference(name, image, m, sign, fill):
    """timm's op `name` at magnitude m (AugmentOp after the noise) with the random sign fixed,
    written from timm's level functions (level = m / 10) with Pillow, bilinear resampling."""
    level, size = m / 10, image.size

    def affine(matrix):
        return image.transform(size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=fill)

    def posterize(bits):       # ImageOps.posterize's mask, for every bit count timm produces
        return image if bits >= 8 else image.point(lambda i: i & ~(2 ** (8 - max(bits, 0)) - 1))

    enhance = dict(Color=ImageEnhance.Color, Contrast=ImageEnhance.Contrast,
                   Brightness=ImageEnhance.Brightness, Sharpness=ImageEnhance.Sharpness)
    if name.endswith('Increasing') and name[:-10] in enhance:
        return enhance[name[:-10]](image).enhance(max(0.1, 1.0 + sign * level * 0.9))
    if name in enhance:
        return enhance[name](image).enhance(level * 1.8 + 0.1)
    solarize = min(256, int(level * 256))
    return {
        'AutoContrast': lambda: ImageOps.autocontrast(image),
        'Equalize': lambda: ImageOps.equalize(image),
        'Invert': lambda: ImageOps.invert(image),
        'Rotate': lambda: image.rotate(sign * level * 30, Image.BILINEAR, fillcolor=fill),
        'Posterize': lambda: posterize(int(level * 4)),
        'PosterizeIncreasing': lambda: posterize(4 - int(level * 4)),
        'Solarize': lambda: ImageOps.solarize(image, solarize),
        'SolarizeIncreasing': lambda: ImageOps.solarize(image, 256 - solarize),
        'SolarizeAdd': lambda: image.point(
            lambda i: min(255, i + min(128, int(level * 110))) if i < 128 else i),
        'ShearX': lambda: affine((1, sign * level * 0.3, 0, 0, 1, 0)),
        'ShearY': lambda: affine((1, 0, 0, sign * level * 0.3, 1, 0)),
        'TranslateXRel': lambda: affine((1, 0, sign * level * 0.45 * size[0], 0, 1, 0)),
        'TranslateYRel': lambda: affine((1, 0, 0, 0, 1, sign * level * 0.45 * size[1])),
    }[name]()


GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel',
             'TranslateYRel')


def assert_like(ours, expected, name):
    diff = np.abs(ours - np.asarray(expected, np.float32))
    if name in GEOMETRIC:      # as test_geometric_ops_match_pillow
        assert (diff > 1).mean() <= 1 / min(H, W), name
    else:
        assert diff.max() <= 1, name


@backends
@pytest.mark.parametrize('spec', ['rand-m7-n1-p1-mstd0.5', 'rand-m7-n1-p1-mstd0.5-inc1'])
def test_rand_augment_ops_are_timms(backend, spec):
    """Every op of the set, at the magnitude and sign drawn for a seed, is timm's op at them;
    `img_mean` (the mean rounded) fills."""
    policy = policies.parse(spec)
    assert policy.ops == (policies.RAND_INCREASING_OPS if policy.increasing
                          else policies.RAND_OPS)
    draws = backend.draws('rand_augment_draws', policy, 200)
    augment = backend.augmenter(policy, FILL)
    x = noise_image(12)       # every grey level about 5 times: thresholds off by one show
    for k, name in enumerate(policy.ops):
        for i in np.flatnonzero(draws['ops'][:, 0] == k)[:4]:
            m, sign = draws['magnitudes'][i, 0], draws['signs'][i, 0]
            assert_like(augment(x, 11, i), timm_reference(name, pil(x), m, sign, FILL), name)


@backends
def test_trivial_augment_wide_is_torchvisions(backend):
    """Every op, at the bin and sign drawn for a seed, is torchvision's `_apply_op` on the PIL
    image at `_augmentation_space(31)`'s magnitude, nearest, fill 0."""
    autoaugment = pytest.importorskip('torchvision.transforms.autoaugment')
    InterpolationMode = pytest.importorskip('torchvision.transforms').InterpolationMode
    policy = policies.parse('ta_wide')
    space = autoaugment.TrivialAugmentWide()._augmentation_space(31)
    assert tuple(space) == policies.TA_WIDE_OPS
    draws = backend.draws('trivial_augment_draws', policy, 300)
    augment = backend.augmenter(policy)
    x = noise_image(8)
    assert set(draws['op']) == set(range(14))
    for i, k in enumerate(draws['op']):        # about 20 bins of each op
        name = policies.TA_WIDE_OPS[k]
        magnitudes, signed = space[name]
        m = float(magnitudes[draws['bin'][i]]) if magnitudes.ndim else 0.0
        m = -m if signed and draws['sign'][i] < 0 else m
        expected = autoaugment._apply_op(pil(x), name, m, InterpolationMode.NEAREST, None)
        assert_like(augment(x, 11, i), expected, name)


def test_device_translate_bins_are_torchs_float32_linspace():
    """TrivialAugment-Wide's TranslateX bin 15 is torch.linspace(0, 32, 31)[15] = 15.999999 in
    float32, so int() moves 15 pixels, not 16; every bin of every range as torch's."""
    torch = pytest.importorskip('torch')
    for top in (0.99, 32.0, 135.0, 255.0):
        np.testing.assert_array_equal(dev.torch_linspace(top, 31),
                                      torch.linspace(0.0, top, 31).numpy())
    assert int(dev.torch_linspace(32.0, 31)[15]) == 15


# ---- determinism, ranges, statistics ---------------------------------------------------------

SPECS = ['ta_wide', 'rand-m9-n2-mstd0.5', 'rand-m7-mstd0.5-inc1', 'rand-m9-n3-mstd101-p1']


@backends
@pytest.mark.parametrize('spec', SPECS)
def test_deterministic_per_seed_and_in_range(backend, spec):
    """Same seed, same image, alone or among others (tf.data, vmap); other seeds give other
    images; whole numbers in 0..255 (inputs outside are clipped first), shape kept."""
    policy = policies.parse(spec)
    x = noise_image(9, shape=(16, 16, 3)).astype(np.float32) * 1.3 - 30   # -30..301
    augment = backend.augmenter(policy)
    alone = np.stack([augment(x, 4, k) for k in range(3)])
    np.testing.assert_array_equal(alone, np.stack([augment(x, 4, k) for k in range(3)]))
    if backend.name == 'host':
        ds = tf.data.Dataset.range(24).map(lambda k: aa.augment(
            policy, tf.constant(x), tf.stack([tf.constant(4, tf.int64), k])))
        together = np.stack(list(ds.as_numpy_iterator()))
    else:
        keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.key(4), k))(jnp.arange(24))
        together = np.asarray(jax.jit(jax.vmap(
            lambda k: dev.auto_augment(policy, jnp.asarray(x), k)))(keys))
    np.testing.assert_array_equal(together[:3], alone)
    assert together.shape == (24, 16, 16, 3) and together.dtype == np.float32
    assert together.min() >= 0 and together.max() <= 255
    assert (together == np.round(together)).all()
    assert len({m.tobytes() for m in together}) >= 12      # seeds choose different ops


@backends
def test_trivial_augment_wide_draws_are_uniform(backend):
    """Over many seeds every op, every one of the 31 bins and both signs come up about equally
    often (within 5 standard deviations of a binomial count)."""
    n = 14 * 300
    draws = backend.draws('trivial_augment_draws', policies.TrivialAugmentWide(), n)
    counts = np.bincount(draws['op'], minlength=14)
    assert len(counts) == 14 and np.abs(counts - 300).max() < 5 * math.sqrt(300 * 13 / 14)
    bins = np.bincount(draws['bin'], minlength=31)
    assert len(bins) == 31 and np.abs(bins - n / 31).max() < 5 * math.sqrt(n / 31)
    assert set(np.unique(draws['sign'])) == {-1.0, 1.0}
    assert abs((draws['sign'] > 0).mean() - 0.5) < 5 * math.sqrt(0.25 / n)


@backends
def test_rand_augment_draws(backend):
    """n ops per image, each applied with probability p, uniform over the set; magnitudes with
    the noise std asked for, uniform for mstd > 100, clipped to [0, mmax]."""
    n = 3000
    draws = backend.draws('rand_augment_draws', policies.parse('rand-m5-n3-p0.3-mstd0.5'), n)
    assert draws['ops'].shape == (n, 3)
    applied = draws['ops'] < len(policies.RAND_OPS)
    assert abs(applied.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / applied.size)
    counts = np.bincount(draws['ops'][applied], minlength=15)
    expected = applied.sum() / 15
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)
    m = draws['magnitudes']
    assert abs(m.mean() - 5) < 0.05 and abs(m.std() - 0.5) < 0.03
    signs = draws['signs']
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < 0.03

    def magnitudes(spec):
        return backend.draws('rand_augment_draws', policies.parse(spec), 500)['magnitudes']
    uniform = magnitudes('rand-m9-mstd101')
    assert uniform.min() >= 0 and uniform.max() <= 9 and abs(uniform.mean() - 4.5) < 0.3
    assert abs(uniform.std() - 9 / math.sqrt(12)) < 0.2
    assert (magnitudes('rand-m15') == 10).all()              # timm clips to 10 …
    assert (magnitudes('rand-m15-mmax20') == 15).all()       # … unless mmax says otherwise
    clipped = magnitudes('rand-m9-mstd2')
    assert clipped.min() >= 0 and clipped.max() == 10 and clipped.std() > 1
    assert (backend.draws('rand_augment_draws', policies.parse('rand-p1'), 100)['ops']
            < 15).all()


# ---- parse and validate ----------------------------------------------------------------------

def test_parse_valid_specs():
    parse = policies.parse
    assert parse('') is None
    assert parse('ta_wide') == policies.TrivialAugmentWide(num_bins=31)
    assert parse('rand-m9-n2-mstd0.5') == policies.RandAugment(9, 2, 0.5, 0.5, 10, False)
    assert parse('rand-m7-mstd0.5-inc1') == policies.RandAugment(7, 2, 0.5, 0.5, 10, True)
    assert parse('rand') == policies.RandAugment(10, 2, 0.5, 0.0, 10, False)   # timm's defaults
    assert parse('rand-n3-m15-mmax20-p1-inc0') == policies.RandAugment(15, 3, 1.0, 0.0, 20,
                                                                       False)
    assert parse('rand-mstd101').magnitude_std == math.inf    # timm: > 100 is uniform
    assert parse('rand-m9-mstd1e2').magnitude_std == 100.0


@pytest.mark.parametrize('spec', [
    'rand-n0', 'rand-x3', 'rand-m9.5', 'rand-p1.5', 'rand-m9-m8', 'rand-inc2', 'rand-mmax0',
    'rand-m', 'rand--m9', 'rand-m9-', 'rand-tweights', 'ta_wide-m9', 'RAND-m9', 'augmix-m3',
    'rand-p0.5.1', 'original', ' rand-m9', 'rand-M9'])
def test_parse_refuses_invalid_specs(spec):
    with pytest.raises(ValueError, match=r"auto_augment '"):
        policies.parse(spec)


def test_check_config_refuses_invalid_specs_in_one_line():
    validate.check_config(tiny_config(auto_augment='rand-m9-n2-mstd0.5', random_erase=0.25))
    validate.check_config(tiny_config(auto_augment='ta_wide'))
    for spec in ('rand-n0', 'trivial'):
        with pytest.raises(ValueError) as error:
            validate.check_config(tiny_config(auto_augment=spec))
        assert '--config.auto_augment' in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(TypeError):
        policies.parse(7)
    with pytest.raises(ValueError,
                       match=r"augment_on 'gpu' is not one of \('auto', 'device', 'host'\)"):
        validate.check_config(tiny_config(augment_on='gpu'))


# ---- random erasing --------------------------------------------------------------------------

@backends
def test_random_erase_statistics(backend):
    """timm's 'pixel' mode: erased with probability p; one box of 2%–1/3 of the area (up to
    the rounding of its sides), aspect 0.3–1/0.3, inside the image; fill N(0, 1) in normalised
    units, which is mean + std·N(0, 1) for the host's unnormalised pixels."""
    h, w, n = 40, 48, 600
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
    if backend.name == 'host':
        x = tf.fill([h, w, 3], 1000.0)            # a value the fill cannot take
        ds = tf.data.Dataset.range(n).map(lambda i: aa.random_erase(
            x, tf.stack([tf.constant(1, tf.int64), i]), 0.25, tf.constant(mean, tf.float32),
            tf.constant(std, tf.float32)))
        out = next(iter(ds.batch(n))).numpy()
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(n))
        out = np.asarray(jax.jit(jax.vmap(lambda k: dev.random_erase(
            jnp.full((h, w, 3), 1000.0), k, 0.25)))(keys))
        mean, std = np.zeros(3), np.ones(3)       # normalised pixels: N(0, 1) itself
    changed = out != 1000.0
    erased = changed.any((1, 2, 3))
    assert abs(erased.mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    fills, centres = [], []
    for image, mask in zip(out[erased], changed[erased]):
        assert (mask == mask[..., :1]).all()             # every channel of a pixel
        rows, cols = np.flatnonzero(mask[..., 0].any(1)), np.flatnonzero(mask[..., 0].any(0))
        bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask[..., 0].sum() == bh * bw                 # one filled rectangle
        assert bh < h and bw < w
        assert (bh + 0.5) * (bw + 0.5) >= 0.02 * h * w and (bh - 0.5) * (bw - 0.5) <= h * w / 3
        assert (bh + 0.5) / (bw - 0.5) >= 0.3 and (bh - 0.5) / (bw + 0.5) <= 1 / 0.3
        fills.append((image[mask].reshape(-1, 3) - mean) / std)
        centres.append(((rows[0] + rows[-1]) / 2 / (h - 1), (cols[0] + cols[-1]) / 2 / (w - 1)))
    fills = np.concatenate(fills)
    assert np.abs(fills.mean(0)).max() < 0.02 and np.abs(fills.std(0) - 1).max() < 0.02
    assert np.abs(np.mean(centres, 0) - 0.5).max() < 0.06        # placed all over


def test_random_erase_probability_ends():
    image = noise_image(10, shape=(40, 48, 3)).astype(np.float32)
    for i in range(20):
        seed, key = tf.constant([2, i], tf.int64), jax.random.fold_in(jax.random.key(2), i)
        np.testing.assert_array_equal(aa.random_erase(tf.constant(image), seed, 0.0), image)
        np.testing.assert_array_equal(dev.random_erase(jnp.asarray(image), key, 0.0), image)
        assert (aa.random_erase(tf.constant(image), seed, 1.0).numpy() != image).any()
        assert (np.asarray(dev.random_erase(jnp.asarray(image), key, 1.0)) != image).any()


# ---- the official code's colour noise --------------------------------------------------------

def official_colour(image, alphas, order):
    """fb.resnet.torch's ColorJitter for given factors (brightness, contrast, saturation) and
    order: blends with black, the mean grey and the grey image, grey = 0.299 R + 0.587 G +
    0.114 B."""
    image = image.astype(np.float64)
    for op in order:
        grey = image @ np.array([0.299, 0.587, 0.114])
        other = [0.0, grey.mean(), grey[..., None]][op]
        image = image * alphas[op] + other * (1 - alphas[op])
    return image


def test_device_colour_jitter_and_lighting_are_the_official_codes():
    x = noise_image(13).astype(np.float32)
    for order in dev.COLOUR_ORDERS:
        alphas = np.array([0.7, 1.3, 0.9], np.float32)
        ours = np.asarray(jax.jit(dev.colour_jitter)(x, alphas, jnp.asarray(order)))
        np.testing.assert_allclose(ours, official_colour(x, alphas, order), rtol=1e-5,
                                   atol=1e-3)
    # AlexNet's PCA lighting with the official code's ImageNet eigenvalues and eigenvectors
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])
    alpha = np.array([0.05, -0.1, 0.2])
    np.testing.assert_allclose(np.asarray(dev.lighting(x, jnp.asarray(alpha, jnp.float32))),
                               x + 255 * eigvec @ (alpha * eigval), rtol=1e-6, atol=1e-3)


def test_device_colour_draws():
    """Factors uniform in [1 − s, 1 + s], each of the six orders equally often."""
    n, s = 6000, 0.4
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
    draws = jax.jit(jax.vmap(lambda k: dev.colour_draws(k, s)))(keys)
    alphas, order = np.asarray(draws['alphas']), np.asarray(draws['order'])
    assert alphas.min() >= 1 - s and alphas.max() <= 1 + s
    assert np.abs(alphas.mean(0) - 1).max() < 5 * s / math.sqrt(3 * n)
    assert np.abs(alphas.std(0) - s / math.sqrt(3)).max() < 0.01
    counts = np.bincount(order, minlength=6)
    assert len(counts) == 6 and np.abs(counts - n / 6).max() < 5 * math.sqrt(n / 6)


# ---- the host and the device augment alike ---------------------------------------------------

def ks_distance(a, b):
    """The two-sample Kolmogorov–Smirnov statistic of samples a and b, rounded to 4 decimals
    first: an image left unchanged gives one value, which float32 rounding on either side
    must not split into two."""
    a, b = np.round(a, 4), np.round(b, 4)
    values = np.sort(np.concatenate([a, b]))
    cdf = lambda s: np.searchsorted(np.sort(s), values, side='right') / len(s)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


@pytest.mark.parametrize('fields', [
    dict(color_jitter=0.4, pca_lighting=0.1),                       # the paper's recipe
    dict(pca_lighting=0.1),
    dict(auto_augment='ta_wide', random_erase=0.1),                 # torchvision's V2
    dict(auto_augment='rand-m7-mstd0.5-inc1'),                      # RSB A1
    dict(auto_augment='rand-m9-n2-mstd0.5', random_erase=0.25, color_jitter=0.4),
], ids=lambda f: '+'.join(f))
def test_host_and_device_draw_the_same_augmentation(fields):
    """Sample for sample of the whole per-pixel augmentation of one image: 2,000 host
    (`augment_on='host'`, tf.data) and 2,000 device (`augment.from_config`, in the step)
    results agree in distribution on every statistic here: each channel's mean and spread, the
    mean change and the share of pixels left unchanged and erased (two-sample
    Kolmogorov–Smirnov distance < 0.07; equal recipes give ≤ 0.04 here, while jitter 0.3 for
    0.4, RandAugment m5 for m7 or without `inc1`, erasing 0.2 for 0.1 give 0.08–0.23)."""
    n = 2000
    config = default.get_config()
    config.update(dataset='imagenet2012', image_size=24, augment='none', **fields)
    y, x = np.mgrid[0:24, 0:24]
    pixels = noise_image(14, 40, 216, shape=(24, 24, 3))
    pixels[:12] = np.stack([x * 9, y * 10, (x + y) * 5], -1)[:12]   # content with structure
    host_config = config.copy_and_resolve_references()
    host_config.augment_on = 'host'
    fn = preprocess.preprocess_fn(host_config, True, None)
    host = next(iter(tf.data.Dataset.range(n).map(
        lambda i: fn(tf.constant(pixels), tf.stack([tf.constant(5, tf.int64), i]))).batch(
        n))).numpy()
    device_fn = dev.from_config(config)
    assert device_fn is not None and dev.from_config(host_config) is None
    device = np.asarray(jax.jit(device_fn)(jax.random.key(5), jnp.asarray(
        np.broadcast_to(pixels, (n, 24, 24, 3)))))
    mean, std = (np.array(v, np.float32) for v in image_settings.normalisation(config))
    plain = (pixels - mean) / std
    statistics = {
        **{f'mean {c}': lambda x, c=c: x[..., c].mean((1, 2)) for c in range(3)},
        **{f'std {c}': lambda x, c=c: x[..., c].std((1, 2)) for c in range(3)},
        'unchanged': lambda x: (np.abs(x - plain) < 0.5 / std).all(-1).mean((1, 2)),
        'change': lambda x: np.abs(x - plain).mean((1, 2, 3)),
    }
    if 'random_erase' in fields:   # auto-augmented pixels are whole grey levels, N(0, 1) not
        statistics['erased'] = lambda x: (np.abs(x * std + mean - np.round(x * std + mean))
                                          > 1e-3).any(-1).mean((1, 2))
    for name, statistic in statistics.items():
        assert ks_distance(statistic(host), statistic(device)) < 0.07, name
    assert not np.allclose(device[0], device[1])


# ---- the training preprocessing --------------------------------------------------------------

def config_for(augment='imagenet', **kw):
    """A config whose per-pixel augmentation runs on the host, as these tests test."""
    config = default.get_config()
    config.update(dataset='imagenet2012', image_size=24, augment=augment, augment_on='host')
    config.update(kw)
    return config


PIXELS = noise_image(11, shape=(40, 30, 3))


def run_pipeline(ds):
    batches = list(ds.as_numpy_iterator())
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize('augment,extra', [
    ('imagenet', {}), ('cifar', {}), ('imagenet', {'color_jitter': 0.4, 'pca_lighting': 0.1})])
def test_preprocessing_unchanged_without_the_new_fields(augment, extra):
    """With auto_augment '' and random_erase 0 the images are bit for bit those of a config
    that lacks the fields (as benchmark builds), in training and evaluation, fed or not."""
    seeds = [(5, k) for k in range(4)]
    config = config_for(augment, **extra)
    bare = config_for(augment, **extra)
    del bare['auto_augment'], bare['random_erase']
    for train in (True, False):
        assert image_settings.feed_dtype(config, train) == image_settings.feed_dtype(bare, train)
        a, b = (run_pipeline(pipeline(c, seeds, train)) for c in (config, bare))
        for normalise in (True, False):
            assert a[normalise].dtype == b[normalise].dtype
            np.testing.assert_array_equal(a[normalise].view(np.uint8),
                                          b[normalise].view(np.uint8))


def pipeline(config, seeds, train=True):
    """seed → {normalise: image} for `seeds`, one tf.data pipeline (traced once)."""
    fns = {normalise: preprocess.preprocess_fn(config, train, None, normalise)
           for normalise in (True, False)}
    return tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
        lambda s: {k: f(tf.constant(PIXELS), s) for k, f in fns.items()})


@pytest.mark.parametrize('spec', ['ta_wide', 'rand-m9-n2-mstd0.5'])
def test_preprocessing_with_auto_augment_and_erasing(spec):
    """In a tf.data pipeline, deterministic per seed, changes training images; the fed pixels
    (bfloat16: the erasing fill leaves 0..255) normalise to the host's images."""
    seeds = [(5, k) for k in range(12)]
    config = config_for(auto_augment=spec, random_erase=0.25)
    ds = pipeline(config, seeds)
    out = run_pipeline(ds)
    again = run_pipeline(ds)
    for normalise in (True, False):
        np.testing.assert_array_equal(out[normalise], again[normalise])
    host, fed = out[True], out[False]
    assert host.shape == fed.shape == (12, 24, 24, 3) and host.dtype == np.float32
    assert len({h.tobytes() for h in host}) == 12
    plain = run_pipeline(pipeline(config_for(), seeds))[True]
    assert sum(not np.array_equal(a, b) for a, b in zip(host, plain)) >= 6
    assert image_settings.feed_dtype(config, True) == 'bfloat16'
    assert fed.dtype == tf.bfloat16.as_numpy_dtype
    mean, std = (np.array(v) for v in image_settings.normalisation(config))
    raw = host * std + mean
    # bfloat16 holds |x| < 256 to half a grey level, to one from 256 to 512
    levels = np.abs(fed.astype(np.float32) - raw)
    assert (levels <= np.where(np.abs(raw) < 256, 0.5, 1.0) + 1e-3).all()
    assert ((raw < 0) | (raw > 255)).any()          # the erasing fill left 0..255


def test_auto_augment_alone_feeds_uint8_and_leaves_evaluation():
    seeds = [(5, k) for k in range(4)]
    config = config_for(auto_augment='ta_wide')
    assert (image_settings.feed_dtype(config, True) == image_settings.feed_dtype(config, False)
            == 'uint8')
    out = run_pipeline(pipeline(config, seeds))
    assert out[False].dtype == np.uint8
    mean, std = (np.array(v, np.float32) for v in image_settings.normalisation(config))
    np.testing.assert_allclose((out[False] - mean) / std, out[True],
                               atol=1e-5)      # auto-augmented pixels are whole numbers
    evaluated = run_pipeline(pipeline(config, seeds[:1], train=False))
    plain = run_pipeline(pipeline(config_for(), seeds[:1], train=False))
    for normalise in (True, False):
        np.testing.assert_array_equal(evaluated[normalise], plain[normalise])


@pytest.mark.parametrize('fields', [dict(color_jitter=0.4, pca_lighting=0.1),
                                    dict(auto_augment='ta_wide', random_erase=0.1)])
def test_device_augmentation_leaves_the_host_the_crop_and_flip(fields):
    """With augment_on='device' the host sends the flipped crop as uint8, bit for bit that of
    the same config without per-pixel augmentation; the step does the rest."""
    seeds = [(5, k) for k in range(6)]
    config = config_for(**fields, augment_on='device')
    assert image_settings.feed_dtype(config, True) == 'uint8'
    sent = run_pipeline(pipeline(config, seeds))[False]
    plain = run_pipeline(pipeline(config_for(augment_on='device'), seeds))[False]
    np.testing.assert_array_equal(sent, plain)
    hosted = run_pipeline(pipeline(config_for(**fields), seeds))[False]
    assert sent.dtype == np.uint8 and not np.array_equal(hosted.astype(np.float32), sent)


def test_preprocessing_names_the_field_of_a_bad_spec():
    with pytest.raises(ValueError, match='--config.auto_augment'):
        preprocess.preprocess_fn(config_for(auto_augment='rand-n0'), True, None)
