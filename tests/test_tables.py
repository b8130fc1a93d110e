"""Paper reproduction: architecture tables from the modules, one recipe per row, the report."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import paper
from resnext_jax import data, image_settings, sources, tables, train, validate
from resnext_jax import step as step_lib
from helpers import REPO, Preempted, stop_input_at, tiny_config


@pytest.fixture(scope='module')
def arch():
    """The architecture tables as the command line prints them: fresh process, CPU, JSON."""
    out = subprocess.run([sys.executable, '-m', 'resnext_jax.tables', '--json'], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_table1_exact_counts_within_the_papers_rounding(arch):
    r50, x50 = arch['table1']
    # Exact integers (torchvision's counts; multiply-adds from the traced computation).
    assert (r50['params'], r50['macs']) == (25_557_032, 4_089_184_256)
    assert (x50['params'], x50['macs']) == (25_028_904, 4_230_479_872)
    # Paper: 25.5M / 4.1 GFLOPs and 25.0M / 4.2 GFLOPs.
    assert abs(r50['params'] - 25.5e6) < 0.1e6 and abs(r50['macs'] - 4.1e9) < 0.1e9
    assert abs(x50['params'] - 25.0e6) < 0.1e6 and abs(x50['macs'] - 4.2e9) < 0.1e9
    assert all(r['params_agrees'] and r['macs_agrees'] for r in arch['table1'])
    # The per-stage template of Table 1: output sizes and ResNeXt block widths.
    stages = {s['layer']: s for s in x50['stages']}
    assert [stages[f'stage{i}']['output'] for i in range(1, 5)] == [
        [56, 56, 256], [28, 28, 512], [14, 14, 1024], [7, 7, 2048]]
    assert [stages[f'stage{i}']['block']['width'] for i in range(1, 5)] == [128, 256, 512, 1024]
    assert [stages[f'stage{i}']['blocks'] for i in range(1, 5)] == [3, 4, 6, 3]
    assert sum(s['params'] for s in x50['stages']) == x50['params']


def test_table2_block_parameters_follow_eq4(arch):
    # Eq. 4, C·(256·d + 9·d² + 256·d), worked by hand for the five settings of Table 2.
    hand = {(1, 64): 69_632, (2, 40): 69_760, (4, 24): 69_888, (8, 14): 71_456, (32, 4): 70_144}
    for r in arch['table2']:
        key = (r['cardinality'], r['bottleneck_width'])
        assert r['block_params'] == r['eq4_params'] == hand[key]
        assert r['group_conv_width'] == r['paper_group_conv_width']


def test_table7_and_complexities(arch):
    assert [(r['model'], r['params']) for r in arch['table7']] == [
        ('resnext29_8x64d', 34_426_698), ('resnext29_16x64d', 68_155_210)]
    assert all(r['params_agrees'] for r in arch['table7'])   # 34.4M, 68.1M
    by_row = {r['row']: r for r in arch['complexity']}
    assert by_row['table3_resnet101']['macs'] == 7_801_405_440
    assert by_row['table4_resnext101_64x4d']['params'] == 83_455_272
    for r in arch['complexity']:   # "preserved complexity": every row near its class
        assert 0.9 < r['macs_over_class'] < 1.1, r


def test_complexity_rows_are_the_table3_and_table4_networks(arch):
    assert [r['row'] for r in arch['complexity']] == [
        r.id for r in tables.ROWS if r.table in ('table3', 'table4')]
    assert len(arch['complexity']) == 14


# --------------------------------------------------------------------------- recipes

PROVIDED = [r.id for r in tables.ROWS if r.provided]


@pytest.mark.parametrize('row', PROVIDED)
def test_recipe_hyperparameters_are_the_papers(row):
    c = paper.get_config(row)
    spec = tables.ROW_IDS[tables.ALIASES.get(row, row)]
    assert c.name == spec.id and c.model == spec.model and c.dataset == spec.dataset
    assert (c.momentum, c.schedule, c.lr_decay_factor, c.decay_bn_and_bias) == (
        0.9, 'step', 0.1, True)
    if spec.dataset == 'imagenet2012':   # Sec. 4
        assert (c.batch_size, c.learning_rate, c.lr_base_batch_size, c.weight_decay) == (
            256, 0.1, 256, 1e-4)
        assert len(c.lr_boundaries_epochs) == 3 and c.num_epochs == 90
        assert c.image_size == 224 and image_settings.eval_resize(c) == (   # 256 → 224
            round(spec.eval_size * 8 / 7) if spec.eval_size else 256)
        assert (c.augment, c.color_jitter, c.pca_lighting, c.bn_group_size) == (
            'imagenet', 0.4, 0.1, 32)
        assert (c.eval_image_size or 224) == (spec.eval_size or 224)
    else:                                # Sec. 5.3
        assert (c.batch_size, c.learning_rate, c.weight_decay, c.num_epochs) == (
            128, 0.1, 5e-4, 300)
        assert tuple(c.lr_boundaries_epochs) == (150, 225)
        assert (c.image_size, c.augment, c.bn_group_size) == (32, 'cifar', 16)


def test_unknown_and_unprovided_rows(capsys):
    with pytest.raises(ValueError, match="unknown paper row 'table9'"):
        paper.get_config('table9')
    with pytest.raises(ValueError, match='not provided'):
        paper.get_config('table7_cifar_wide_resnet')
    tables.main(['--rows', 'table5', 'fig7'])
    assert capsys.readouterr().out.split() == [
        'table5_resnext101_64x4d_320', 'fig7_cifar10_resnext29_1x64d',
        'fig7_cifar10_resnext29_2x64d', 'fig7_cifar10_resnext29_4x64d']
    with pytest.raises(SystemExit):
        tables.main(['--rows', 'table9'])
    assert "unknown table 'table9'" in capsys.readouterr().err


SHRINK = {'bottleneck_width': 2, 'base_features': 16, 'stem_width': 8}


@pytest.mark.parametrize('dataset', ['imagenet2012', 'cifar10', 'cifar100'])
def test_every_recipe_builds_and_takes_a_step_on_mock_data(dataset):
    """Each row's network (shrunk: one block per stage, d = 2) and input pipeline: its
    training step traced on a mock batch, and run for the dataset's first row."""
    rows = [r for r in PROVIDED
            if tables.ROW_IDS[tables.ALIASES.get(r, r)].dataset == dataset]
    assert rows
    compiled = {}
    with tfds.testing.mock_data(num_examples=16):
        for row in rows:
            c = paper.get_config(row)
            c.image_size, c.batch_size, c.bn_group_size = 32, 8, 4
            if c.eval_image_size:
                c.eval_image_size = 40
            c.in_memory, c.shuffle_buffer = False, 16
            c.form = 'grouped'   # the quickest to compile; the forms agree (test_models.py)
            depth = len(create_spec(c.model)['stage_sizes'])
            c.model_options = {**SHRINK, 'stage_sizes': (1,) * depth}
            source = sources.make_source(c)
            info = sources.dataset_info(c, source)
            model = step_lib.build_model(c, info.num_classes)
            batch = next(data.train_batches(c, 8, source=source))
            eval_batch = next(data.eval_batches(c, 8, source=source))
            assert eval_batch['image'].shape[1] == (c.eval_image_size or 32)
            key = (model.cardinality, depth, info.num_classes)
            if key not in compiled:
                compiled[key] = one_step(c, model, batch, run=not compiled)
            assert np.isfinite(compiled[key])


def create_spec(name):
    from resnext_jax.models import model_spec
    return model_spec(name)


def one_step(config, model, batch, run):
    """The loss of one training step from a fresh state; traced only (0.0) unless `run`."""
    tx = step_lib.create_optimizer(config, 0.1)
    init = step_lib.make_init(config, model, tx)
    step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx))
    if not run:
        _, metrics = jax.eval_shape(step, jax.eval_shape(init, jax.random.key(0)), batch)
        assert metrics['loss'].shape == ()
        return 0.0
    _, metrics = step(jax.jit(init)(jax.random.key(0)), batch)
    return float(metrics['loss'])


# --------------------------------------------------------------------------- report

def last_eval(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(l) for l in f if '"eval"' in l and l.endswith('\n')][-1]


def test_report_from_real_runs(tmp_path, monkeypatch, capsys):
    done, partial = tmp_path / 'done', tmp_path / 'partial'
    train.train_and_evaluate(tiny_config(name='table7_cifar10_resnext29_8x64d',
                                         num_train_steps=2), done)
    stop_input_at(monkeypatch, 2)
    with pytest.raises(Preempted):
        train.train_and_evaluate(tiny_config(name='table3_resnext50_32x4d', num_train_steps=4,
                                             eval_every_epochs=1 / 89), partial)

    with open(partial / 'metrics.jsonl', 'a') as f:   # the run killed in the middle of a write
        f.write('{"step": 3, "split": "eval", "lo')

    # Tiny runs under the rows' names are no reproductions: each says what differs, and fills
    # no cell.
    rows = {r['row']: r for r in tables.results([str(done), str(partial)])}
    for row in ('table7_cifar10_resnext29_8x64d', 'table3_resnext50_32x4d'):
        assert rows[row]['status'].startswith('not comparable: model resnext29_2x4d, ')
        assert 'dataset digits' in rows[row]['status'] and 'top1_err' not in rows[row]
    assert 'num_train_steps 2' in rows['table7_cifar10_resnext29_8x64d']['differs']
    tables.main(['--results', str(done)])
    line = next(l for l in capsys.readouterr().out.splitlines() if 'ResNeXt-29 8×64d' in l)
    assert 'not comparable: ' in line and line.count('—') >= 2   # no cell of ours

    # The same runs as the recipes' own (their config.json the recipe's): they count.
    for workdir, row in ((done, 'table7_cifar10_resnext29_8x64d'),
                         (partial, 'table3_resnext50_32x4d')):
        (workdir / 'config.json').write_text(json.dumps(tables.recipe(row)))
    rows = {r['row']: r for r in tables.results([str(done), str(partial)])}
    for row, workdir, status in (('table7_cifar10_resnext29_8x64d', done, 'done'),
                                 ('fig7_cifar10_resnext29_8x64d', done, 'done'),
                                 ('table3_resnext50_32x4d', partial, 'running (step 2/4)')):
        ev = last_eval(workdir)
        assert rows[row]['status'] == status
        assert rows[row]['top1_err'] == round(100 * (1 - ev['top1']), 2)
        assert rows[row]['top5_err'] == round(100 * (1 - ev['top5']), 2)
    assert rows['table3_resnext50_32x4d']['paper_top1_err'] == 22.2
    assert rows['table4_resnext101_64x4d']['status'] == 'not run'
    assert rows['table7_cifar_wide_resnet']['status'] == 'not provided'

    tables.main(['--results', str(done), str(partial)])
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if 'ResNeXt-50 32×4d' in l)
    assert '22.20' in line and 'running (step 2/4)' in line
    with pytest.raises(SystemExit, match='is not a training workdir'):
        tables.main(['--results', str(tmp_path)])

    # A run of another recipe (the quick start's has no name) fills no row: one line instead.
    other = tmp_path / 'quickstart'
    shutil.copytree(done, other)
    config = json.loads((other / 'config.json').read_text())
    (other / 'config.json').write_text(json.dumps({**config, 'name': ''}))
    with pytest.raises(SystemExit, match=rf"^error: {other} is not a run of a paper row or "
                                         r"modern recipe \(its recipe name is ''\); pass "
                                         r"workdirs trained with "):
        tables.main(['--results', str(done), str(other)])


# --------------------------------------------------------------------------- modern recipes

MODERN = [r.id for r in tables.MODERN_ROWS]


@pytest.mark.parametrize('row', MODERN)
def test_modern_recipes_are_the_published_ones(row):
    from configs import modern
    c = modern.get_config(row)
    spec = tables.MODERN_ROW_IDS[row]
    validate.check_config(c)
    assert c.name == row and c.model == spec.model and c.dataset == 'imagenet2012'
    assert c.schedule == 'cosine' and c.warmup_epochs == 5 and not c.decay_bn_and_bias
    assert c.batch_size % c.bn_group_size == 0
    if row.startswith('torchvision'):   # the torchvision blog's recipe; EMA as train.py sets it
        assert (c.batch_size, c.learning_rate * c.batch_size / c.lr_base_batch_size) == (1024,
                                                                                         0.5)
        assert (c.optimizer, c.num_epochs, c.weight_decay, c.label_smoothing) == (
            'sgd', 600, 2e-5, 0.1)
        assert (c.image_size, image_settings.eval_size(c), image_settings.eval_resize(c)) == (
            176, 224, 232)
        assert (c.auto_augment, c.random_erase, c.repeated_augments) == ('ta_wide', 0.1, 4)
        assert (c.mixup_alpha, c.cutmix_alpha) == (0.2, 1.0)
        # pycls/torchvision: alpha = (1 − 0.99998) · world · batch per GPU · 32 steps / epochs
        assert c.ema_every_steps == 32
        np.testing.assert_allclose(1 - c.ema_decay, 2e-5 * 8 * 128 * 32 / 600, rtol=1e-12)
    else:                               # "ResNet strikes back", Table 1
        procedure = row.split('_')[1]
        assert (c.optimizer, c.loss, c.batch_size, c.ema_decay) == ('lamb', 'bce', 2048, 0)
        assert c.num_epochs == {'a1': 600, 'a2': 300, 'a3': 100}[procedure]
        assert c.image_size == (160 if procedure == 'a3' else 224)
        test = spec.eval_size or 224
        assert image_settings.eval_size(c) == test
        # The 224 test crops 95 % of the resized image; timm's 288 test takes all of it.
        np.testing.assert_allclose(test / image_settings.eval_resize(c),
                                   1.0 if spec.eval_size else 0.95, atol=0.002)
        assert c.auto_augment.startswith('rand-m6' if procedure == 'a3' else 'rand-m7')


def test_every_modern_recipe_takes_a_step_with_all_its_ingredients():
    """Each modern row, shrunk (one block per stage, d = 2, 32² images), through its input
    pipeline on mock ImageNet, and the jitted step train.py runs (Mixup/CutMix, EMA, LAMB …)
    traced on its batch."""
    from configs import modern
    from jax.sharding import Mesh
    losses = {}
    with tfds.testing.mock_data(num_examples=32):
        for row in MODERN:
            c = modern.get_config(row)
            c.image_size, c.batch_size, c.bn_group_size = 32, 24, 4
            c.eval_image_size, c.eval_resize = 32, 36
            c.in_memory, c.shuffle_buffer, c.form = False, 16, 'grouped'
            c.model_options = {**SHRINK, 'stage_sizes': (1,) * 4}
            source = sources.make_source(c)
            batch = next(data.train_batches(c, 24, source=source))
            key = (c.optimizer, c.loss, c.ema_decay > 0)   # one compile per kind of step
            if key in losses:
                continue
            model = step_lib.build_model(c, 1000)
            tx = step_lib.create_optimizer(c, 0.1)
            mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
            init, abstract, shardings = step_lib.state_layout(c, model, tx, mesh)
            with jax.set_mesh(mesh):   # traced only: tests/test_modern.py runs such steps
                p_train, _ = step_lib.make_steps(c, model, tx, mesh, shardings, 1000, 10)
                state, metrics = jax.eval_shape(p_train, abstract, batch)
            losses[key] = metrics['loss']
            assert metrics['loss'].shape == () and state.step.shape == ()
            assert (state.ema is not None) == (c.ema_decay > 0)
    assert len(losses) == 2, losses


def test_report_of_a_modern_run_shows_the_ema_beside_the_published(tmp_path, capsys):
    run = tmp_path / 'tv2'
    run.mkdir()
    (run / 'config.json').write_text(json.dumps(tables.recipe('torchvision_v2_resnext50_32x4d')))
    (run / 'metrics.jsonl').write_text(json.dumps(
        {'step': 10, 'split': 'eval', 'loss': 1.0, 'top1': 0.75, 'top5': 0.9, 'ema_top1': 0.8,
         'ema_top5': 0.95, 'num_examples': 50000, 'num_steps': 10}) + '\n')
    rows = {r['row']: r for r in tables.results([str(run)])}
    mine = rows['torchvision_v2_resnext50_32x4d']
    assert (mine['top1_err'], mine['top5_err']) == (20.0, 5.0)       # the EMA's, not 25 / 10
    assert mine['paper_top1_err'] == pytest.approx(100 - 81.198)
    assert mine['status'] == 'done, EMA weights'
    assert rows['rsb_a1_resnext50_32x4d']['status'] == 'not run'
    tables.main(['--results', str(run)])
    line = next(l for l in capsys.readouterr().out.splitlines() if 'torchvision V2' in l
                and '50' in l)
    assert '18.80' in line and '20.00' in line and 'done, EMA weights' in line
    # the case: 4 steps at 64 px on a 3-class folder is no reproduction of the row
    config = {**tables.recipe('torchvision_v2_resnext50_32x4d'), 'dataset': 'folder:/data/rgb',
              'image_size': 64, 'eval_image_size': 81, 'eval_resize': 84, 'num_train_steps': 4}
    (run / 'config.json').write_text(json.dumps(config))
    mine = {r['row']: r for r in tables.results([str(run)])}['torchvision_v2_resnext50_32x4d']
    assert mine['status'] == ('not comparable: dataset folder:/data/rgb, image_size 64, '
                              'eval_image_size 81, eval_resize 84, num_train_steps 4')
    assert 'top1_err' not in mine and 'top5_err' not in mine
    tables.main(['--rows', 'rsb'])
    assert capsys.readouterr().out.split() == [r.id for r in tables.MODERN_ROWS
                                               if r.table == 'rsb']
