"""Automatic augmentation (resnext_jax.autoaugment): each op against Pillow, the policies
against timm's and torchvision's definitions, determinism, random erasing's statistics, the
spec parser and the training preprocessing that uses them."""
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from configs import default
from helpers import tiny_config
from resnext_jax import autoaugment as aa
from resnext_jax import preprocess, validate

H, W = 18, 22                      # not square, so that height and width cannot be swapped
FILL = (124, 116, 104)             # timm's img_mean for the ImageNet mean


def noise_image(seed=0, low=0, high=256, shape=(H, W, 3)):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


def gradient_image():
    """Smooth content, where bilinear and nearest sampling barely differ from one another."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 11, y * 13, (x + y) * 6], -1).astype(np.uint8)


def run(op, pixels, *args):
    out = op(tf.constant(pixels, tf.float32), *args).numpy()
    assert out.shape == pixels.shape and out.dtype == np.float32
    return out


def pil(pixels):
    return Image.fromarray(pixels)


# ---- each op against Pillow ------------------------------------------------------------------

def test_lookup_ops_equal_pillow():
    """The ops that are per-value look-up tables in PIL are exact."""
    images = [noise_image(0), noise_image(1, 40, 168), gradient_image()]
    narrow = noise_image(2, 90, 130)
    narrow[..., 2] = 77                        # a constant channel: autocontrast leaves it
    two = np.where(noise_image(3) < 128, 30, 200).astype(np.uint8)
    skewed = (noise_image(4).astype(float) ** 2 / 255).astype(np.uint8)
    constant = np.full((H, W, 3), 99, np.uint8)
    for x in images + [narrow, two, skewed, constant]:
        np.testing.assert_array_equal(run(aa.invert, x), ImageOps.invert(pil(x)))
        np.testing.assert_array_equal(run(aa.auto_contrast, x), ImageOps.autocontrast(pil(x)))
        np.testing.assert_array_equal(run(aa.equalize, x), ImageOps.equalize(pil(x)))
    x = images[0]
    for bits in (1, 2, 4, 7, 8):
        np.testing.assert_array_equal(run(aa.posterize, x, bits), ImageOps.posterize(pil(x), bits))
    # Pillow 13 refuses 0 bits; older Pillow (timm's Posterize at M < 2.5) kept no bit: black
    np.testing.assert_array_equal(run(aa.posterize, x, 0), np.zeros_like(x))
    for threshold in (0, 1, 100, 128.5, 255, 256):
        np.testing.assert_array_equal(run(aa.solarize, x, threshold),
                                      ImageOps.solarize(pil(x), threshold))
    for add in (0, 37, 110):   # timm's solarize_add: below 128, add and cap at 255
        expected = pil(x).point(lambda i: min(255, i + add) if i < 128 else i)
        np.testing.assert_array_equal(run(aa.solarize_add, x, add), expected)


@pytest.mark.parametrize('name', ['Brightness', 'Color', 'Contrast', 'Sharpness'])
def test_enhance_ops_match_pillow(name):
    """ImageEnhance within one grey level: PIL blends in C float and truncates to uint8, so a
    value that lands a rounding error from a whole number may truncate the other way (on these
    images they are in fact equal)."""
    op = {'Brightness': aa.brightness, 'Color': aa.color, 'Contrast': aa.contrast,
          'Sharpness': aa.sharpness}[name]
    for x in (noise_image(5), gradient_image()):
        for factor in (0.0, 0.1, 0.55, 1.0, 1.37, 1.9, 1.99):
            expected = np.asarray(getattr(ImageEnhance, name)(pil(x)).enhance(factor))
            assert np.abs(run(op, x, factor) - expected).max() <= 1, factor


def geometric_cases():
    """(our op, its arguments, PIL's equivalent), for both resampling filters."""
    for interpolation, resample in (('NEAREST', Image.NEAREST), ('BILINEAR', Image.BILINEAR)):
        def transform(matrix, resample=resample):
            return lambda im: im.transform(im.size, Image.AFFINE, matrix, resample,
                                           fillcolor=FILL)
        for f in (0.3, -0.3, 0.99):
            yield aa.shear_x, (f, FILL, interpolation), transform((1, f, 0, 0, 1, 0))
            yield aa.shear_y, (f, FILL, interpolation), transform((1, 0, 0, f, 1, 0))
        for dx, dy in ((9.9, 0), (-3, 4), (0, -7.3)):
            yield aa.translate, (dx, dy, FILL, interpolation), transform((1, 0, dx, 0, 1, dy))
        for degrees in (17, -30, 45, 90, 135, 180):
            yield aa.rotate, (degrees, FILL, interpolation), (
                lambda im, d=degrees, r=resample: im.rotate(d, r, fillcolor=FILL))


def test_geometric_ops_match_pillow():
    """Image.transform / Image.rotate, PIL's pixel centres, fill and edge clamping: at most one
    line of pixels (1 / min(H, W) of them) off by more than one grey level. Nearest sampling
    may pick the other neighbour where a sample point lies exactly between two pixels (at
    multiples of 45°, a whole diagonal), as PIL steps in fixed point; bilinear values may
    truncate the other way (float32 here, double in PIL)."""
    for op, args, reference in geometric_cases():
        for x in (noise_image(6), gradient_image()):
            diff = np.abs(run(op, x, *args) - np.asarray(reference(pil(x))))
            assert (diff > 1).mean() <= 1 / min(H, W), (op.__name__, args, (diff > 1).mean())
            assert diff.mean() < 3, (op.__name__, args)
    # the fill: a translation by the width leaves nothing of the image
    empty = run(aa.translate, noise_image(7), W, 0.0, FILL, 'BILINEAR')
    np.testing.assert_array_equal(empty, np.broadcast_to(FILL, empty.shape))


# ---- the policies against timm's and torchvision's definitions -------------------------------

def many_draws(draws_fn, n, key=11):
    """draws_fn(seed) for seeds (key, 0..n-1), in one tf.data pass."""
    ds = tf.data.Dataset.range(n).map(lambda i: draws_fn(tf.stack([tf.constant(key, tf.int64),
                                                                   i])))
    return {k: v.numpy() for k, v in next(iter(ds.batch(n))).items()}


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


@pytest.mark.parametrize('spec', ['rand-m7-n1-p1-mstd0.5', 'rand-m7-n1-p1-mstd0.5-inc1'])
def test_rand_augment_ops_are_timms(spec):
    """Every op of the set, at the magnitude and sign drawn for a seed, is timm's op at them;
    `img_mean` (the mean rounded) fills."""
    policy = aa.parse(spec)
    assert policy.ops == (aa.RAND_INCREASING_OPS if policy.increasing else aa.RAND_OPS)
    draws = many_draws(lambda s: aa.rand_augment_draws(policy, s), 200)
    mean = (123.675, 116.28, 103.53)
    augment = tf.function(lambda x, s: aa.augment(policy, x, s, mean))
    x = noise_image(12)       # every grey level about 5 times: thresholds off by one show
    for k, name in enumerate(policy.ops):
        for i in np.flatnonzero(draws['ops'][:, 0] == k)[:4]:
            ours = augment(tf.constant(x, tf.float32), tf.constant([11, i], tf.int64)).numpy()
            m, sign = draws['magnitudes'][i, 0], draws['signs'][i, 0]
            assert_like(ours, timm_reference(name, pil(x), m, sign, FILL), name)


def test_trivial_augment_wide_is_torchvisions():
    """Every op, at the bin and sign drawn for a seed, is torchvision's `_apply_op` on the PIL
    image at `_augmentation_space(31)`'s magnitude, nearest, fill 0."""
    autoaugment = pytest.importorskip('torchvision.transforms.autoaugment')
    InterpolationMode = pytest.importorskip('torchvision.transforms').InterpolationMode
    policy = aa.parse('ta_wide')
    space = autoaugment.TrivialAugmentWide()._augmentation_space(31)
    assert tuple(space) == aa.TA_WIDE_OPS
    draws = many_draws(lambda s: aa.trivial_augment_draws(policy, s), 300)
    augment = tf.function(lambda x, s: aa.augment(policy, x, s))
    x = noise_image(8)
    assert set(draws['op']) == set(range(14))
    for i, k in enumerate(draws['op']):        # about 20 bins of each op
        name = aa.TA_WIDE_OPS[k]
        ours = augment(tf.constant(x, tf.float32), tf.constant([11, i], tf.int64)).numpy()
        magnitudes, signed = space[name]
        m = float(magnitudes[draws['bin'][i]]) if magnitudes.ndim else 0.0
        m = -m if signed and draws['sign'][i] < 0 else m
        expected = autoaugment._apply_op(pil(x), name, m, InterpolationMode.NEAREST, None)
        assert_like(ours, expected, name)


# ---- determinism, ranges, statistics ---------------------------------------------------------

SPECS = ['ta_wide', 'rand-m9-n2-mstd0.5', 'rand-m7-mstd0.5-inc1', 'rand-m9-n3-mstd101-p1']


@pytest.mark.parametrize('spec', SPECS)
def test_deterministic_per_seed_and_in_range(spec):
    """Same seed, same image, eagerly or in tf.data; other seeds give other images; whole
    numbers in 0..255 (inputs outside are clipped first), shape kept."""
    policy = aa.parse(spec)
    x = tf.constant(noise_image(9, shape=(16, 16, 3)), tf.float32) * 1.3 - 30   # -30..301
    seeds = [tf.constant([4, k], tf.int64) for k in range(24)]
    eager = np.stack([aa.augment(policy, x, s).numpy() for s in seeds[:3]])
    np.testing.assert_array_equal(eager, np.stack([aa.augment(policy, x, s).numpy()
                                                   for s in seeds[:3]]))
    ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
        lambda s: aa.augment(policy, x, s))
    mapped = np.stack(list(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(mapped[:3], eager)
    assert mapped.shape == (24, 16, 16, 3) and mapped.dtype == np.float32
    assert mapped.min() >= 0 and mapped.max() <= 255 and (mapped == np.round(mapped)).all()
    assert len({m.tobytes() for m in mapped}) >= 12      # seeds choose different ops


def test_trivial_augment_wide_draws_are_uniform():
    """Over many seeds every op, every one of the 31 bins and both signs come up about equally
    often (within 5 standard deviations of a binomial count)."""
    n = 14 * 300
    draws = many_draws(lambda s: aa.trivial_augment_draws(aa.TrivialAugmentWide(), s), n)
    counts = np.bincount(draws['op'], minlength=14)
    assert len(counts) == 14 and np.abs(counts - 300).max() < 5 * math.sqrt(300 * 13 / 14)
    bins = np.bincount(draws['bin'], minlength=31)
    assert len(bins) == 31 and np.abs(bins - n / 31).max() < 5 * math.sqrt(n / 31)
    assert set(np.unique(draws['sign'])) == {-1.0, 1.0}
    assert abs((draws['sign'] > 0).mean() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_rand_augment_draws():
    """n ops per image, each applied with probability p, uniform over the set; magnitudes with
    the noise std asked for, uniform for mstd > 100, clipped to [0, mmax]."""
    n = 3000
    draws = many_draws(lambda s: aa.rand_augment_draws(aa.parse('rand-m5-n3-p0.3-mstd0.5'), s), n)
    assert draws['ops'].shape == (n, 3)
    applied = draws['ops'] < len(aa.RAND_OPS)
    assert abs(applied.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / applied.size)
    counts = np.bincount(draws['ops'][applied], minlength=15)
    expected = applied.sum() / 15
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)
    m = draws['magnitudes']
    assert abs(m.mean() - 5) < 0.05 and abs(m.std() - 0.5) < 0.03
    signs = draws['signs']
    assert set(np.unique(signs)) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < 0.03

    def magnitudes(spec):
        return many_draws(lambda s: aa.rand_augment_draws(aa.parse(spec), s), 500)['magnitudes']
    uniform = magnitudes('rand-m9-mstd101')
    assert uniform.min() >= 0 and uniform.max() <= 9 and abs(uniform.mean() - 4.5) < 0.3
    assert abs(uniform.std() - 9 / math.sqrt(12)) < 0.2
    assert (magnitudes('rand-m15') == 10).all()              # timm clips to 10 …
    assert (magnitudes('rand-m15-mmax20') == 15).all()       # … unless mmax says otherwise
    clipped = magnitudes('rand-m9-mstd2')
    assert clipped.min() >= 0 and clipped.max() == 10 and clipped.std() > 1
    assert (many_draws(lambda s: aa.rand_augment_draws(aa.parse('rand-p1'), s), 100)['ops']
            < 15).all()


# ---- parse and validate ----------------------------------------------------------------------

def test_parse_valid_specs():
    assert aa.parse('') is None
    assert aa.parse('ta_wide') == aa.TrivialAugmentWide(num_bins=31)
    assert aa.parse('rand-m9-n2-mstd0.5') == aa.RandAugment(9, 2, 0.5, 0.5, 10, False)
    assert aa.parse('rand-m7-mstd0.5-inc1') == aa.RandAugment(7, 2, 0.5, 0.5, 10, True)
    assert aa.parse('rand') == aa.RandAugment(10, 2, 0.5, 0.0, 10, False)   # timm's defaults
    assert aa.parse('rand-n3-m15-mmax20-p1-inc0') == aa.RandAugment(15, 3, 1.0, 0.0, 20, False)
    assert aa.parse('rand-mstd101').magnitude_std == math.inf    # timm: > 100 is uniform
    assert aa.parse('rand-m9-mstd1e2').magnitude_std == 100.0


@pytest.mark.parametrize('spec', [
    'rand-n0', 'rand-x3', 'rand-m9.5', 'rand-p1.5', 'rand-m9-m8', 'rand-inc2', 'rand-mmax0',
    'rand-m', 'rand--m9', 'rand-m9-', 'rand-tweights', 'ta_wide-m9', 'RAND-m9', 'augmix-m3',
    'rand-p0.5.1', 'original', ' rand-m9', 'rand-M9'])
def test_parse_refuses_invalid_specs(spec):
    with pytest.raises(ValueError, match=r"auto_augment '"):
        aa.parse(spec)


def test_check_config_refuses_invalid_specs_in_one_line():
    validate.check_config(tiny_config(auto_augment='rand-m9-n2-mstd0.5', random_erase=0.25))
    validate.check_config(tiny_config(auto_augment='ta_wide'))
    for spec in ('rand-n0', 'trivial'):
        with pytest.raises(ValueError) as error:
            validate.check_config(tiny_config(auto_augment=spec))
        assert '--config.auto_augment' in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(TypeError):
        aa.parse(7)


# ---- random erasing --------------------------------------------------------------------------

def test_random_erase_statistics():
    """timm's 'pixel' mode: erased with probability p; one box of 2%–1/3 of the area (up to
    the rounding of its sides), aspect 0.3–1/0.3, inside the image; fill mean + std·N(0, 1)."""
    h, w, n = 40, 48, 600
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 55.0, 50.0])
    x = tf.fill([h, w, 3], 1000.0)            # a value the fill cannot take
    ds = tf.data.Dataset.range(n).map(lambda i: aa.random_erase(
        x, tf.stack([tf.constant(1, tf.int64), i]), 0.25, tf.constant(mean, tf.float32),
        tf.constant(std, tf.float32)))
    out = next(iter(ds.batch(n))).numpy()
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
    seeds = [tf.constant([2, k], tf.int64) for k in range(20)]
    image = tf.constant(noise_image(10, shape=(h, w, 3)), tf.float32)
    for seed in seeds:
        np.testing.assert_array_equal(aa.random_erase(image, seed, 0.0), image)
    always = [(aa.random_erase(image, s, 1.0).numpy() != image.numpy()).any() for s in seeds]
    assert all(always)


# ---- the training preprocessing --------------------------------------------------------------

def config_for(augment='imagenet', **kw):
    config = default.get_config()
    config.update(dataset='imagenet2012', image_size=24, augment=augment)
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
        assert preprocess.feed_dtype(config, train) == preprocess.feed_dtype(bare, train)
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
    assert preprocess.feed_dtype(config, True) == 'bfloat16'
    assert fed.dtype == tf.bfloat16.as_numpy_dtype
    mean, std = (np.array(v) for v in preprocess.normalisation(config))
    raw = host * std + mean
    # bfloat16 holds |x| < 256 to half a grey level, to one from 256 to 512
    levels = np.abs(fed.astype(np.float32) - raw)
    assert (levels <= np.where(np.abs(raw) < 256, 0.5, 1.0) + 1e-3).all()
    assert ((raw < 0) | (raw > 255)).any()          # the erasing fill left 0..255


def test_auto_augment_alone_feeds_uint8_and_leaves_evaluation():
    seeds = [(5, k) for k in range(4)]
    config = config_for(auto_augment='ta_wide')
    assert preprocess.feed_dtype(config, True) == preprocess.feed_dtype(config, False) == 'uint8'
    out = run_pipeline(pipeline(config, seeds))
    assert out[False].dtype == np.uint8
    mean, std = (np.array(v, np.float32) for v in preprocess.normalisation(config))
    np.testing.assert_allclose((out[False] - mean) / std, out[True],
                               atol=1e-5)      # auto-augmented pixels are whole numbers
    evaluated = run_pipeline(pipeline(config, seeds[:1], train=False))
    plain = run_pipeline(pipeline(config_for(), seeds[:1], train=False))
    for normalise in (True, False):
        np.testing.assert_array_equal(evaluated[normalise], plain[normalise])


def test_preprocessing_names_the_field_of_a_bad_spec():
    with pytest.raises(ValueError, match='--config.auto_augment'):
        preprocess.preprocess_fn(config_for(auto_augment='rand-n0'), True, None)
