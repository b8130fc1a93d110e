"""resnext_jax.plan and resnext_jax.tpus: train.py's step compiled by libtpu for a TPU slice.

Needs libtpu (the `tpu` extra); skipped without it. A tiny ResNeXt is compiled for a v5e-4
slice (4 chips, 2x2) at two per-chip batches whose global sizes occur in no other shape of the
program, so that the compiled per-chip program shows where the batch was split.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

if importlib.util.find_spec('libtpu') is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import quickstart
from helpers import REPO
from resnext_jax import plan, tpus
from resnext_jax import step as step_lib

CHIPS = 4                 # v5e-4
BATCHES = (13, 26)        # per chip; globally 52 and 104, sizes no layer of the network has


def tiny_config(**overrides):
    """ResNeXt 2×4d with one block per stage on 12×12 images (stages 12, 6, 3 pixels)."""
    c = quickstart.get_config()
    c.model, c.form, c.dtype = 'resnext29_2x4d', 'auto', 'float32'
    c.model_options = {'stage_sizes': (1, 1, 1), 'stem_width': 8, 'base_features': 16}
    c.image_size, c.batch_size = 12, CHIPS * BATCHES[0]
    c.update(overrides)
    return c


@pytest.fixture(scope='module')
def planned():
    """plan_step at both batches; every compile is kept, and served again when asked twice."""
    tpu_slice = tpus.parse_slice('v5e-4')
    mesh = Mesh(np.asarray(tpus.slice_devices(tpu_slice)), ('data',))
    config = plan.tpu_config(tiny_config())
    compiled, real = {}, plan.compile_step

    def cached(config, mesh, num_classes, global_batch, step=plan.TRAIN):
        key = (config.form, global_batch, step, mesh.devices.flat[0].device_kind)
        if key not in compiled:
            compiled[key] = real(config, mesh, num_classes, global_batch, step)
        return compiled[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(plan, 'compile_step', cached)

        def step(b, **kwargs):
            return plan.plan_step(config, tpu_slice, mesh, 10, per_chip_batch=b, **kwargs)

        rows = {b: step(b) for b in BATCHES}
        yield dict(rows=rows, step=step, config=config,
                   hlo={b: compiled[(config.form, CHIPS * b, plan.TRAIN, 'TPU v5 lite')][0]
                        .as_text() for b in BATCHES})


def test_auto_form_is_the_tpu_form(planned):
    # train.py on a TPU resolves 'auto' with the TPU backend, whatever machine plans the run.
    assert jax.default_backend() == 'cpu'
    assert planned['config'].form == 'grouped'
    assert {r['form'] for r in planned['rows'].values()} == {'grouped'}


def test_the_augmentation_is_placed_as_on_a_tpu():
    """'auto' puts colour noise and erasing in the step and auto-augment on the host, as
    train.py on a TPU does; the batch a plan compiles for is what that host then sends."""
    colour = plan.tpu_config(tiny_config(color_jitter=0.4, pca_lighting=0.1, random_erase=0.2))
    assert colour.augment_on == 'device'
    assert plan.batch_shapes(colour, 8, 12)['image'].dtype == jnp.uint8
    auto = plan.tpu_config(tiny_config(auto_augment='ta_wide', random_erase=0.2))
    assert auto.augment_on == 'host'
    assert plan.batch_shapes(auto, 8, 12)['image'].dtype == jnp.bfloat16   # erasing's fill
    forced = plan.tpu_config(tiny_config(auto_augment='ta_wide', augment_on='device'))
    assert forced.augment_on == 'device'


def test_flops_per_chip_scale_with_the_per_chip_batch(planned):
    small, large = (planned['rows'][b] for b in BATCHES)
    assert large['flops_per_chip'] / small['flops_per_chip'] == pytest.approx(
        BATCHES[1] / BATCHES[0], rel=0.03)
    for r in (small, large):
        assert r['global_batch'] == CHIPS * r['per_chip_batch']
        # Every convolution of the model is in the program, and more (BN, SGD, the loss).
        assert r['flops_per_image'] >= 0.95 * r['model_flops_per_image']
        assert r['bound_seconds'] == max(r['compute_seconds'], r['memory_seconds']) > 0


def test_fits_flips_where_the_memory_says(planned):
    rows = sorted(planned['rows'].values(), key=lambda r: r['hbm_bytes_per_chip'])
    assert all(r['fits'] and r['hbm_capacity_bytes'] == 16 * 2**30 for r in rows)  # v5e
    less, more = (r['hbm_bytes_per_chip'] for r in rows)
    assert 0 < less < more
    between = (less + more) // 2
    again = [planned['step'](r['per_chip_batch'], capacity=between) for r in rows]
    assert [r['fits'] for r in again] == [True, False]
    assert [r['hbm_bytes_per_chip'] for r in again] == [less, more]
    # The total counts the donated state once: arguments + outputs − aliased + temps + code.
    for r in rows:
        assert r['hbm_aliased_bytes'] > 0
        assert r['hbm_bytes_per_chip'] == (
            r['hbm_arguments_bytes'] + r['hbm_outputs_bytes'] - r['hbm_aliased_bytes']
            + r['hbm_temporaries_bytes'] + r['hbm_program_bytes'])


SHAPE = re.compile(r'\b[a-z][a-z0-9]*\[([\d,]*)\]')  # f32[13,12,12,8], bf16[…], pred[…]
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$')


def dims(text):
    return [tuple(int(d) for d in m.split(',') if d) for m in SHAPE.findall(text)]


@pytest.mark.parametrize('b', BATCHES)
def test_every_chip_computes_its_own_images_only(planned, b):
    hlo, global_batch = planned['hlo'][b], CHIPS * b
    shapes, convs, gathers = {}, [], []
    for line in hlo.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            name, result, opcode, rest = m.groups()
            shapes[name] = dims(result)
            if opcode == 'convolution':
                convs.append((dims(result), re.findall(r'%([\w.\-]+)', rest.split(')')[0])))
            if opcode.startswith('all-gather'):
                gathers.append(dims(result))
    all_dims = [d for ds in shapes.values() for shape in ds for d in shape]
    assert global_batch not in all_dims, 'a tensor of the global batch on one chip'
    assert all(global_batch not in shape for g in gathers for shape in g)
    assert len(convs) >= 3 * 4  # stem + 3 blocks × (1×1, 3×3, 1×1, shortcut), and gradients
    for result, operands in convs:
        lhs = shapes[operands[0]]
        # forward and input-gradient convolutions output b images; weight gradients read them
        assert any(b in shape for shape in result + lhs), (result, lhs)


@pytest.mark.parametrize('per_chip, group, overrides', [
    (16, 16, {'dtype': 'float32'}),                                 # one group per chip
    (32, 8, {'dtype': 'bfloat16'}),                                 # four groups per chip
    (32, 8, {'dtype': 'float32', 'fsdp': True, 'fsdp_min_size': 64}),
], ids=['one-group-f32', 'four-groups-bf16', 'four-groups-f32-fsdp'])
def test_grouped_batch_norm_costs_about_what_global_batch_norm_costs(per_chip, group, overrides):
    """On TPU, BN over groups of images reads and writes ≤ 1.10× the bytes of BN over the
    whole batch and needs ≤ 1.15× its HBM. (Regrouping the activations' batch axis, which TPU
    layouts tile together with the channels, cost 2.5-2.7× the bytes and 1.5-2.1× the HBM of
    this program with four groups per chip.)"""
    tpu_slice = tpus.parse_slice('v5e-4')
    mesh = Mesh(np.asarray(tpus.slice_devices(tpu_slice)), ('data',))
    rows = [plan.plan_step(plan.tpu_config(tiny_config(bn_group_size=g, batch_size=CHIPS * per_chip,
                                                       **overrides)), tpu_slice, mesh, 10)
            for g in (0, group)]
    whole, grouped = rows
    assert grouped['bytes_accessed_per_chip'] <= 1.10 * whole['bytes_accessed_per_chip']
    assert grouped['hbm_bytes_per_chip'] <= 1.15 * whole['hbm_bytes_per_chip']


def test_two_device_chips_report_per_chip(planned):
    """A v3 chip is two devices: the plan doubles the one-device program's counts, so a chip
    doing 13 images costs what a v5e chip doing 13 images costs, whatever the chip."""
    v3 = tpus.parse_slice('v3-8')
    mesh = Mesh(np.asarray(tpus.slice_devices(v3)), ('data',))
    b = 2 * 13   # per chip: 13 per TensorCore
    row = plan.plan_step(planned['config'], v3, mesh, 10, per_chip_batch=b)
    v5e = planned['step'](b)
    assert row['devices_per_chip'] == 2 and row['global_batch'] == 4 * b
    assert row['flops_per_chip'] == pytest.approx(v5e['flops_per_chip'], rel=0.03)
    assert row['hbm_capacity_bytes'] == 32 * 2**30
    # the host sends each chip its images as uint8 (normalised on the chip), labels as int32
    assert row['host_bytes_per_chip'] == b * (12 * 12 * 3 + 4) == v5e['host_bytes_per_chip']


def test_refused_program_reports_what_it_needs():
    devices = tpus.slice_devices(tpus.parse_slice('v5e-4'))
    sharding = NamedSharding(Mesh(np.asarray(devices), ('data',)), P('data'))
    rows = 6 * 2**30 // 4 // 1024  # 6 GiB of float32 per chip in, three times that out
    x = jax.ShapeDtypeStruct((CHIPS * rows, 1024), jnp.float32, sharding=sharding)
    f = jax.jit(lambda x: (jnp.sin(x), jnp.cos(x), jnp.exp(x)), out_shardings=sharding)
    with pytest.raises(jax.errors.JaxRuntimeError) as e:
        f.lower(x).compile()
    assert plan.refused_bytes(e.value) == pytest.approx(4 * 6 * 2**30, rel=0.01)
    assert plan.refused_bytes(ValueError('RESOURCE_EXHAUSTED: something else')) is None


@pytest.mark.parametrize('shape', ['linear', 'curved', 'steps'])
def test_largest_fitting_batch(shape):
    """The search's answer is the true boundary, after few measurements where memory is about
    linear in the batch (as a compiled step's is)."""
    capacity = 16 * 2**30
    for fixed, per_image, first in [(3e9, 0.05e9, 32), (0.3e9, 0.11e9, 128), (1e9, 20e6, 8),
                                    (1.7e9, 0.043e9, 32), (1e9, 0.3e9, 200), (20e9, 1e6, 8)]:
        def memory(b):
            if shape == 'steps':  # the batch padded to a multiple of 8
                return fixed + per_image * 8 * math.ceil(b / 8)
            return fixed + per_image * b * (1 + (b / 4000 if shape == 'curved' else 0))

        truth = max((b for b in range(1, 10000) if memory(b) <= capacity), default=0)
        calls = []

        def measure(b):
            calls.append(b)
            return memory(b), memory(b) <= capacity

        b, points = plan.largest_fitting(measure, capacity, {first: measure(first)})
        assert b == truth, calls
        assert (b == 0 or points[b][1]) and not points[b + 1][1]
        if shape != 'steps':
            assert len(calls) - 1 <= 5, calls


def test_max_batch_steps_are_the_batches_the_model_accepts():
    tpu_slice = tpus.parse_slice('v5e-4')
    for groups in (0, 8, 12):
        config = tiny_config(bn_group_size=groups)
        model = step_lib.build_model(config, 10)
        step = plan.batch_step(config, tpu_slice)

        def accepted(per_chip):
            x = jax.ShapeDtypeStruct((CHIPS * per_chip, 12, 12, 3), jnp.float32)
            try:
                jax.eval_shape(lambda x: model.init_with_output(
                    jax.random.key(0), x, train=True, mutable=True), x)
                return True
            except ValueError:
                return False

        assert [b for b in range(1, 10) if accepted(b)] == list(range(step, 10, step)), groups


def test_slice_names_give_libtpu_devices():
    for name, chips, kind, devices_per_chip, hosts in [
            ('v4-8', 4, 'TPU v4', 1, 1), ('v4-32', 16, 'TPU v4', 1, 4),
            ('v5p-8', 4, 'TPU v5', 1, 1), ('v5e-8', 8, 'TPU v5 lite', 1, 1),
            ('v5litepod-8', 8, 'TPU v5 lite', 1, 1), ('v6e-4', 4, 'TPU v6 lite', 1, 1),
            # v2 and v3: the name counts TensorCores, each its own device, two per chip
            ('v3-8', 4, 'TPU v3', 2, 1), ('v3-32', 16, 'TPU v3', 2, 4),
            ('v2-8', 4, 'TPU v2', 2, 1), ('v2-32', 16, 'TPU v2', 2, 4)]:
        s = tpus.parse_slice(name)
        devices = tpus.slice_devices(s)
        assert s.num_chips == chips and len(devices) == chips * devices_per_chip, name
        assert {d.device_kind for d in devices} == {kind} == {s.chip.device_kind}, name
        assert len({d.process_index for d in devices}) == hosts, name
    two = tpus.slice_devices(tpus.parse_slice('v5e-4', num_slices=2))
    assert len(two) == 2 * CHIPS and len({d.slice_index for d in two}) == 2


def run_cli(*args, prelude=''):
    """`python -m resnext_jax.plan ARGS`, after `prelude` (config overrides come from sys.argv)."""
    code = (f'import sys; {prelude}from absl import app; from resnext_jax import plan; '
            f'sys.argv = ["plan", *{list(args)!r}]; plan.define_flags(); app.run(plan.main)')
    return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize('args, prelude, message', [
    (['--config=configs/paper.py:table3_resnext50_32x4d', '--topology=v5e-7'], '',
     "unknown TPU topology 'v5e-7'; known: v2-{8,32,128,256,512}; v3-{8,"),
    (['--config=configs/quickstart.py', '--topology=v4-8', '--config.batch_size=66'], '',
     'batch_size 66 is not divisible by the 4 chips of v4-8'),
    (['--config=configs/quickstart.py', '--topology=v3-8', '--config.batch_size=12'], '',
     'batch_size 12 is not divisible by the 8 TensorCores of v3-8'),
    (['--config=configs/quickstart.py', '--topology=v5e-8'], 'sys.modules["libtpu"] = None; ',
     "libtpu is not installed: pip install -e '.[tpu]'"),
])
def test_bad_input_is_one_error_line(args, prelude, message):
    p = run_cli(*args, prelude=prelude)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith('error: ') and message in p.stderr, p.stderr


def test_run_reports_train_and_eval_steps(planned):
    lines = []
    result = plan.run(tiny_config(), tpus.parse_slice('v5e-4'), num_classes=10, evaluate=True,
                      log=lines.append)
    train, evaluation = result, result['eval']
    assert train['per_chip_batch'] == BATCHES[0] and evaluation['step'] == 'eval'
    # evaluation: forward only, 2 FLOPs per multiply-add instead of 3 × 2
    assert evaluation['model_flops_per_image'] * 3 == train['model_flops_per_image']
    assert 0 < evaluation['flops_per_image'] < train['flops_per_image']
    assert evaluation['hbm_aliased_bytes'] == 0  # nothing donated
    text = '\n'.join(lines)
    assert 'not measured speed' in text and text.count(': fits (') == 2
    json.dumps(result)


def test_command_prints_one_json_object(tmp_path):
    config_file = tmp_path / 'tiny.py'
    config_file.write_text(f'import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n'
                           'from test_plan import tiny_config as get_config\n')
    p = run_cli(f'--config={config_file}', '--topology=v5e-4', '--config.batch_size=8', '--json')
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result['per_chip_batch'] == 2 and result['global_batch'] == 8
    assert result['hbm_capacity_bytes'] == 16 * 2**30 and result['fits'] is True
    assert result['flops_per_chip'] > 0 and result['hbm_bytes_per_chip'] > 0
    assert math.isfinite(result['bound_images_per_sec_per_chip'])
    assert 'not measured speed' in p.stderr  # the report goes to stderr with --json
    # and libtpu's complaints about the TPU hosts this machine does not have stay off it
    for noise in ('Failed to find host bounds', 'E0000', 'Source Location Trace', 'WARNING:'):
        assert noise not in p.stderr, p.stderr[:2000]
