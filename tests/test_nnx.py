"""Flax NNX front end (resnext_jax.nnx): the same function as the Linen networks for the same
weights — outputs in training and evaluation mode, new batch statistics, gradients — weights
moving both ways exactly, `eval()` / `train()` surviving a split and merge, and an NNX training
step that ends where the Linen step ends. Real networks by shape (`jax.eval_shape`), small ones
by value."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import resnext_jax.nnx as rnnx
from helpers import assert_trees_close
from resnext_jax import create_model, list_models, models
from resnext_jax.summary import count_params

SMALL = dict(stage_sizes=(1, 2), cardinality=4, bottleneck_width=2, base_features=16,
             stem_width=8, num_classes=7)


def images(n=4, size=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def pair(name=None, **options):
    """(Linen model, its variables, the NNX model loaded with them)."""
    if name:
        linen = create_model(name, **options)
    else:
        linen = models.ResNeXt(**{**SMALL, **options})
    variables = jax.jit(functools.partial(linen.init, train=False))(jax.random.key(0), images(2))
    # Move the statistics off their initial values, so that running and batch ones differ.
    variables = {'params': variables['params'], 'batch_stats': jax.tree_util.tree_map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(1), s.shape),
        variables['batch_stats'])}
    return linen, variables, rnnx.from_linen(linen, variables, rngs=nnx.Rngs(1))


def linen_train(linen, variables, x, key=None):
    rngs = {'dropout': key} if key is not None else {}
    y, updates = linen.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
    return y, updates['batch_stats']


CONFIGS = {
    'resnext': {},
    'resnet': {'cardinality': 1, 'bottleneck_width': 8},
    'cifar_stem': {'stem': 'cifar'},
    'grouped_bn': {'bn_group_size': 2},
    'zero_init': {'zero_init_last_bn': True},
    **{f'form={f}': {'form': f} for f in ('grouped', 'sliced', 'blockdiag', 'paths', 'concat')},
}


@pytest.mark.parametrize('options', CONFIGS.values(), ids=CONFIGS.keys())
def test_nnx_computes_what_linen_computes(options):
    """Same weights: the same logits in evaluation mode and in training mode, the same new
    batch statistics, the same gradients; the NNX state is the Linen variables again."""
    linen, variables, model = pair(**options)
    x = images()
    model.eval()
    np.testing.assert_allclose(model(x), linen.apply(variables, x, train=False), atol=1e-5)
    model.train()
    y, stats = linen_train(linen, variables, x)
    np.testing.assert_allclose(model(x), y, atol=1e-5)
    assert_trees_close(rnnx.variables(model)['batch_stats'], stats, atol=1e-6)

    def linen_loss(params):
        return jnp.sum(linen_train(linen, {**variables, 'params': params}, x)[0] ** 2)

    _, _, fresh = pair(**options)   # NNX: the same weights, statistics not yet updated
    fresh.train()
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(fresh)
    assert_trees_close(nnx.state(grads, nnx.Param).to_pure_dict(),
                       jax.grad(linen_loss)(variables['params']), rtol=1e-4, atol=1e-5)


def test_weights_round_trip_exactly_and_trees_are_linens():
    linen, variables, model = pair(bn_group_size=2, drop_path_rate=0.2, dropout=0.1)
    back = rnnx.variables(model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    again = rnnx.load_variables(rnnx.ResNeXt(**SMALL, rngs=nnx.Rngs(5)), back)
    jax.tree_util.tree_map(np.testing.assert_array_equal, rnnx.variables(again), variables)
    with pytest.raises(ValueError, match='do not fit this network'):
        rnnx.load_variables(rnnx.ResNeXt(**{**SMALL, 'num_classes': 3}, rngs=nnx.Rngs(0)),
                            variables)


@pytest.mark.parametrize('name', ['resnet50', 'resnext50_32x4d', 'resnext29_8x64d',
                                  'resnext101_64x4d'])
def test_registered_networks_have_linens_tree_and_the_papers_counts(name):
    """Every name builds (abstractly): the NNX state's tree and shapes are the Linen
    variables', so the parameter counts are those tests/test_models.py pins to the papers."""
    model = nnx.eval_shape(lambda: rnnx.create_model(name, rngs=nnx.Rngs(0)))
    linen = create_model(name)
    size = 32 if linen.stem == 'cifar' else 64
    shapes = jax.eval_shape(linen.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    ours = jax.tree_util.tree_map(lambda a: a.shape, rnnx.variables(model))
    assert ours == jax.tree_util.tree_map(lambda a: a.shape, dict(shapes))
    assert count_params(rnnx.variables(model)['params']) == count_params(shapes['params'])
    assert name in list_models()


def test_drop_path_and_dropout_act_in_training_only_and_where_linen_acts(monkeypatch):
    """With the masks fixed (drop path patched to drop every other image's branch), training
    mode is Linen's; evaluation ignores drop path and dropout; the rng stream draws masks."""
    def every_other(x, rate, rng):   # the same masks in both front ends
        keep = (jnp.arange(x.shape[0]) % 2 == 0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / (1 - rate), 0.0)

    linen, variables, model = pair(drop_path_rate=0.5)
    x = images()
    model.eval()
    np.testing.assert_allclose(model(x), linen.apply(variables, x, train=False), atol=1e-5)
    model.train()
    drawn = model(x)
    monkeypatch.setattr(models, 'drop_path', every_other)
    _, _, fixed = pair(drop_path_rate=0.5)
    fixed.train()
    np.testing.assert_allclose(fixed(x), linen_train(linen, variables, x, jax.random.key(0))[0],
                               atol=1e-5)
    assert not np.allclose(drawn, fixed(x), atol=1e-4)   # real masks differ from the fixed ones
    _, _, with_dropout = pair(dropout=0.5)
    with_dropout.eval()
    np.testing.assert_allclose(with_dropout(x), linen.apply(variables, x, train=False),
                               atol=1e-5)
    with_dropout.train()
    assert not np.allclose(with_dropout(x), with_dropout(x))   # a new mask each call


def test_return_features_and_bfloat16_as_linen():
    linen, variables, model = pair()
    x = images()
    model.eval()
    ours = model(x, return_features=True)
    theirs = linen.apply(variables, x, train=False, return_features=True)
    assert sorted(ours) == sorted(theirs) == ['C2', 'C3']
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5)
    linen16, variables16, model16 = pair(dtype=jnp.bfloat16)
    model16.eval()
    y = model16(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, linen16.apply(variables16, x, train=False), atol=1e-2)


def test_eval_and_train_hold_after_a_split_and_merge():
    """The mistake to avoid: `eval()` on the model after its graph was split leaves the merged
    copy in training mode. Called on the merged model, `eval()` uses the running statistics
    and `train()` the batch's, as Linen's train=False / train=True."""
    linen, variables, model = pair()
    x = images()
    model.train()
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    model.eval()                          # too late for `merged`: still training
    y_train, _ = linen_train(linen, variables, x)
    np.testing.assert_allclose(merged(x), y_train, atol=1e-5)
    _, _, model = pair()                  # (that call updated the statistics: start again)
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    merged.eval()
    np.testing.assert_allclose(merged(x), linen.apply(variables, x, train=False), atol=1e-5)
    assert not np.allclose(merged(x), y_train, atol=1e-3)
    merged.train()
    np.testing.assert_allclose(merged(x), y_train, atol=1e-5)


def linen_sgd_steps(linen, variables, batches, tx):
    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss(p):
            logits, new = linen.apply({'params': p, 'batch_stats': stats}, x, train=True,
                                      mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new['batch_stats'], opt_state, value

    params, stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    for x, y in batches:
        params, stats, opt_state, _ = step(params, stats, opt_state, x, y)
    return {'params': params, 'batch_stats': stats}


def test_the_nnx_training_step_ends_where_the_linen_step_ends():
    """`nnx.train_step` (split once, jit over the state, `nnx.Optimizer` inside): three SGD
    steps from the same weights give the Linen step's parameters and statistics."""
    linen, variables, model = pair()
    tx = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                rng.integers(0, 7, 4).astype(np.int32)) for _ in range(3)]
    expected = linen_sgd_steps(linen, variables, batches, tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step, state = rnnx.train_step(model, optimizer)
    for x, y in batches:
        state, loss = step(state, x, y)
    assert np.isfinite(loss)
    nnx.update((model, optimizer), state)
    assert_trees_close(rnnx.variables(model), expected, rtol=1e-4, atol=1e-5)


def test_the_fine_tuning_example_runs(tmp_path):
    """examples/nnx_finetune.py, briefly: it trains, evaluates and times the three steps."""
    import os
    import subprocess
    import sys
    from helpers import REPO
    out = subprocess.run([sys.executable, os.path.join('examples', 'nnx_finetune.py'),
                          '--steps', '3', '--time_steps', '2'], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith('fine-tuned 3 steps: loss ') and 'of 360' in lines[0]
    assert len(lines) == 5 and all(' ms  ' in line for line in lines[2:])
