"""Modern-recipe options (timm, "ResNet strikes back"): drop path, dropout, AdamW and LAMB, BCE.

Each is checked against its definition written out here, not against the code's own values,
and at their defaults the training step is the one from before they existed.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from resnext_jax import models, parallel, validate
from resnext_jax import step as step_lib
from resnext_jax.aggregated import AggregatedTransform
from resnext_jax.models import Bottleneck, ResNeXt
from helpers import TINY, tiny_config

SMALL = dict(stage_sizes=(1, 2), cardinality=2, bottleneck_width=2, base_features=8,
             stem_width=8, num_classes=5, stem='cifar')


def images(n, size=8, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def train_apply(model, variables, x, key=None):
    """Training-mode logits; no rng at all when `key` is None."""
    rngs = {} if key is None else {'rngs': {'dropout': key}}
    return model.apply(variables, x, train=True, mutable=['batch_stats'], **rngs)[0]


# ------------------------------------------------------------------------------------ drop path

def test_drop_path_keeps_the_expectation_and_drops_whole_images_at_the_rate():
    rate, n = 0.6, 20_000
    x = jnp.broadcast_to(jnp.arange(1.0, 7.0).reshape(1, 2, 3), (n, 2, 3))
    y = np.asarray(models.drop_path(x, rate, jax.random.key(0)))
    dropped = np.all(y == 0, axis=(1, 2))
    kept = np.all(np.isclose(y, np.asarray(x) / (1 - rate)), axis=(1, 2))
    assert np.all(dropped | kept)                                # each image: all or nothing
    # Binomial(n, rate): the standard deviation of the fraction is 0.0035.
    assert abs(dropped.mean() - rate) < 0.02
    # The mean over images is x: each entry's standard error is x·sqrt(rate/(1-rate)/n).
    np.testing.assert_allclose(y.mean(0), x[0], rtol=0.04)


def test_drop_path_in_a_block_is_identity_in_eval_and_per_image_in_training():
    rate = 0.5
    x = images(400, 2)
    x = jnp.concatenate([x, x[..., ::-1], x[..., :2]], -1)       # 8 channels: identity shortcut
    plain = Bottleneck(cardinality=2, width=4, features=8)
    v = jax.jit(plain.init)(jax.random.key(0), x)
    evaluating = Bottleneck(cardinality=2, width=4, features=8, drop_path=rate, train=False)
    np.testing.assert_array_equal(evaluating.apply(v, x), plain.apply(v, x))
    training = Bottleneck(cardinality=2, width=4, features=8, drop_path=rate, train=True)
    out = np.asarray(training.apply(v, x, rngs={'dropout': jax.random.key(1)}))
    # The block is relu(x + branch): the branch kept (× 1 / (1 - rate)) or dropped, per image.
    branch = AggregatedTransform(2, 4, 8, name='aggregated').apply(
        {'params': v['params']['aggregated'], 'batch_stats': v['batch_stats']['aggregated']}, x)
    kept = np.asarray(jax.nn.relu(x + branch / (1 - rate)))
    dropped = np.asarray(jax.nn.relu(x))
    is_kept = np.all(np.isclose(out, kept, atol=1e-5), axis=(1, 2, 3))
    is_dropped = np.all(np.isclose(out, dropped, atol=1e-5), axis=(1, 2, 3))
    assert np.all(is_kept ^ is_dropped)
    assert abs(is_dropped.mean() - rate) < 0.1                   # 4 standard deviations


@pytest.mark.parametrize('stage_sizes', [(3, 4, 6, 3), (1, 2), (1,)])
def test_drop_path_rate_is_linear_in_block_depth(monkeypatch, stage_sizes):
    """timm (timm/models/resnet.py, make_blocks): block i (from 0) of N gets rate · i / (N - 1)."""
    rate, seen = 0.3, []
    real = models.drop_path
    monkeypatch.setattr(models, 'drop_path', lambda x, r, rng: seen.append(r) or real(x, r, rng))
    model = ResNeXt(**{**SMALL, 'stage_sizes': stage_sizes}, drop_path_rate=rate)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    jax.eval_shape(functools.partial(train_apply, model, key=jax.random.key(0)), v, x)
    n = sum(stage_sizes)
    expected = [rate * i / (n - 1) for i in range(1, n)]         # block 0 has rate 0: not drawn
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_drop_path_and_dropout_do_not_depend_on_the_sharding():
    """The same key gives the same per-image masks whether the batch is split over 8 devices
    or on one: one draw over the global batch."""
    model = ResNeXt(**SMALL, drop_path_rate=0.5, dropout=0.5)
    x = images(16)
    v = jax.jit(model.init)(jax.random.key(0), x)
    step = jax.jit(functools.partial(train_apply, model))
    key = jax.random.key(7)
    one = step(v, x, key)
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    with jax.set_mesh(mesh):
        split = step(v, jax.device_put(x, parallel.batch_sharding(mesh)), key)
    assert len(split.sharding.device_set) == 8
    np.testing.assert_allclose(split, one, rtol=1e-5, atol=1e-6)
    # ... and the masks are there: without them, or with another key, the logits differ.
    without = jax.jit(functools.partial(train_apply, ResNeXt(**SMALL)))(v, x)
    assert not np.allclose(one, without, atol=1e-3)
    assert not np.allclose(one, step(v, x, jax.random.key(8)), atol=1e-3)


# ------------------------------------------------------------------------------------- dropout

def test_dropout_is_identity_in_eval_and_keeps_the_expectation_in_training():
    model, plain = ResNeXt(**SMALL, dropout=0.5), ResNeXt(**SMALL)
    x = images(2)
    v = jax.jit(model.init)(jax.random.key(0), x)
    assert (jax.tree_util.tree_structure(v) ==
            jax.tree_util.tree_structure(jax.jit(plain.init)(jax.random.key(0), x)))
    np.testing.assert_array_equal(jax.jit(model.apply)(v, x), jax.jit(plain.apply)(v, x))
    # Training: the head is linear, so the logits' mean over dropout masks is the plain ones'.
    keys = jax.random.split(jax.random.key(1), 256)
    samples = np.asarray(jax.jit(jax.vmap(
        functools.partial(train_apply, model, v, x)))(keys))
    expected = np.asarray(jax.jit(functools.partial(train_apply, plain))(v, x))
    assert not np.allclose(samples[0], expected, atol=1e-3)
    sem = samples.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(samples.mean(0) - expected) < 5 * sem + 1e-6)


# ------------------------------------------------------------------------------ default: as before

def test_defaults_never_draw_an_rng_and_leave_the_training_step_as_it_was():
    config = tiny_config()
    assert (config.drop_path_rate, config.dropout, config.optimizer, config.loss,
            config.bce_target_thresh) == (0.0, 0.0, 'sgd', 'ce', None)
    model = step_lib.build_model(config, 10)
    # The network of before: built without the new fields.
    old = models.create_model(config.model, num_classes=10, form=config.form,
                              **dict(config.model_options))
    x = images(16)
    v = jax.jit(model.init)(jax.random.key(0), x)
    assert (jax.tree_util.tree_structure(v) ==
            jax.tree_util.tree_structure(jax.eval_shape(old.init, jax.random.key(0), x)))
    # Without any rng: a draw would raise.
    forward = jax.jit(functools.partial(train_apply, model))
    np.testing.assert_array_equal(forward(v, x), jax.jit(functools.partial(train_apply, old))(v, x))

    # The training step of before: softmax cross-entropy on one-hot labels, SGD with momentum
    # and L2 decay added to the gradient.
    old_tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.sgd(0.1, momentum=config.momentum, nesterov=config.nesterov))

    @jax.jit
    def old_step(params, batch_stats, opt_state, x, labels):
        def loss_fn(p):
            logits, new = old.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                    mutable=['batch_stats'])
            return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean(), new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = old_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new['batch_stats'], opt_state, loss

    tx = step_lib.create_optimizer(config, 0.1)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                             batch_stats=v['batch_stats'], opt_state=tx.init(v['params']))
    step = jax.jit(functools.partial(
        step_lib.train_step, model=model, tx=tx, loss=config.loss,
        label_smoothing=config.label_smoothing, bce_target_thresh=config.bce_target_thresh,
        seed=config.seed))
    params, batch_stats, opt_state = v['params'], v['batch_stats'], old_tx.init(v['params'])
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
        labels = rng.integers(0, 10, 16).astype(np.int32)
        state, metrics = step(state, {'image': x, 'label': labels})
        params, batch_stats, opt_state, loss = old_step(params, batch_stats, opt_state, x,
                                                        labels)
        assert metrics['loss'] == loss
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats, batch_stats)


# ---------------------------------------------------------------------------------- optimizers

def adam_moments(m, v, g, t, b1=0.9, b2=0.999):
    """Kingma & Ba: the moments and their bias-corrected values at step t (from 1)."""
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    return m, v, m / (1 - b1**t), v / (1 - b2**t)


def adamw_reference(w, grads, lrs, wd, decayed, eps=1e-8):
    """Loshchilov & Hutter, Alg. 2: w ← w − η_t (m̂ / (√v̂ + ε) + λ w), with η_t the learning
    rate of step t (the PyTorch and optax convention: the decay is scaled by it too)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        m, v, m_hat, v_hat = adam_moments(m, v, g, t)
        w = w - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd if decayed else 0.0) * w)
    return w


def lamb_reference(w, grads, lrs, wd, decayed, eps=1e-6):
    """You et al., Alg. 2 (LAMB), per parameter array: r = m̂ / (√v̂ + ε) + λ w and
    w ← w − η_t ‖w‖ / ‖r‖ · r; as timm's Lamb, arrays left out of the decay take the plain
    step w ← w − η_t · r (no trust ratio unless `always_adapt`)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        m, v, m_hat, v_hat = adam_moments(m, v, g, t)
        r = m_hat / (np.sqrt(v_hat) + eps) + (wd if decayed else 0.0) * w
        trust = np.linalg.norm(w) / np.linalg.norm(r) if decayed else 1.0
        w = w - lr * trust * r
    return w


@pytest.mark.parametrize('decay_bn_and_bias', [False, True])
@pytest.mark.parametrize('optimizer, reference', [('adamw', adamw_reference),
                                                  ('lamb', lamb_reference)])
def test_adamw_and_lamb_follow_their_papers(optimizer, reference, decay_bn_and_bias):
    wd = 0.05
    config = tiny_config(optimizer=optimizer, weight_decay=wd,
                         decay_bn_and_bias=decay_bn_and_bias)
    tx = step_lib.create_optimizer(config, lambda count: 0.01 * (count + 1))   # lr 0.01, 0.02, …
    rng = np.random.default_rng(0)
    shapes = {'conv': {'kernel': (3, 3, 2, 4)}, 'bn': {'scale': (4,), 'bias': (4,)}}
    w0 = jax.tree_util.tree_map(lambda s: rng.normal(size=s), shapes,
                                is_leaf=lambda s: isinstance(s, tuple))
    grads = [jax.tree_util.tree_map(lambda w: rng.normal(size=w.shape), w0) for _ in range(3)]
    params = jax.tree_util.tree_map(lambda w: jnp.asarray(w, jnp.float32), w0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.tree_util.tree_map(jnp.float32, g), state, params)
        params = optax.apply_updates(params, updates)
    for path, w in jax.tree_util.tree_leaves_with_path(w0):
        name = jax.tree_util.keystr(path)
        decayed = decay_bn_and_bias or 'kernel' in name
        expected = reference(w, [_leaf(g, path) for g in grads], [0.01, 0.02, 0.03], wd,
                             decayed)
        got = np.asarray(_leaf(params, path))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(got, w, atol=1e-4)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_optimizer_is_sgd_for_configs_without_the_field():
    """benchmark.py passes a ConfigDict of SGD's fields only."""
    import ml_collections
    config = ml_collections.ConfigDict(dict(weight_decay=0.5, decay_bn_and_bias=True,
                                            momentum=0.0, nesterov=False))
    tx = step_lib.create_optimizer(config, 0.1)
    params = {'w': jnp.ones(3)}
    updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates['w'], -0.1 * (1 + 0.5))   # −lr (g + λ w)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        step_lib.create_optimizer(tiny_config(optimizer='adam'), 0.1)


# ----------------------------------------------------------------------------------------- BCE

def bce_numpy(logits, targets):
    """−t log σ(x) − (1 − t) log(1 − σ(x)), mean over classes, then over the batch."""
    p = 1 / (1 + np.exp(-logits))
    return np.mean(np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)), -1))


@pytest.mark.parametrize('smoothing, thresh, targets', [
    (0.0, None, [[1, 0, 0, 0], [0, 0, 1, 0]]),
    # timm: on 1 − s + s/K, off s/K (K = 4 classes, s = 0.2: 0.85 and 0.05)
    (0.2, None, [[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]]),
    (0.2, 0.1, [[1, 0, 0, 0], [0, 0, 1, 0]]),          # > 0.1: hard targets again
    (0.2, 0.9, [[0, 0, 0, 0], [0, 0, 0, 0]]),          # nothing above 0.9
])
def test_binary_cross_entropy_by_hand(smoothing, thresh, targets):
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [-0.3, 1.5, 3.0, -2.0]])
    labels = np.array([0, 2])
    got = step_lib.training_loss(jnp.asarray(logits, jnp.float32), labels, 'bce', smoothing,
                              thresh).mean()
    np.testing.assert_allclose(got, bce_numpy(logits, np.array(targets, float)), rtol=1e-6)


def test_cross_entropy_is_still_the_default_loss_and_unknown_ones_are_refused():
    logits = np.array([[2.0, -1.0, 0.5]])
    expected = -np.log(np.exp(2.0) / np.exp(logits).sum())
    np.testing.assert_allclose(step_lib.training_loss(jnp.asarray(logits), np.array([0])),
                               [expected], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        step_lib.training_loss(jnp.asarray(logits), np.array([0]), 'mse')


# ------------------------------------------------------------------------------ config and run

@pytest.mark.parametrize('field, value, allowed', [
    ('drop_path_rate', 1.0, 'a finite number ≥ 0 and < 1'),
    ('dropout', -0.1, 'a finite number ≥ 0 and < 1'),
    ('optimizer', 'adam', "one of ('sgd', 'adamw', 'lamb')"),
    ('loss', 'mse', "one of ('ce', 'bce')"),
    ('bce_target_thresh', 1.5, 'None or a finite number ≥ 0 and < 1'),
])
def test_bad_values_are_refused(field, value, allowed):
    with pytest.raises(ValueError, match=f'is not {allowed}: fix --config.{field}'.replace(
            '(', r'\(').replace(')', r'\)')):
        validate.check_config(tiny_config(**{field: value}))


def test_model_options_cannot_set_the_regularisers():
    with pytest.raises(ValueError, match='use --config.drop_path_rate'):
        validate.check_config(tiny_config(model_options={**TINY, 'drop_path_rate': 0.1}))


def test_a_modern_recipe_step_draws_from_seed_and_step_only():
    """The step train.py compiles for a recipe with every new option: it trains, and its masks
    and its per-pixel augmentation depend on (seed, step) alone, as a resumed run needs."""
    config = tiny_config(optimizer='lamb', learning_rate=5e-3, weight_decay=0.02,
                         decay_bn_and_bias=False, loss='bce', label_smoothing=0.1,
                         bce_target_thresh=0.2, drop_path_rate=0.5, dropout=0.5, seed=5,
                         color_jitter=0.4, pca_lighting=0.1, auto_augment='ta_wide',
                         random_erase=0.25)
    validate.check_config(config)
    model = step_lib.build_model(config, 10)
    tx = step_lib.create_optimizer(config, 0.1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,))
    init, _, shardings = step_lib.state_layout(config, model, tx, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        p_train, _ = step_lib.make_steps(config, model, tx, mesh, shardings)
        rng = np.random.default_rng(0)
        batch = {'image': rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8),
                 'label': rng.integers(0, 10, 16).astype(np.int32)}
        copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)   # p_train donates its state
        runs = [p_train(copy(s), batch) for s in (state, state, state.replace(step=1))]
    (first, m1), (again, m2), (_, m3) = runs
    assert np.isfinite(m1['loss']) and m1['loss'] == m2['loss'] != m3['loss']
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, again.params)
    assert int(first.step) == 1


# --------------------------------------------------------------------- repeated augmentation

def _ids(batch):
    """The example ids `test_data.index_source` encodes in pixel (0, 0, 0..1)."""
    x = np.round(batch['image'][:, 0, :2, 0]).astype(int)
    return x[:, 0] * 256 + x[:, 1]


def _id_source(n):
    from resnext_jax import sources
    x = np.zeros((n, 4, 4, 1), np.float32)
    ids = np.arange(n)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = ids // 256, ids % 256
    return sources.ArraySource(x, ids % 5, x[:4], ids[:4] % 5, 5)


def _plain_config(**kw):
    from configs import default
    c = default.get_config()
    c.update(dataset='digits', image_size=4, augment='none', mean=(0., 0., 0.),
             std=(1., 1., 1.), seed=3, **kw)
    return c


@pytest.mark.parametrize('k', [2, 3])
def test_repeated_augmentation_keeps_epochs_and_shows_every_example_k_times(k):
    from resnext_jax import data
    n, batch = 24, 12
    config = _plain_config(repeated_augments=k)
    source = _id_source(n)
    stream = data.train_batches(config, batch, source=source)
    ids = np.concatenate([_ids(next(stream)) for _ in range(n * k // batch)])
    # k epochs of n positions: every example exactly k times (each epoch stays n long).
    np.testing.assert_array_equal(np.bincount(ids, minlength=n), np.full(n, k))
    # k | batch: the k copies of an example sit in one batch, batch/k rows apart (different
    # devices).
    for b in ids.reshape(-1, batch):
        blocks = b.reshape(k, batch // k)
        for j in range(1, k):
            np.testing.assert_array_equal(blocks[j], blocks[0])
    # Two processes' halves are the one-process batch; a resumed stream continues it.
    halves = [data.train_batches(config, batch // 2, process_index=i, process_count=2,
                                 source=source) for i in range(2)]
    both = np.concatenate([np.concatenate([_ids(next(h)) for h in halves])
                           for _ in range(n * k // batch)])
    np.testing.assert_array_equal(both, ids)
    resumed = data.train_batches(config, batch, start_step=3, source=source)
    np.testing.assert_array_equal(_ids(next(resumed)), ids[3 * batch:4 * batch])


def test_repeated_copies_get_their_own_augmentation():
    from resnext_jax import data, sources
    from configs import default
    config = default.get_config()
    config.update(dataset='digits', eval_split='test', image_size=8, augment='cifar', seed=1,
                  repeated_augments=2)
    source = sources.make_source(config)
    images = next(data.train_batches(config, 16, source=source))['image']
    first, second = images[:8], images[8:]   # rows i and 8 + i are copies of one example
    assert sum(not np.array_equal(a, b) for a, b in zip(first, second)) >= 6


def test_repeated_copies_are_spread_over_a_batch_the_repeats_do_not_divide():
    from resnext_jax import data
    n, batch, k = 24, 8, 3                      # 72 positions: 9 batches of 8
    stream = data.train_batches(_plain_config(repeated_augments=k), batch, source=_id_source(n))
    ids = np.concatenate([_ids(next(stream)) for _ in range(n * k // batch)])
    np.testing.assert_array_equal(np.bincount(ids, minlength=n), np.full(n, k))
    rows = data.spread_repeats(batch, k)        # rows of positions ≡ 0, 1, 2 (mod 3)
    assert sorted(rows) == list(range(batch))
    for b in ids.reshape(-1, batch):            # copies of one example never share a block
        blocks = np.split(b, [3, 6])            # 8 rows: positions ≡ 0 (3 rows), 1 (3), 2 (2)
        for x in set(b):
            assert sum(x in blk for blk in blocks) == list(b).count(x)


# ---------------------------------------------------------------------------------- EMA

def test_ema_is_the_closed_form_of_its_updates():
    """ema_t = d·ema_{t−1} + (1 − d)·w_t at the steps that update (every `every`), a copy of
    w_t during the warm-up, unchanged otherwise; written out as a weighted sum here."""
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=3) for _ in range(8)]          # the weights after steps 1..8
    w0, d, every, copy_until = rng.normal(size=3), 0.9, 2, 2
    ema = {'params': {'w': jnp.asarray(w0)}, 'batch_stats': {'s': jnp.asarray(-w0)}}
    for step, w in enumerate(ws, 1):
        ema = step_lib.update_ema(ema, {'w': jnp.asarray(w)}, {'s': jnp.asarray(-w)},
                               jnp.int32(step), d, every, copy_until)
    # Updating steps: 2 (a copy: warm-up), 4, 6, 8 → w2·d³ + (1−d)(w4·d² + w6·d + w8).
    expected = ws[1] * d ** 3 + (1 - d) * (ws[3] * d ** 2 + ws[5] * d + ws[7])
    np.testing.assert_allclose(ema['params']['w'], expected, rtol=1e-6)
    np.testing.assert_allclose(ema['batch_stats']['s'], -expected, rtol=1e-6)


def test_the_training_step_keeps_the_ema_of_params_and_bn_statistics():
    config = tiny_config(ema_decay=0.5, ema_every_steps=1)
    model = step_lib.build_model(config, 10)
    tx = step_lib.create_optimizer(config, 0.1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,))
    init, _, shardings = step_lib.state_layout(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        p_train, _ = step_lib.make_steps(config, model, tx, mesh, shardings, 10)
        expected = jax.tree_util.tree_map(np.asarray, state.ema)
        for _ in range(3):
            batch = {'image': rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8),
                     'label': rng.integers(0, 10, 16).astype(np.int32)}
            state, _ = p_train(state, batch)
            now = {'params': state.params, 'batch_stats': state.batch_stats}
            expected = jax.tree_util.tree_map(lambda e, w: 0.5 * e + 0.5 * np.asarray(w),
                                              expected, now)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           state.ema, expected)
    assert not np.allclose(state.ema['params']['head']['kernel'], state.params['head']['kernel'])


def test_clip_grad_norm_scales_the_gradient_to_the_norm_before_the_optimizer():
    grads = {'a': jnp.full((4,), 3.0), 'b': jnp.full((2, 2), 4.0)}   # ‖g‖ = √(36 + 64) = 10
    params = jax.tree_util.tree_map(jnp.zeros_like, grads)
    config = tiny_config(optimizer='sgd', momentum=0.0, weight_decay=0.0, clip_grad_norm=2.0)
    tx = step_lib.create_optimizer(config, 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    # SGD at lr 1 steps by −g · 2 / 10.
    jax.tree_util.tree_map(lambda u, g: np.testing.assert_allclose(u, -g * 0.2, rtol=1e-6),
                           updates, grads)
    small = jax.tree_util.tree_map(lambda g: g / 100, grads)           # ‖g‖ = 0.1 < 2: as is
    updates, _ = tx.update(small, tx.init(params), params)
    jax.tree_util.tree_map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6),
                           updates, small)


# ------------------------------------------------------------------ every ingredient at once

def test_the_ema_option_of_a_weights_file_is_one_line(tmp_path, capsys):
    from helpers import REPO
    from resnext_jax import convert
    src = f'{REPO}/tests/fixtures/torchvision_resnet.npz'
    assert convert.main([src, str(tmp_path / 'out'), '--ema']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: --ema exports the EMA weights')
    assert not (tmp_path / 'out').exists()
