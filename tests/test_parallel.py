"""Data parallel that stays data parallel: the compiled training step of every form over 8 fake
CPU devices computes on each device's own images only, does 1/8 of the work, and trains exactly
like one device.

XLA's SPMD partitioner gathers the whole batch onto every device for a grouped convolution whose
groups have more than one input channel (openxla/xla#47945); `parallel.per_device` runs the
aggregated 3×3 under `jax.shard_map` instead. The tiny network here has such groups (d = 4, 8,
16). Global batch 40 = 8 × 5 and 12×12 images: no other dimension of the network is 5 or 40, so
the shapes in the compiled module tell per-device from global tensors.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from resnext_jax import parallel
from resnext_jax import step as step_lib
from resnext_jax.aggregated import FORMS
from helpers import assert_trees_close, tiny_config

GLOBAL, PER_DEVICE, SIZE = 40, 5, 12
_INSTRUCTION = re.compile(r'%(\S+) = (\(.*?\)|\w+\[[^\]]*\])\S* (\w[\w-]*)\((.*?)\)')


def setup(mesh, **overrides):
    config = tiny_config(image_size=SIZE, batch_size=GLOBAL, **overrides)
    model = step_lib.build_model(config, 10)
    tx = step_lib.create_optimizer(config, 0.1)
    init, _, shardings = step_lib.state_layout(config, model, tx, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    p_train, _ = step_lib.make_steps(config, model, tx, mesh, shardings)
    return state, p_train


def batches(n):
    rng = np.random.default_rng(0)
    return [{'image': rng.integers(0, 256, (GLOBAL, SIZE, SIZE, 3)).astype(np.uint8),
             'label': rng.integers(0, 10, GLOBAL).astype(np.int32)} for _ in range(n)]


def compiled_step(mesh, **overrides):
    state, p_train = setup(mesh, **overrides)
    batch = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches(1)[0])
    with jax.set_mesh(mesh):
        return p_train.lower(state, batch).compile()


def instructions(hlo):
    """[(name, shape text, opcode, operand names)] of every instruction of an HLO module."""
    return [(m[1], m[2], m[3], re.findall(r'%(\S+?)[,)\s]', m[4] + ')'))
            for m in map(_INSTRUCTION.search, hlo.splitlines()) if m]


def dims(shape_text):
    return {int(d) for d in re.findall(r'\d+', ' '.join(re.findall(r'\[([\d,]*)\]',
                                                                    shape_text)))}


# Every per-pixel ingredient, run in the step.
DEVICE_PIXELS = dict(color_jitter=0.4, pca_lighting=0.1, auto_augment='rand-m9-n2-mstd0.5',
                     random_erase=0.25)


@pytest.mark.parametrize('overrides', [
    *({'form': f} for f in FORMS if f != 'auto'),
    {'form': 'grouped', 'fsdp': True, 'fsdp_min_size': 64},
    {'form': 'grouped', 'bn_group_size': 5},
    {'form': 'grouped', **DEVICE_PIXELS},
    {'form': 'grouped', 'auto_augment': 'ta_wide', 'random_erase': 0.1},
], ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()))
def test_every_device_computes_only_its_share(overrides):
    """Also with the per-pixel augmentation in the step (`augment_on='device'`): each device
    augments its own images, with no cross-device traffic."""
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    compiled = compiled_step(mesh, **overrides)
    ops = instructions(compiled.as_text())
    shapes = {name: shape for name, shape, _, _ in ops}
    convs = [(shape, operands) for _, shape, op, operands in ops if op == 'convolution']
    assert convs
    # No tensor of the global batch exists anywhere: no all-gathered activations.
    assert not [(n, s, op) for n, s, op, _ in ops if GLOBAL in dims(s)]
    # Every convolution (forward, input and weight gradients) reads the per-device batch.
    for shape, (lhs, *_) in convs:
        assert PER_DEVICE in dims(shapes[lhs]), (shapes[lhs], shape)
    # One device's FLOPs are an eighth of the one-device step's.
    one_device = compiled_step(Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,)),
                               **overrides)
    flops_8, flops_1 = (c.cost_analysis()['flops'] for c in (compiled, one_device))
    # The augmentation has per-program constants (tables, pixel grids) that a program of 5
    # images pays as one of 40 does: there 8 × 5 images count 6 % above 40.
    pixels = any(k in overrides for k in DEVICE_PIXELS)
    assert 8 * flops_8 == pytest.approx(flops_1, rel=0.08 if pixels else 0.05)


@pytest.mark.parametrize('overrides', [{'form': 'grouped'}, {'form': 'sliced'},
                                       {'form': 'sliced', **DEVICE_PIXELS}],
                         ids=['grouped', 'sliced', 'sliced-device-pixels'])
def test_sharded_steps_equal_one_device_steps(overrides):
    """With the augmentation in the step too: each image is augmented as on one device."""
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = Mesh(np.asarray(devices), (parallel.DATA,))
        state, p_train = setup(mesh, **overrides)
        with jax.set_mesh(mesh):
            for batch in batches(3):
                state, metrics = p_train(state, parallel.global_batch(batch, mesh))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (state_8, metrics_8), (state_1, metrics_1) = results
    assert_trees_close(metrics_8, metrics_1, rtol=1e-5)
    assert_trees_close(state_8, state_1, rtol=1e-5, atol=1e-6)


def test_per_device_is_plain_outside_a_mesh_or_for_uneven_batches():
    def f(x, w):
        assert x.shape[0] == expected
        return x * w
    x, w = jnp.arange(16.0).reshape(8, 2), jnp.float32(3)
    expected = 8
    np.testing.assert_array_equal(parallel.per_device(f, x, w), x * 3)     # no mesh
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        expected = 1                                                        # 8 rows, 8 devices
        np.testing.assert_array_equal(jax.jit(lambda x: parallel.per_device(f, x, w))(x), x * 3)
        expected = 4                                                        # 4 rows: not split
        np.testing.assert_array_equal(
            jax.jit(lambda x: parallel.per_device(f, x, w))(x[:4]), x[:4] * 3)


def _step_cost(per_device, **overrides):
    """(bytes accessed, temporaries) per device of the compiled training step, 16×16 images,
    compiled as `python -m resnext_jax.plan` compiles it (`plan.compile_step`)."""
    from resnext_jax import plan
    config = tiny_config(image_size=16, batch_size=8 * per_device, form='grouped', **overrides)
    compiled, _ = plan.compile_step(config, parallel.make_mesh(), 10, 8 * per_device)
    return compiled.cost_analysis()['bytes accessed'], compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('per_device, group, overrides', [
    (8, 8, {'dtype': 'float32'}),                     # one group per device
    (16, 4, {'dtype': 'bfloat16'}),                   # four groups per device
    (4, 8, {'dtype': 'float32', 'fsdp': True, 'fsdp_min_size': 64}),  # groups across devices
], ids=['one-group-f32', 'four-groups-bf16', 'across-devices-fsdp'])
def test_grouped_batch_norm_costs_about_what_global_batch_norm_costs(per_device, group,
                                                                     overrides):
    """BN over groups of images reads and writes ≤ 1.10× the bytes of BN over the whole batch
    and needs ≤ 1.15× its temporary memory (regrouping the activations cost 1.23-1.39× here,
    and twice the bytes on TPU)."""
    global_bytes, global_temp = _step_cost(per_device, bn_group_size=0, **overrides)
    group_bytes, group_temp = _step_cost(per_device, bn_group_size=group, **overrides)
    assert group_bytes <= 1.10 * global_bytes, group_bytes / global_bytes
    assert group_temp <= 1.15 * global_temp, group_temp / global_temp
