"""The model layer: every registered network, exact sizes, the Fig. 3 forms, dtypes, BN."""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import resnext_jax
from resnext_jax import summary
from resnext_jax.aggregated import conv, resolve_form, sliced_conv
from resnext_jax.models import Bottleneck, ResNeXt

# A small network with the full topology: stride-2 stage, projection shortcuts, 4 paths.
TINY = dict(stage_sizes=(1, 2), cardinality=4, bottleneck_width=2, base_features=16,
            stem_width=8, num_classes=5)


def tiny(**kw):
    return ResNeXt(**{**TINY, **kw})


def images(n=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def max_rel_err(a, b):
    """Largest |a - b| over the tree, relative to the largest |b| of the same leaf."""
    errs = jax.tree_util.tree_map(
        lambda u, v: np.max(np.abs(np.asarray(u) - v)) / max(np.max(np.abs(v)), 1e-30), a, b)
    return max(jax.tree_util.tree_leaves(errs))


# ------------------------------------------------------------------------------------ registry

@pytest.mark.parametrize('name', resnext_jax.list_models())
def test_every_registered_network_output_shapes(name):
    model = resnext_jax.create_model(name)
    cifar = name.startswith('resnext29')
    size, classes = (32, 10) if cifar else (224, 1000)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {'params', 'batch_stats'}
    assert jax.eval_shape(model.apply, variables, x).shape == (2, classes)
    feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    strides = (1, 2, 4) if cifar else (4, 8, 16, 32)
    assert list(feats) == [f'C{i + 2}' for i in range(len(strides))]
    for i, (key, stride) in enumerate(zip(feats, strides)):
        assert feats[key].shape == (2, size // stride, size // stride, 256 * 2**i)


def test_list_models_has_every_paper_network():
    names = set(resnext_jax.list_models())
    for d in (50, 101):  # Table 3
        assert {f'resnext{d}_{c}' for c in ('2x40d', '4x24d', '8x14d', '32x4d')} <= names
    assert {'resnet50', 'resnet101', 'resnet152', 'resnet200', 'resnet101_1x100d',
            'resnext101_2x64d', 'resnext101_64x4d', 'resnext152_32x4d',
            'resnext101_32x8d'} <= names
    assert {f'resnext29_{c}x64d' for c in (1, 2, 4, 8, 16)} <= names


# Parameter counts of the same networks in torchvision (1000 classes) and in the official
# CIFAR code (10 classes), as those projects count them.
REFERENCE_PARAMS = {
    'resnet50': 25_557_032, 'resnext50_32x4d': 25_028_904, 'resnet101': 44_549_160,
    'resnext101_32x8d': 88_791_336, 'resnext101_64x4d': 83_455_272,
    'resnext29_8x64d': 34_426_698, 'resnext29_16x64d': 68_155_210,
}


def param_count(model, size=224):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return summary.count_params(jax.eval_shape(model.init, jax.random.key(0), x)['params'])


@pytest.mark.parametrize('name,expected', REFERENCE_PARAMS.items())
def test_parameter_counts_match_reference_implementations(name, expected):
    assert param_count(resnext_jax.create_model(name)) == expected


def template_params(stages, C, d, classes, cifar):
    """Parameters from the paper's template (Sec. 3.1), counted by hand: no conv biases,
    BN scale and offset, 1×1 → grouped 3×3 → 1×1 blocks, projection when the shape changes."""
    total = (3 * 3 * 3 * 64 if cifar else 7 * 7 * 3 * 64) + 2 * 64
    cin = 64
    for s, n in enumerate(stages):
        w, out = C * d * 2**s, 256 * 2**s
        for b in range(n):
            total += cin * w + 2 * w + 9 * (w // C) * w + 2 * w + w * out + 2 * out
            if b == 0:
                total += cin * out + 2 * out
            cin = out
    return total + cin * classes + classes


@pytest.mark.parametrize('name', resnext_jax.list_models())
def test_parameter_counts_follow_the_template(name):
    spec = resnext_jax.models.model_spec(name)
    cifar = spec['stem'] == 'cifar'
    expected = template_params(spec['stage_sizes'], spec['cardinality'],
                               spec['bottleneck_width'], spec['num_classes'], cifar)
    assert param_count(resnext_jax.create_model(name), 32 if cifar else 224) == expected


@pytest.mark.parametrize('C,d', [(1, 64), (2, 40), (4, 24), (8, 14), (32, 4)])
def test_table2_block_parameters_equation4(C, d):
    """conv2 block (256 in, 256 out) of Table 2: C·(256·d + 9·d² + 256·d) conv weights ≈ 70k."""
    block = resnext_jax.AggregatedTransform(C, C * d, 256)
    variables = jax.eval_shape(block.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 56, 56, 256), jnp.float32))
    p = variables['params']
    convs = summary.count_params([p['conv1'], p['conv2'], p['conv3']])
    assert convs == C * (256 * d + 9 * d * d + 256 * d)
    assert abs(convs - 70_000) < 2_000  # "≈70k" for every row


def test_generic_names_and_overrides():
    m = resnext_jax.create_model('resnext50_16x8d', num_classes=7, zero_init_last_bn=True)
    assert (m.cardinality, m.bottleneck_width, m.num_classes, m.stage_sizes) == (
        16, 8, 7, (3, 4, 6, 3))
    m = resnext_jax.create_model('resnet50', cardinality=32, bottleneck_width=4)
    assert param_count(m) == REFERENCE_PARAMS['resnext50_32x4d']
    assert resnext_jax.create_model('resnext29_8x64d').num_classes == 10
    assert resnext_jax.create_model('resnet50', dtype='bfloat16').dtype == jnp.bfloat16


@pytest.mark.parametrize('name,message', [
    ('resnext51_32x4d', 'unknown model'), ('vgg16', 'unknown model'),
    ('resnext50', 'needs a cardinality'), ('resnet50_32x4d', 'cardinality 1'),
])
def test_bad_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message):
        resnext_jax.create_model(name)


def test_bad_options_and_inputs_say_what_is_wrong():
    with pytest.raises(TypeError, match='unknown option.*cardnality'):
        resnext_jax.create_model('resnet50', cardnality=2)
    with pytest.raises(ValueError, match='NHWC'):
        tiny().init(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match='unknown form'):
        tiny(form='fast').init(jax.random.key(0), images(1))


# --------------------------------------------------------------------------------------- forms

def test_all_forms_compute_the_same_function_and_gradients():
    x = images()
    ref = tiny(form='grouped')
    variables = jax.jit(ref.init)(jax.random.key(1), x)
    # Random BN statistics, so that eval mode exercises them too.
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    variables['batch_stats'] = jax.tree_util.tree_map(
        lambda s: jnp.abs(jax.random.normal(next(keys), s.shape)) + 0.5,
        variables['batch_stats'])

    @functools.partial(jax.jit, static_argnums=0)
    def run(model, variables):
        def loss(params, train):
            v = {**variables, 'params': params}
            if train:
                logits, stats = model.apply(v, x, train=True, mutable=['batch_stats'])
            else:
                logits, stats = model.apply(v, x), {}
            return jnp.sum(jnp.sin(logits)), (logits, stats)
        return [jax.value_and_grad(loss, has_aux=True)(variables['params'], train)
                for train in (False, True)]

    expected = run(ref, variables)
    tree = lambda m: jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, jax.random.key(1), x))
    for form in resnext_jax.FORMS:
        model = tiny(form=form)
        assert tree(model) == tree(ref)  # the variables do not depend on the form
        for train, ((_, (logits, stats)), grads), ((_, (logits_ref, stats_ref)), grads_ref) in \
                zip((False, True), run(model, variables), expected):
            assert max_rel_err(logits, logits_ref) <= 1e-5, (form, train)
            assert max_rel_err(grads, grads_ref) <= 1e-5, (form, train)
            if train:
                assert max_rel_err(stats, stats_ref) <= 1e-5, form


@pytest.mark.parametrize('groups,d,strides', [(8, 4, 1), (6, 4, 2), (4, 8, 2), (2, 2, 1),
                                               (3, 2, 1)])
def test_sliced_convolution_equals_grouped(groups, d, strides):
    """Slices of 2 groups (d=4), 1 group (d=8), all groups (2×2), and 3 groups that round
    4 up to 6 channels (3×2): outputs and both gradients as the native grouped convolution."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, groups * d))
    w = jax.random.normal(jax.random.key(1), (3, 3, d, groups * d))
    probe = jax.random.normal(jax.random.key(2), conv(x, w, strides, groups).shape)

    def loss(f):  # outputs and both gradients (the scalar loss itself cancels too much)
        return f(x, w), jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w)) * probe), (0, 1))(x, w)

    got = loss(lambda x, w: sliced_conv(x, w, groups, strides))
    want = loss(lambda x, w: conv(x, w, strides, groups))
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize('strides', [1, 2])
def test_one_by_one_convolution_as_matrix_product(strides):
    """conv() computes 1×1 kernels with a matrix product: same values as XLA's convolution."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 6))
    w = jax.random.normal(jax.random.key(1), (1, 1, 6, 5))
    want = lax.conv_general_dilated(x, w, (strides, strides), 'VALID',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    assert max_rel_err(conv(x, w, strides), want) <= 1e-6


def test_auto_form_is_sliced_on_cpu_and_grouped_on_accelerators():
    assert resolve_form('auto', 'cpu') == 'sliced' and resolve_form('auto') == 'sliced'
    assert resolve_form('auto', 'gpu') == resolve_form('auto', 'tpu') == 'grouped'
    assert resolve_form('blockdiag', 'gpu') == 'blockdiag'
    assert ResNeXt(stage_sizes=(1,), cardinality=2, bottleneck_width=4).form == 'auto'


def test_paths_form_is_a_sum_of_separate_transformations():
    """Form (a) by hand: Σ_i τ_i(x) with each τ_i built from its own slices of the kernels."""
    C, d, out = 3, 2, 5
    block = resnext_jax.AggregatedTransform(C, C * d, out, form='grouped')
    x = images(2, 8)
    v = jax.jit(block.init)(jax.random.key(0), x)
    y = block.apply(v, x)  # eval mode: BN is fixed affine (mean 0, var 1, γ=1, β=0)
    bn = lambda h: h / np.sqrt(1 + 1e-5)
    p = v['params']
    conv = lambda h, w: lax.conv_general_dilated(h, w, (1, 1), 'SAME',
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    paths = []
    for i in range(C):
        sl = slice(i * d, (i + 1) * d)
        h = nn.relu(bn(conv(x, p['conv1']['kernel'][..., sl])))
        h = nn.relu(bn(conv(h, p['conv2']['kernel'][..., sl])))
        paths.append(conv(h, p['conv3']['kernel'][:, :, sl, :]))
    np.testing.assert_allclose(y, bn(sum(paths)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- training and dtypes

def test_jit_grad_through_training_forward_updates_batch_stats():
    model = tiny()
    x = images()
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def step(params, batch_stats):
        def loss(p):
            logits, new = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                      mutable=['batch_stats'])
            return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]), new['batch_stats']
        return jax.grad(loss, has_aux=True)(params)

    grads, stats = step(variables['params'], variables['batch_stats'])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0), path
    # Running mean of the stem BN: 0.9 · 0 + 0.1 · (batch mean of the stem conv output).
    w = variables['params']['stem']['conv']['kernel']
    h = lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(stats['stem']['bn']['mean'], 0.1 * h.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    var = stats['stem']['bn']['var']
    np.testing.assert_allclose(var, 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4)


def test_bfloat16_compute_with_float32_params():
    x = images()
    model = tiny(dtype=jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    jaxpr = jax.make_jaxpr(model.apply)(variables, x)
    # Every convolution (3×3 as conv_general_dilated, 1×1 as a matrix product) and the head
    # compute in bf16: 1 stem + 3 blocks × 3 + 2 projections + 1 head = 13 ops at least.
    ops = [e for e in jaxpr.jaxpr.eqns
           if e.primitive.name in ('conv_general_dilated', 'dot_general')]
    assert len(ops) >= 13 and all(v.aval.dtype == jnp.bfloat16
                                  for e in ops for v in e.invars)
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.float32 and logits.shape == (4, 5)
    ref = tiny().apply(variables, x)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    bf16_params = jax.jit(tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).init)(
        jax.random.key(0), x)
    assert all(p.dtype == jnp.bfloat16
               for p in jax.tree_util.tree_leaves(bf16_params['params']))


def test_initialisation_follows_the_official_code():
    model = ResNeXt(stage_sizes=(1,), cardinality=32, bottleneck_width=8, num_classes=3)
    v = jax.jit(model.init)(jax.random.key(0), images(1, 32))
    agg = v['params']['stage1']['block1']['aggregated']
    k = agg['conv2']['kernel']  # (3, 3, 8, 256): fan-out = 3·3·256
    assert k.shape == (3, 3, 8, 256)
    assert abs(float(jnp.std(k)) / np.sqrt(2 / (9 * 256)) - 1) < 0.05
    assert abs(float(jnp.std(agg['conv1']['kernel'])) / np.sqrt(2 / 256) - 1) < 0.05
    assert float(jnp.max(jnp.abs(k))) > 3 * float(jnp.std(k))  # not truncated at 2σ
    for name in ('bn1', 'bn2', 'bn3'):
        assert jnp.all(agg[name]['scale'] == 1) and jnp.all(agg[name]['bias'] == 0)


def test_batch_norm_momentum_and_epsilon_options():
    x = images(2, 32)
    stem_only = functools.partial(ResNeXt, stage_sizes=(), num_classes=0)
    model = stem_only(bn_momentum=0.5)
    v = jax.jit(model.init)(jax.random.key(0), x)
    _, new = model.apply(v, x, train=True, mutable=['batch_stats'])
    w = v['params']['stem']['conv']['kernel']
    h = lax.conv_general_dilated(x, w, (2, 2), ((3, 3), (3, 3)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(new['batch_stats']['stem']['bn']['mean'], 0.5 * h.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    # With zero running statistics the stem output scales as 1/sqrt(epsilon).
    zero = {**v, 'batch_stats': jax.tree_util.tree_map(jnp.zeros_like, v['batch_stats'])}
    ratio = stem_only(bn_epsilon=1e-3).apply(zero, x) / stem_only().apply(zero, x)
    np.testing.assert_allclose(ratio[jnp.isfinite(ratio)], np.sqrt(1e-5 / 1e-3), rtol=1e-4)


def test_zero_init_last_bn_starts_each_block_as_the_identity():
    x = jnp.abs(images(2, 8)) + 0.1
    x = jnp.concatenate([x] * 4, -1)[..., :8]  # 8 channels, all positive
    block = Bottleneck(cardinality=2, width=4, features=8, zero_init_last=True)
    v = jax.jit(block.init)(jax.random.key(0), x)
    assert jnp.all(v['params']['aggregated']['bn3']['scale'] == 0)
    np.testing.assert_array_equal(block.apply(v, x, mutable=['batch_stats'])[0], x)
    default = Bottleneck(cardinality=2, width=4, features=8)
    v = jax.jit(default.init)(jax.random.key(0), x)
    assert jnp.all(v['params']['aggregated']['bn3']['scale'] == 1)
    assert not jnp.allclose(default.apply(v, x), x)


def test_features_for_backbones():
    model = resnext_jax.create_model('resnext50_32x4d', num_classes=0)
    x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    assert 'head' not in v['params']
    assert jax.eval_shape(model.apply, v, x).shape == (1, 2048)
    feats = jax.eval_shape(functools.partial(model.apply, return_features=True), v, x)
    assert {k: f.shape for k, f in feats.items()} == {
        'C2': (1, 16, 24, 256), 'C3': (1, 8, 12, 512), 'C4': (1, 4, 6, 1024),
        'C5': (1, 2, 3, 2048)}


def test_nnx_bridge_wraps_the_linen_model():
    x = images(2)
    linen_model = tiny()
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x, train=False)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    stats = nnx.state(model, nnx.BatchStat).to_pure_dict()
    reference = jax.jit(linen_model.init)(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        reference['params'])
    np.testing.assert_array_equal(
        model(x, train=False), linen_model.apply({'params': params, 'batch_stats': stats}, x))
    before = jnp.array(model.stem['bn']['mean'][...])
    model(x, train=True, mutable=['batch_stats'])
    assert not jnp.allclose(model.stem['bn']['mean'][...], before)


# -------------------------------------------------------------------------------- summary tool

def test_macs_counter_against_hand_count():
    # The paper's count is of the grouped form (the summary tool's); other forms do more work.
    model = tiny(stage_sizes=(1,), num_classes=3, form='grouped')
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    macs = summary.macs_by_scope(model.apply, v, x)
    # stem 7×7/2 → 16×16×8; pool → 8×8; block: 8→8 (1×1), 3×3 4 groups, 8→16, projection 8→16
    hw = 8 * 8
    assert macs == {'stem': 16 * 16 * 49 * 3 * 8,
                    'stage1': hw * (8 * 8 + 9 * 2 * 8 + 8 * 16 + 8 * 16),
                    'head': 16 * 3}


def test_summary_tool_reports_paper_sizes(capsys):
    summary.main(['resnet50', 'resnext50_32x4d', '--json'])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r['params'] for r in rows] == [25_557_032, 25_028_904]
    assert [round(r['macs'] / 1e9, 1) for r in rows] == [4.1, 4.2]  # Table 1
    assert [r['layer'] for r in rows[1]['rows']] == ['stem', 'stage1', 'stage2', 'stage3',
                                                   'stage4', 'head']
    assert rows[1]['rows'][2]['output'] == [28, 28, 512]
    assert sum(r['params'] for r in rows[1]['rows']) == rows[1]['params']
    assert sum(r['macs'] for r in rows[1]['rows']) == rows[1]['macs']
    summary.main(['resnext29_8x64d'])
    assert '34,426,698' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        summary.main(['resnext51_1x1d'])
    assert 'unknown model' in capsys.readouterr().err
