"""resnext_jax.mixup: Mixup / CutMix (timm 'batch' mode) checked through what its outputs must
satisfy, not through its internals.

λ is read back from the targets: with labels whose partner (mirrored position) has another
label, the own label's target is off + λ·(1 − smoothing), off = smoothing / K. The statistical
tests run a fixed set of keys (so they are deterministic); their tolerances are the ones a
correct implementation passes with probability ≥ 0.999 over the choice of keys.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnext_jax import mixup

K = 10
N_KEYS = 2000
Z = 3.3   # two-sided normal quantile for p = 0.001
KS_C = math.sqrt(-math.log(0.001 / 2) / 2)   # Kolmogorov critical value for p = 0.001


def distinct_images(batch, height, width, channels=1, seed=0, dtype=jnp.float32):
    """Image b is b + noise in [0, 0.5): every pixel differs from every other image's."""
    noise = np.random.default_rng(seed).uniform(0, 0.5, (batch, height, width, channels))
    return jnp.asarray(np.arange(batch)[:, None, None, None] + noise, dtype)


def distinct_labels(batch):
    """Labels with label[i] ≠ label[B − 1 − i] (for even B ≤ K)."""
    return jnp.arange(batch) % K


def lam_from_targets(targets, labels, smoothing=0.0):
    """λ per row: the own label's weight, from off + λ·(1 − smoothing)."""
    targets, labels = np.asarray(targets), np.asarray(labels)
    own = np.take_along_axis(targets, labels[..., None], axis=-1)[..., 0]
    return (own - smoothing / K) / (1 - smoothing)


@functools.lru_cache(maxsize=None)
def _many_fn(batch, height, width, n, mixup_alpha, cutmix_alpha, label_smoothing):
    x, y = distinct_images(batch, height, width), distinct_labels(batch)
    keys = jax.random.split(jax.random.key(123), n)
    # prob and switch_prob traced (as they may be): one compile serves every value
    mix = lambda k, prob, switch: mixup.mix(
        k, x, y, K, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
        switch_prob=switch, label_smoothing=label_smoothing)
    run = jax.jit(jax.vmap(mix, in_axes=(0, None, None)))
    return x, y, functools.partial(run, keys)


def many(batch, height, width, n=N_KEYS, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0,
         switch_prob=0.5, label_smoothing=0.0):
    """mix() over n keys (vmapped); returns images, labels, the keys' mixed images, targets."""
    x, y, run = _many_fn(batch, height, width, n, mixup_alpha, cutmix_alpha, label_smoothing)
    mixed, targets = run(jnp.float32(prob), jnp.float32(switch_prob))
    return np.asarray(x), np.asarray(y), np.asarray(mixed), np.asarray(targets)


def kinds(x, mixed):
    """Per key: 'unchanged', 'cut' (every pixel own or partner, some partner) or 'blend'."""
    own = mixed == x[None]
    partner = mixed == x[None, ::-1]
    flat = lambda a: a.reshape(a.shape[0], -1)
    unchanged = flat(own).all(1)
    cut = flat(own | partner).all(1) & ~unchanged
    return unchanged, cut, ~(unchanged | cut)


# ------------------------------------------------------------------------------ targets

@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0), (0.4, 1.0), (0.0, 0.0)])
def test_targets_are_distributions(smoothing, alphas):
    x = distinct_images(6, 8, 8)
    labels = jnp.array([0, 1, 1, 2, 0, 9])   # with some partners of the same label
    for seed in range(5):
        _, t = mixup.mix(jax.random.key(seed), x, labels, K, mixup_alpha=alphas[0],
                         cutmix_alpha=alphas[1], label_smoothing=smoothing)
        t = np.asarray(t)
        assert t.shape == (6, K) and t.dtype == np.float32
        assert (t >= 0).all()
        np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
        if smoothing:
            assert (t >= smoothing / K - 1e-7).all()   # smoothing never removed


# ------------------------------------------------------------------------------ Mixup

@pytest.mark.parametrize('smoothing', [0.0, 0.2])
def test_mixup_is_the_convex_combination_with_the_mirrored_image(smoothing):
    x, y = distinct_images(8, 6, 5, 3), distinct_labels(8)
    lams = []
    for seed in range(6):
        mixed, t = mixup.mix(jax.random.key(seed), x, y, K, mixup_alpha=0.4,
                             label_smoothing=smoothing)
        lam = lam_from_targets(t, y, smoothing)
        np.testing.assert_allclose(lam, lam[0], atol=1e-6)   # one λ per batch
        lam = lam[0]
        np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-6)
        # the partner's label carries 1 − λ
        partner = np.take_along_axis(np.asarray(t), np.asarray(y)[::-1, None], 1)[:, 0]
        np.testing.assert_allclose(partner, smoothing / K + (1 - lam) * (1 - smoothing),
                                   atol=1e-6)
        lams.append(lam)
    assert len(set(np.round(lams, 6))) == len(lams)   # the keys give different λ


# ------------------------------------------------------------------------------ CutMix

def test_cutmix_copies_one_rectangle_from_the_partner_with_its_area_as_weight():
    h, w = 12, 12
    x, y, mixed, targets = many(4, h, w, n=300, cutmix_alpha=1.0, label_smoothing=0.1)
    own = mixed == x[None]
    partner = mixed == x[None, ::-1]
    assert (own | partner).all()                      # no pixel is blended
    assert not (own & partner).any()                  # (own and partner differ everywhere)
    region = partner[..., 0]                          # (keys, B, H, W)
    assert (partner == region[..., None]).all()       # all channels alike
    assert (region == region[:, :1]).all()            # the same region for every image
    region = region[:, 0]
    nonempty = clipped = 0
    for r in region:
        rows, cols = r.any(1), r.any(0)
        np.testing.assert_array_equal(r, rows[:, None] & cols[None, :])   # a product set...
        for line in (rows, cols):                     # ...of two intervals: a rectangle
            idx = np.flatnonzero(line)
            assert idx.size == 0 or idx[-1] - idx[0] + 1 == idx.size
        if r.any():
            nonempty += 1
            ry, rx = np.flatnonzero(rows), np.flatnonzero(cols)
            if ry[0] > 0 and rx[0] > 0 and ry[-1] < h - 1 and rx[-1] < w - 1:
                # timm's box away from the borders: a square of even side 2·⌊cut/2⌋
                assert ry.size == rx.size and ry.size % 2 == 0
            else:
                clipped += 1
    assert nonempty > 200 and clipped > 50             # both kinds were exercised
    # the partner's pixel fraction is the partner's weight in the targets
    lam = lam_from_targets(targets, y[None], 0.1)
    np.testing.assert_allclose(1 - lam, region.mean((1, 2))[:, None] * np.ones(4), atol=1e-6)


def timm_cutmix_lams(n, h, w, alpha, rng):
    """timm's rand_bbox + correct_lam, re-derived in numpy: the reference distribution."""
    lam = rng.beta(alpha, alpha, n)
    cut_h, cut_w = (h * np.sqrt(1 - lam)).astype(int), (w * np.sqrt(1 - lam)).astype(int)
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    return 1 - (yh - yl) * (xh - xl) / (h * w)


def test_cutmix_lambda_distribution_matches_timms_box_rule():
    h, w, alpha = 10, 7, 1.0
    _, y, _, targets = many(2, h, w, cutmix_alpha=alpha)
    # compared as box areas in pixels (integers: float32 vs float64 λ would shift the atoms)
    ours = np.rint((1 - lam_from_targets(targets, y[None])[:, 0]) * h * w)
    ref = np.rint((1 - timm_cutmix_lams(20000, h, w, alpha, np.random.default_rng(0))) * h * w)
    n, m = ours.size, ref.size
    # two-sample KS; conservative for these discrete (area-valued) distributions
    assert scipy.stats.ks_2samp(ours, ref).statistic < KS_C * math.sqrt((n + m) / (n * m))


# ------------------------------------------------------------------------------ statistics

@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_mixup_lambda_follows_beta(alpha):
    _, y, _, targets = many(2, 2, 2, mixup_alpha=alpha)
    lam = lam_from_targets(targets, y[None])[:, 0].astype(np.float64)
    n = lam.size
    # KS against Beta(α, α)'s CDF (scipy's, independent of jax.random)
    assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).statistic < \
        KS_C / math.sqrt(n)
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.mean() - 0.5) < Z * math.sqrt(var / n)
    # Var of the sample variance: (μ4 − σ⁴)/n, μ4 of Beta(α, α) = 3σ⁴(2α+1)/(2α+3)
    mu4 = 3 * var**2 * (2 * alpha + 1) / (2 * alpha + 3)
    assert abs(lam.var() - var) < Z * math.sqrt((mu4 - var**2) / n) + var / n


def within_binomial(count, n, p):
    return abs(count / n - p) <= Z * math.sqrt(p * (1 - p) / n) + 1 / n


@pytest.mark.parametrize('prob', [0.0, 0.3, 1.0])
def test_prob_is_the_frequency_of_mixed_batches(prob):
    x, _, mixed, _ = many(2, 3, 3, mixup_alpha=1.0, prob=prob)
    unchanged, cut, blend = kinds(x, mixed)
    assert not cut.any()
    assert within_binomial(blend.sum(), blend.size, prob)
    if prob in (0.0, 1.0):
        assert blend.mean() == prob


@pytest.mark.parametrize('switch_prob', [0.25, 0.8])
def test_switch_prob_is_the_frequency_of_cutmix(switch_prob):
    # a CutMix with an empty box looks unchanged: count CutMix as "not blended"
    x, _, mixed, _ = many(2, 4, 4, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
    unchanged, cut, blend = kinds(x, mixed)
    assert cut.sum() > 0.5 * (~blend).sum()
    assert within_binomial((~blend).sum(), blend.size, switch_prob)
    # and with prob < 1: CutMix ∝ prob·switch_prob, Mixup ∝ prob·(1 − switch_prob)
    x, _, mixed, _ = many(2, 4, 4, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob,
                          prob=0.5)
    _, cut, blend = kinds(x, mixed)
    assert within_binomial(blend.sum(), blend.size, 0.5 * (1 - switch_prob))


# ------------------------------------------------------------------------------ determinism

def _layouts():
    devices = np.array(jax.devices())
    assert devices.size == 8
    return {
        '1x8': NamedSharding(Mesh(devices, ('data',)), P('data')),
        '2of2x4': NamedSharding(Mesh(devices.reshape(2, 4), ('data', 'model')), P('data')),
    }


def test_same_key_same_result_however_the_batch_is_sharded():
    x = distinct_images(16, 8, 8, 3)
    y = jnp.array(np.random.default_rng(1).integers(0, K, 16))
    fn = jax.jit(functools.partial(mixup.mix, num_classes=K, mixup_alpha=0.4, cutmix_alpha=1.0,
                                   label_smoothing=0.1))
    placed = {name: (jax.device_put(x, s), jax.device_put(y, s))
              for name, s in _layouts().items()}
    seen = set()
    for seed in range(6):
        key = jax.random.fold_in(jax.random.key(seed), 7)   # as the caller: (seed, step)
        ref = fn(key, x, y)
        again = fn(key, x, y)
        np.testing.assert_array_equal(again[0], ref[0])
        np.testing.assert_array_equal(again[1], ref[1])
        unchanged, cut, blend = kinds(np.asarray(x), np.asarray(ref[0])[None])
        seen.add('cut' if cut[0] else 'blend' if blend[0] else 'unchanged')
        for name, (xs, ys) in placed.items():
            assert len(xs.sharding.device_set) == 8
            out = fn(key, xs, ys)
            np.testing.assert_array_equal(out[0], ref[0], err_msg=name)
            np.testing.assert_array_equal(out[1], ref[1], err_msg=name)
    assert {'cut', 'blend'} <= seen   # both methods were compared, not only unmixed batches
    a = fn(jax.random.key(0), x, y)[1]
    b = fn(jax.random.key(1), x, y)[1]
    assert not np.array_equal(a, b)   # different keys, different batches


# ------------------------------------------------------------------------------ off, dtypes

def test_without_alphas_images_are_unchanged_and_targets_smoothed_one_hot():
    x, y = distinct_images(4, 5, 5, 3), jnp.array([3, 0, 9, 3])
    for smoothing in (0.0, 0.1):
        mixed, t = mixup.mix(jax.random.key(0), x, y, K, label_smoothing=smoothing)
        np.testing.assert_array_equal(mixed, x)
        expected = np.full((4, K), smoothing / K, np.float32)
        expected[np.arange(4), np.asarray(y)] = 1 - smoothing + smoothing / K
        np.testing.assert_allclose(t, expected, rtol=1e-7)
    assert not mixup.enabled(ml_collections.ConfigDict({'mixup_alpha': 0.0,
                                                        'cutmix_alpha': 0.0}))
    assert not mixup.enabled(ml_collections.ConfigDict({}))
    assert mixup.enabled(ml_collections.ConfigDict({'mixup_alpha': 0.2}))
    assert mixup.enabled(ml_collections.ConfigDict({'mixup_alpha': 0.0, 'cutmix_alpha': 1.0}))


@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0)])
def test_images_keep_their_dtype(alphas):
    x = distinct_images(4, 6, 6, 3, dtype=jnp.bfloat16)   # b + noise: still distinct in bf16
    mixed, t = jax.jit(functools.partial(mixup.mix, num_classes=K, mixup_alpha=alphas[0],
                                         cutmix_alpha=alphas[1]))(
        jax.random.key(2), x, distinct_labels(4))
    assert mixed.dtype == jnp.bfloat16 and mixed.shape == x.shape and t.dtype == jnp.float32
    unchanged, cut, blend = kinds(np.asarray(x, np.float32), np.asarray(mixed, np.float32)[None])
    assert (blend if alphas[0] else cut | unchanged)[0]   # CutMix copies bf16 pixels exactly
