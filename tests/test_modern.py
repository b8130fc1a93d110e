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

from resnext_jax import models, parallel, train, validate
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
    model = train.build_model(config, 10)
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

    tx = train.create_optimizer(config, 0.1)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                             batch_stats=v['batch_stats'], opt_state=tx.init(v['params']))
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, loss=config.loss,
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
    w ← w − η_t ‖w‖ / ‖r‖ · r."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        m, v, m_hat, v_hat = adam_moments(m, v, g, t)
        r = m_hat / (np.sqrt(v_hat) + eps) + (wd if decayed else 0.0) * w
        w = w - lr * np.linalg.norm(w) / np.linalg.norm(r) * r
    return w


@pytest.mark.parametrize('decay_bn_and_bias', [False, True])
@pytest.mark.parametrize('optimizer, reference', [('adamw', adamw_reference),
                                                  ('lamb', lamb_reference)])
def test_adamw_and_lamb_follow_their_papers(optimizer, reference, decay_bn_and_bias):
    wd = 0.05
    config = tiny_config(optimizer=optimizer, weight_decay=wd,
                         decay_bn_and_bias=decay_bn_and_bias)
    tx = train.create_optimizer(config, lambda count: 0.01 * (count + 1))   # lr 0.01, 0.02, …
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
    tx = train.create_optimizer(config, 0.1)
    params = {'w': jnp.ones(3)}
    updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates['w'], -0.1 * (1 + 0.5))   # −lr (g + λ w)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        train.create_optimizer(tiny_config(optimizer='adam'), 0.1)


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
    got = train.training_loss(jnp.asarray(logits, jnp.float32), labels, 'bce', smoothing,
                              thresh).mean()
    np.testing.assert_allclose(got, bce_numpy(logits, np.array(targets, float)), rtol=1e-6)


def test_cross_entropy_is_still_the_default_loss_and_unknown_ones_are_refused():
    logits = np.array([[2.0, -1.0, 0.5]])
    expected = -np.log(np.exp(2.0) / np.exp(logits).sum())
    np.testing.assert_allclose(train.training_loss(jnp.asarray(logits), np.array([0])),
                               [expected], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        train.training_loss(jnp.asarray(logits), np.array([0]), 'mse')


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
    depend on (seed, step) alone, as a resumed run needs."""
    config = tiny_config(optimizer='lamb', learning_rate=5e-3, weight_decay=0.02,
                         decay_bn_and_bias=False, loss='bce', label_smoothing=0.1,
                         bce_target_thresh=0.2, drop_path_rate=0.5, dropout=0.5, seed=5)
    validate.check_config(config)
    model = train.build_model(config, 10)
    tx = train.create_optimizer(config, 0.1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,))
    init, _, shardings = train.state_layout(config, model, tx, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        p_train, _ = train.make_steps(config, model, tx, mesh, shardings)
        rng = np.random.default_rng(0)
        batch = {'image': rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8),
                 'label': rng.integers(0, 10, 16).astype(np.int32)}
        copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)   # p_train donates its state
        runs = [p_train(copy(s), batch) for s in (state, state, state.replace(step=1))]
    (first, m1), (again, m2), (_, m3) = runs
    assert np.isfinite(m1['loss']) and m1['loss'] == m2['loss'] != m3['loss']
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, again.params)
    assert int(first.step) == 1
