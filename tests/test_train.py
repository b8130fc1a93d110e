"""train.py and resnext_jax.train: end to end over 8 devices, resume, eval, BN (two processes:
test_multiprocess.py).

Every run here is a tiny ResNeXt on real or mock data for a few steps; what is asserted is
equality between runs that must agree, against numbers computed another way.
"""
import json
import logging
import os
import re
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import quickstart
from helpers import (MODERN, REPO, TINY, Preempted, assert_trees_close, read_metrics, run_cli,
                     stop_input_at, tiny_config, tiny_config_file)
from PIL import Image
from resnext_jax import (GroupedBatchNorm, checkpoint, convert, create_model, data, parallel,
                         predict, sources, train)
from resnext_jax import step as step_lib


# ------------------------------------------------------------------------------ end to end

def test_end_to_end_on_mock_tfds_over_8_devices(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config(dataset='cifar10', in_memory=False, image_size=16, batch_size=16,
                         num_train_steps=4, checkpoint_every_steps=3, eval_every_epochs=0.5,
                         # mock_data redirects every file access to its own temporary
                         # directory while it fakes a read, a background save's writes too.
                         async_checkpoints=False)
    with tfds.testing.mock_data(num_examples=40):    # 40 train, 40 test: 2 steps per epoch
        result = train.train_and_evaluate(config, tmp_path)
    assert result['num_examples'] == 40 and 0 <= result['top1'] <= result['top5'] <= 1
    assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    evals = read_metrics(tmp_path, 'eval')
    assert [r['step'] for r in evals] == [1, 2, 3, 4] and evals[-1]['top1'] == result['top1']
    assert os.listdir(tmp_path / 'tensorboard')
    state, meta = checkpoint.load_checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '4']
    assert meta['step'] == 4 and int(state['step']) == 4
    assert meta['global_batch_size'] == 16 and meta['num_classes'] == 10


def test_quickstart_learns_digits(tmp_path):
    """A short run of the quick-start recipe learns: held-out top-1 far above chance."""
    config = quickstart.get_config()
    config.num_epochs, config.eval_every_epochs = 3.0, 3.0
    result = train.train_and_evaluate(config, tmp_path)
    assert result['num_examples'] == 360 and result['top1'] > 0.8


# ------------------------------------------------------------------------------ resume

def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    """Every recipe ingredient on (`helpers.MODERN`: colour jitter, lighting, RandAugment and
    random erasing in the step, repeated augmentation, Mixup/CutMix, drop path, dropout, LAMB,
    BCE, EMA): a run that dies
    (the input raises, as a kill -9 would stop it) or takes a preemption notice resumes and
    ends bit for bit as the uninterrupted one, metrics, parameters and EMA alike; and the EMA
    weights leave the workdir by every door."""
    config = tiny_config(**MODERN, eval_every_epochs=3.5 / 89)   # 89 steps/epoch: eval at 3, 6
    full = train.train_and_evaluate(config, tmp_path / 'full')
    evals = read_metrics(tmp_path / 'full', 'eval')
    assert [r['step'] for r in evals] == [3, 6] and full['ema_top1'] == evals[-1]['ema_top1']
    assert all(0 <= r['ema_top1'] <= r['ema_top5'] <= 1 and r['ema_loss'] > 0 for r in evals)

    real_batches = stop_input_at(monkeypatch, 5)   # steps 1-5 run; step 4's checkpoint is last
    with pytest.raises(Preempted):
        train.train_and_evaluate(config, tmp_path / 'resumed')
    assert [r['step'] for r in read_metrics(tmp_path / 'resumed')] == [1, 2, 3, 4, 5]
    assert checkpoint.load_checkpoint(tmp_path / 'resumed')[1]['step'] == 4
    monkeypatch.setattr(data, 'train_batches', real_batches)
    resumed = train.train_and_evaluate(config, tmp_path / 'resumed')

    assert resumed == full
    for split in ('train', 'eval'):
        assert read_metrics(tmp_path / 'resumed', split) == read_metrics(tmp_path / 'full', split)
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'resumed')[0],
                       checkpoint.load_checkpoint(tmp_path / 'full')[0])

    # A preemption notice at an evaluation step (3): that step is evaluated before the save,
    # since the resumed run starts after it.
    monkeypatch.setattr(checkpoint.PreemptionWatch, 'reached', lambda self, step: step == 3)
    with pytest.raises(checkpoint.Preempted, match='saved step 3 of 6'):
        train.train_and_evaluate(config, tmp_path / 'preempted')
    monkeypatch.undo()
    assert train.train_and_evaluate(config, tmp_path / 'preempted') == full
    for split in ('train', 'eval'):
        assert read_metrics(tmp_path / 'preempted', split) == read_metrics(tmp_path / 'full', split)

    # A finished run re-evaluates and stops; a different global batch is refused.
    assert train.train_and_evaluate(config, tmp_path / 'full') == full
    with pytest.raises(ValueError, match='global_batch_size=16 but the config says 32'):
        train.train_and_evaluate(tiny_config(**MODERN, batch_size=32), tmp_path / 'full')
    # Another optimizer's state, or none for the EMA, has another shape: refused by name, not
    # by a tree mismatch.
    with pytest.raises(ValueError, match="has optimizer='lamb' but the config says 'adamw'"):
        train.train_and_evaluate(tiny_config(**{**MODERN, 'optimizer': 'adamw'}),
                                 tmp_path / 'full')
    with pytest.raises(ValueError, match='ema=True but the config says False'):
        train.train_and_evaluate(tiny_config(**{**MODERN, 'ema_decay': 0.0}), tmp_path / 'full')

    state = checkpoint.load_checkpoint(tmp_path / 'full')[0]
    # The EMA weights leave by every door: export, init_from, and evaluated alone they score
    # what the run reported for them.
    convert.export_weights(str(tmp_path / 'full'), str(tmp_path / 'ema.npz'), ema=True)
    _, exported, _ = convert.load_model(str(tmp_path / 'ema.npz'))
    np.testing.assert_array_equal(exported['params']['head']['kernel'],
                                  state['ema']['params']['head']['kernel'])
    assert not np.array_equal(exported['params']['head']['kernel'],
                              state['params']['head']['kernel'])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(
        tmp_path / 'x.png')
    raw, = predict.predict(str(tmp_path / 'full'), [str(tmp_path / 'x.png')], top=10)
    averaged, = predict.predict(str(tmp_path / 'full'), [str(tmp_path / 'x.png')], top=10,
                                ema=True)
    assert raw[1] != averaged[1]   # other weights, other probabilities
    again = train.train_and_evaluate(
        tiny_config(init_from=str(tmp_path / 'full'), init_from_ema=True, eval_only=True),
        tmp_path / 'ema_eval')
    assert again['top1'] == full['ema_top1']
    np.testing.assert_allclose(again['loss'], full['ema_loss'], rtol=1e-6)
    convert.import_weights(str(tmp_path / 'ema.npz'), str(tmp_path / 'imported'))
    with pytest.raises(ValueError, match='has no EMA weights'):   # one set of weights only
        convert.load_model(str(tmp_path / 'imported'), ema=True)


# ------------------------------------------------------------------------------ evaluation

@pytest.mark.parametrize('batch_size', [64, 56])
def test_eval_counts_each_example_once(batch_size):
    """360 held-out digits in batches of 64 or 56 (neither divides 360) over 8 devices: the
    masked sums equal a plain forward pass over the 360 images."""
    config = tiny_config(augment='none', mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))
    source = sources.make_source(config)
    model = step_lib.build_model(config, 10)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    variables = jax.tree_util.tree_map(   # non-trivial BN statistics
        lambda x: x + 0.1 * jax.random.uniform(jax.random.key(2), x.shape), variables)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                             batch_stats=variables['batch_stats'], opt_state=())
    mesh = parallel.make_mesh()
    eval_fn = jax.jit(lambda s, b: step_lib.eval_step(s, b, model=model, mean=config.mean,
                                                   std=config.std))
    got = train.evaluate(eval_fn, state, config, batch_size, mesh, source)

    images, labels = source.eval
    images = np.repeat(images.astype(np.float32) / 255.0, 3, axis=-1)
    logits = np.asarray(model.apply(variables, images), np.float64)
    assert got['num_examples'] == len(labels) == 360
    np.testing.assert_allclose(got['top1'], np.mean(logits.argmax(-1) == labels))
    top5 = np.argsort(-logits, -1)[:, :5]
    np.testing.assert_allclose(got['top5'], np.mean((top5 == labels[:, None]).any(-1)))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64)))
    np.testing.assert_allclose(got['loss'], -np.mean(logp[np.arange(360), labels]), rtol=1e-5)


# ------------------------------------------------------------------------------ batch norm

def test_grouped_batch_norm_matches_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (8, 3, 3, 4)).astype(np.float32)
    scale, bias = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    bn = GroupedBatchNorm(group_size=4, momentum=0.8, epsilon=1e-3)
    variables = bn.init(jax.random.key(0), x)
    variables = {'params': {'scale': scale, 'bias': bias},
                 'batch_stats': variables['batch_stats']}
    y, updates = bn.apply(variables, x, mutable=['batch_stats'])

    expected, means, variances = [], [], []
    for group in (x[:4], x[4:]):
        mean = group.reshape(-1, 4).mean(0)
        var = ((group.reshape(-1, 4) - mean) ** 2).mean(0)
        expected.append((group - mean) / np.sqrt(var + 1e-3) * scale + bias)
        means.append(mean)
        variances.append(var)
    np.testing.assert_allclose(y, np.concatenate(expected), rtol=1e-5, atol=1e-5)
    stats = updates['batch_stats']
    np.testing.assert_allclose(stats['mean'], 0.2 * np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(stats['var'], 0.8 + 0.2 * np.mean(variances, 0), rtol=1e-5)

    # Eval uses the running statistics, and one group of the whole batch is plain BatchNorm.
    y_eval = GroupedBatchNorm(4, use_running_average=True, epsilon=1e-3).apply(
        {**variables, 'batch_stats': stats}, x)
    np.testing.assert_allclose(
        y_eval, (x - stats['mean']) / np.sqrt(stats['var'] + 1e-3) * scale + bias, rtol=1e-5,
        atol=1e-5)
    plain = nn.BatchNorm(use_running_average=False, epsilon=1e-3)
    np.testing.assert_allclose(
        GroupedBatchNorm(8, epsilon=1e-3).apply(variables, x, mutable=['batch_stats'])[0],
        plain.apply(variables, x, mutable=['batch_stats'])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='groups of 3 images do not divide the batch of 8'):
        GroupedBatchNorm(3).apply(variables, x, mutable=['batch_stats'])


def test_grouped_batch_norm_gradients_equal_the_definitions():
    """Outputs and gradients (input, scale, bias) equal BN written over a regrouped batch:
    each group of 4 images normalised by its own two-pass mean and variance."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(2.0, 3.0, (16, 5, 5, 6)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(2))
    bn = GroupedBatchNorm(group_size=4, epsilon=1e-3)
    stats = bn.init(jax.random.key(0), x)['batch_stats']

    def ours(x, scale, bias):
        y, _ = bn.apply({'params': {'scale': scale, 'bias': bias}, 'batch_stats': stats}, x,
                        mutable=['batch_stats'])
        return jnp.sum(y * cotangent)

    def definition(x, scale, bias):
        groups = x.reshape(4, 4, 5, 5, 6)
        mean = groups.mean((1, 2, 3), keepdims=True)
        var = jnp.square(groups - mean).mean((1, 2, 3), keepdims=True)
        y = ((groups - mean) / jnp.sqrt(var + 1e-3) * scale + bias).reshape(x.shape)
        return jnp.sum(y * cotangent)

    for got, want in zip(jax.value_and_grad(ours, (0, 1, 2))(x, scale, bias),
                         jax.value_and_grad(definition, (0, 1, 2))(x, scale, bias)):
        assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_batch_norm_in_a_sharded_step_is_per_group():
    """bn_group_size=2 on a batch of 16 over 8 devices: each image pair is normalised on its own,
    so the logits of a pair do not depend on the rest of the batch."""
    model = create_model('resnext29_2x4d', num_classes=10, bn_group_size=2, **TINY)
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    variables = model.init(jax.random.key(1), x[:2])
    mesh = parallel.make_mesh()
    apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0],
                    in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))
    sharded = np.asarray(apply(variables, x))
    pair = np.asarray(model.apply(variables, x[6:8], train=True, mutable=['batch_stats'])[0])
    np.testing.assert_allclose(sharded[6:8], pair, rtol=1e-4, atol=1e-5)
    whole = create_model('resnext29_2x4d', num_classes=10, **TINY)
    assert not np.allclose(whole.apply(variables, x, train=True, mutable=['batch_stats'])[0],
                           sharded, atol=1e-3)


# ------------------------------------------------------------------------------ optimization

def test_learning_rate_scales_with_batch_warms_up_and_steps():
    config = tiny_config(learning_rate=0.1, lr_base_batch_size=256, batch_size=512,
                         schedule='step', lr_boundaries_epochs=(30, 60), warmup_epochs=2.0)
    lr = step_lib.learning_rate_schedule(config, steps_per_epoch=10, num_steps=900)
    np.testing.assert_allclose([lr(0), lr(10), lr(20), lr(299), lr(300), lr(600)],
                               [0.0, 0.1, 0.2, 0.2, 0.02, 0.002], rtol=1e-6, atol=1e-9)
    config.update({'schedule': 'cosine', 'warmup_epochs': 0.0})
    lr = step_lib.learning_rate_schedule(config, steps_per_epoch=10, num_steps=900)
    np.testing.assert_allclose([lr(0), lr(450), lr(900)], [0.2, 0.1, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        step_lib.learning_rate_schedule(tiny_config(schedule='linear'), 10, 100)


@pytest.mark.parametrize('decay_bn_and_bias', [True, False])
def test_weight_decay_choice_for_bn_and_bias(decay_bn_and_bias):
    config = tiny_config(weight_decay=0.5, momentum=0.0, decay_bn_and_bias=decay_bn_and_bias)
    tx = step_lib.create_optimizer(config, 0.1)
    params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2))}, 'bn': {'scale': jnp.ones(2)},
              'head': {'bias': jnp.ones(2)}}
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params),
                           params)
    np.testing.assert_allclose(updates['conv']['kernel'], -0.05)
    np.testing.assert_allclose(updates['bn']['scale'], -0.05 if decay_bn_and_bias else 0.0)
    np.testing.assert_allclose(updates['head']['bias'], -0.05 if decay_bn_and_bias else 0.0)


def test_fsdp_shards_state_and_trains_like_replicated(tmp_path):
    config = tiny_config(num_train_steps=2, log_every_steps=1)
    model = step_lib.build_model(config, 10)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    mesh = parallel.make_mesh()
    shardings = parallel.state_shardings(abstract, mesh, fsdp=True, min_size=64)
    for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        split = [a for a, name in enumerate(s.spec) if name == 'data']
        if x.size >= 64 and any(n % 8 == 0 for n in x.shape):   # the largest such axis is split
            assert split == [max((a for a in range(x.ndim) if x.shape[a] % 8 == 0),
                                 key=lambda a: x.shape[a])], (x.shape, s.spec)
        else:
            assert not split, (x.shape, s.spec)
    assert any('data' in s.spec for s in jax.tree_util.tree_leaves(shardings))

    replicated = train.train_and_evaluate(config, tmp_path / 'replicated')
    sharded = train.train_and_evaluate(
        tiny_config(num_train_steps=2, fsdp=True, fsdp_min_size=64), tmp_path / 'fsdp')
    np.testing.assert_allclose(sharded['loss'], replicated['loss'], rtol=1e-5)
    assert_trees_close(checkpoint.load_checkpoint(tmp_path / 'fsdp')[0],
                       checkpoint.load_checkpoint(tmp_path / 'replicated')[0], rtol=1e-5,
                       atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    config = tiny_config(dtype='bfloat16', num_train_steps=2)
    result = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(result['loss'])
    state, _ = checkpoint.load_checkpoint(tmp_path)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state['params'])}
    assert dtypes == {np.dtype('float32')}


# ------------------------------------------------------------------------------ bad input

def test_cli_bad_input_is_one_clear_line(tmp_path):
    out = run_cli(f'--workdir={tmp_path}', '--config.augment=sideways')
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: augment 'sideways' is not one of ('imagenet', 'cifar', 'none'): fix "
        '--config.augment')


def test_bad_batch_and_divergence(tmp_path):
    with pytest.raises(ValueError, match='batch_size 12 is not divisible by the 8 devices'):
        train.train_and_evaluate(tiny_config(batch_size=12), tmp_path / 'a')
    with pytest.raises(FloatingPointError, match='the training loss is not finite at step 2'):
        train.train_and_evaluate(tiny_config(learning_rate=1e30), tmp_path / 'b')
    assert not os.listdir(tmp_path / 'b' / 'checkpoints')   # nothing non-finite was saved
    images = np.zeros((40, 8, 8, 1), np.uint8)
    no_eval = sources.ArraySource(images, np.arange(40) % 10, images[:0], np.zeros(0), 10)
    with pytest.raises(ValueError, match="the eval split 'test' of digits has no examples"):
        train.train_and_evaluate(tiny_config(), tmp_path / 'c', source=no_eval)


def test_the_console_keeps_only_our_info_lines():
    """train.py's log filter: INFO from train.py and the package's modules; other libraries'
    only at WARNING and above, also when they are installed under a path that contains the
    package's name (a virtualenv inside a checkout called resnext_jax)."""
    import importlib
    cli = importlib.import_module('train')   # the root train.py, not resnext_jax.train

    def kept(path, level=logging.INFO):
        return cli._OwnInfoOnly().filter(logging.LogRecord('absl', level, path, 1, 'm', (), None))

    assert kept(cli.__file__) and kept(train.__file__) and kept(data.__file__)
    venv = '/home/me/resnext_jax/.venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py'
    assert not kept(venv) and kept(venv, logging.WARNING)


# ------------------------------------------------------------------------------ what it reports

def test_logged_speed_and_eta_measure_the_work_not_its_dispatch(tmp_path, monkeypatch, caplog):
    """Each step waits SLEEP s inside the device computation (a callback on the loss), so its
    dispatch returns at once and its work takes ≥ SLEEP: images/s ≤ batch / SLEEP, and the
    ETA counts the steps left at ≥ SLEEP each."""
    sleep, real = 0.25, step_lib.train_step

    def slow_step(state, batch, **kw):
        state, metrics = real(state, batch, **kw)
        loss = jax.pure_callback(lambda x: (time.sleep(sleep), x)[1],
                                 jax.ShapeDtypeStruct((), jnp.float32), metrics['loss'])
        return state, {**metrics, 'loss': loss}
    monkeypatch.setattr(step_lib, 'train_step', slow_step)
    config = tiny_config(num_train_steps=13, log_every_steps=4, checkpoint_every_steps=100)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, tmp_path)
    speeds = [r['images_per_sec'] for r in read_all_metrics(tmp_path) if r['split'] == 'train']
    assert len(speeds) == 4   # steps 4, 8, 12, 13; the first step (the compile) is timed alone
    for speed in speeds:
        assert config.batch_size / (4 * sleep) < speed <= config.batch_size / sleep, speeds
    etas = [line.rsplit('ETA ', 1)[1] for line in caplog.messages if line.startswith('step ')
            and 'ETA' in line]
    # At step 4, 9 steps of ≥ 0.25 s are left: at least 2 s.
    assert etas[0] >= '00:00:02' and etas[-1] == '00:00:00', etas
    assert any(m.startswith('step 1: compiled and ran in ') for m in caplog.messages)


def read_all_metrics(workdir):
    with open(workdir / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


def test_a_failed_start_leaves_the_workdir_as_it_was(tmp_path):
    bad = tiny_config(dataset=f'folder:{tmp_path / "no-such-folder"}')
    with pytest.raises(ValueError, match='does not exist'):
        train.train_and_evaluate(bad, tmp_path / 'new')
    assert not (tmp_path / 'new').exists()   # no run.lock, checkpoints/, config.json
    kept = tmp_path / 'kept'
    kept.mkdir()
    (kept / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='does not exist'):
        train.train_and_evaluate(bad, kept)
    assert os.listdir(kept) == ['notes.txt']
    # A run that trained keeps what it wrote when it fails later.
    with pytest.raises(FloatingPointError):
        train.train_and_evaluate(tiny_config(learning_rate=1e30), tmp_path / 'diverged')
    assert {'metrics.jsonl', 'checkpoints', 'config.json'} <= set(
        os.listdir(tmp_path / 'diverged'))


def test_first_screen_is_a_few_lines_then_progress(tmp_path):
    """train.py as a user runs it, with the libraries' own settings (no JAX_PLATFORMS: with
    the tpu extra installed libtpu probes for TPU hosts; TensorFlow's log level unset)."""
    config = tiny_config_file(tmp_path, 'num_train_steps=4, log_every_steps=2')
    env = {k: v for k, v in os.environ.items()
           if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS',
                         'TPU_SKIP_MDS_QUERY')}
    out = subprocess.run([sys.executable, 'train.py', f'--config={config}',
                          f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    first = next(i for i, l in enumerate(lines) if re.search(r'\] step 2/4 ', l))
    assert first <= 4, lines[:first + 1]   # starting, the run, compiling, the first step
    assert all(re.match(r'I\d{4} [\d:.]+ +\d+ train\.py:\d+\] ', l) for l in lines), lines
    assert f'the full config is in {tmp_path / "run" / "config.json"}' in lines[1]


def test_help_exits_0():
    for flag in ('--help', '--helpfull'):
        out = run_cli(flag)
        assert out.returncode == 0 and '--workdir' in out.stdout, out.stderr[-2000:]


def test_quiet_start_settings():
    from resnext_jax import runtime
    quiet = runtime.quiet_environment
    assert quiet({}, tpu_chip=False, gpu_plugin=False) == {
        'TF_ENABLE_ONEDNN_OPTS': '0', 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'}
    assert 'JAX_PLATFORMS' not in quiet({}, tpu_chip=True, gpu_plugin=False)
    assert 'JAX_PLATFORMS' not in quiet({}, tpu_chip=False, gpu_plugin=True)
    assert quiet({'JAX_PLATFORMS': 'tpu', 'TF_ENABLE_ONEDNN_OPTS': '1',
                  'TF_CPP_MIN_LOG_LEVEL': '0'}, tpu_chip=False, gpu_plugin=False) == {}


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=4, profile_steps='2:4'), tmp_path)
    traces = list((tmp_path / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_an_image_size_override_brings_the_evaluation_sizes_along(tmp_path):
    """`--config.image_size=N` alone scales the recipe's eval_image_size and eval_resize by the
    same factor (a recipe evaluating 12 from 14 after training at 8: at 4, 6 from 7), and the
    first screen says both sizes; sizes given on the command line are kept."""
    config = tiny_config_file(tmp_path, 'num_train_steps=1, image_size=8, eval_image_size=12, '
                                        "eval_resize=14, augment='imagenet'")
    sizes = {}
    for name, extra in (('follow', []), ('given', ['--config.eval_image_size=8'])):
        out = run_cli(f'--config={config}', f'--workdir={tmp_path / name}',
                      '--config.image_size=4', *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        saved = json.loads((tmp_path / name / 'config.json').read_text())
        sizes[name] = (saved['image_size'], saved['eval_image_size'], saved['eval_resize'])
        if name == 'follow':
            assert '4×4 images (evaluated at 6×6, the shorter side at 7)' in out.stderr
    assert sizes == {'follow': (4, 6, 7), 'given': (4, 8, 14)}
