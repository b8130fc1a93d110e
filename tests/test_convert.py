"""resnext_jax.convert, resnext_jax.predict and --config.init_from / eval_only.

The torchvision networks in tests/fixtures (scripts/make_convert_fixtures.py) carry random
weights and BN statistics and torchvision's logits, so the tests run without the optional
extra (CI installs it) but for the .safetensors cases, which need the safetensors package, and
the last test, which compares full-size networks with torchvision itself.
"""
import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import REPO, TINY
from resnext_jax import (checkpoint, convert, create_model, data, image_settings, parallel,
                         predict, pretrained, sources, train)
from resnext_jax import step as step_lib

FIXTURES = sorted(glob.glob(os.path.join(REPO, 'tests', 'fixtures', 'torchvision_*.npz')))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'torchvision_resnext_4x4d.npz')


def load_fixture(path, form='grouped'):
    """(state dict, NHWC images, torchvision logits, our model, meta) of a fixture file."""
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    meta = json.loads(str(arrays.pop('meta')))
    images, logits = arrays.pop('input').transpose(0, 2, 3, 1), arrays.pop('logits')
    options = convert._model_options(meta['model_options'])
    model = create_model(meta['model'], num_classes=meta['num_classes'], form=form, **options)
    return arrays, images, logits, model, meta


def tree_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(flat_a, flat_b))


def random_variables(model, seed=0):
    """Random arrays in the shapes of the model's variables (no initialisation to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32),
                                  convert.abstract_variables(model))


# ------------------------------------------------------------------------------ the mapping

@pytest.mark.parametrize('path', FIXTURES, ids=lambda p: os.path.basename(p)[12:-4])
def test_torchvision_weights_give_torchvision_logits(path):
    state_dict, images, expected, model, _ = load_fixture(path)
    variables = convert.torch_to_flax(state_dict, model)
    logits = np.asarray(jax.jit(model.apply)(variables, images))
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.abs(expected).max() > 1  # logits large enough for the tolerance to mean something


def test_names_follow_torchvision():
    assert convert.torch_name('stem/conv/kernel') == 'conv1.weight'
    assert convert.torch_name('stem/bn/mean') == 'bn1.running_mean'
    assert convert.torch_name('stage2/block1/aggregated/conv2/kernel') == 'layer2.0.conv2.weight'
    assert convert.torch_name('stage3/block4/aggregated/bn3/scale') == 'layer3.3.bn3.weight'
    assert convert.torch_name('stage4/block1/proj_conv/kernel') == 'layer4.0.downsample.0.weight'
    assert convert.torch_name('stage4/block1/proj_bn/var') == 'layer4.0.downsample.1.running_var'
    assert convert.torch_name('head/bias') == 'fc.bias'
    with pytest.raises(ValueError, match="no torchvision name for the Flax variable 'x/kernel'"):
        convert.torch_name('x/kernel')


def test_round_trips_are_exact():
    assert len(FIXTURES) == 4
    state_dict, _, _, model, _ = load_fixture(FIXTURE)
    back = convert.flax_to_torch(convert.torch_to_flax(state_dict, model), model)
    assert sorted(back) == sorted(state_dict)   # num_batches_tracked included
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

    # Any depth and C×d (narrowed here to stay quick): ResNeXt-101 3×20d.
    model = create_model('resnext101_3x20d', num_classes=7, stem_width=16, base_features=64)
    variables = random_variables(model)
    state_dict = convert.flax_to_torch(variables, model)
    assert state_dict['layer3.22.conv2.weight'].shape == (240, 80, 3, 3)
    assert state_dict['layer3.22.bn2.num_batches_tracked'].dtype == np.int64
    assert tree_equal(convert.torch_to_flax(state_dict, model), variables)


def test_mismatches_are_one_line_naming_the_key_and_shapes():
    state_dict, _, _, model, _ = load_fixture(FIXTURE)

    def error(**changes):
        broken = {k: v for k, v in {**state_dict, **changes}.items() if v is not None}
        with pytest.raises(ValueError) as info:
            convert.torch_to_flax(broken, model)
        assert '\n' not in str(info.value)
        return str(info.value)

    message = error(**{'layer2.0.conv2.weight': np.zeros((32, 4, 3, 3))})
    assert message == ("key 'layer2.0.conv2.weight' has shape (32, 4, 3, 3) in the weights but "
                       'the model expects (32, 8, 3, 3)')
    assert error(**{'fc.weight': None, 'fc.bias': None}) == (
        "missing key 'fc.bias' (the model expects shape (10,)); 1 more mismatched key(s)")
    assert error(**{'layer5.0.conv1.weight': np.zeros((4, 4))}) == (
        "unexpected key 'layer5.0.conv1.weight' with shape (4, 4) (not a parameter of the model)")
    with pytest.raises(ValueError, match=r"key 'fc.weight' has shape \(10, 256\) in the "
                       r"weights but the model expects \(10, 2048\); \d+ more mismatched"):
        convert.flax_to_torch(convert.torch_to_flax(state_dict, model),
                              create_model('resnext50_4x4d', num_classes=10))


# ------------------------------------------------------------------------------ command line

SMALL = '{"stage_sizes": [1, 1, 1, 1], "stem_width": 8, "base_features": 32}'


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """(checkpoint written by the CLI, the fixture's state dict as a plain .npz, state dict,
    model) for the 4x4d fixture."""
    state_dict, _, _, model, meta = load_fixture(FIXTURE)
    root = tmp_path_factory.mktemp('converted')
    np.savez(root / 'weights.npz', **state_dict)
    assert convert.main(['--model', meta['model'], '--model-options', SMALL,
                         str(root / 'weights.npz'), str(root / 'ckpt')]) == 0
    return root / 'ckpt', root / 'weights.npz', state_dict, model


def test_cli_writes_a_checkpoint_that_reads_back_identically(converted, tmp_path):
    ckpt, _, state_dict, model = converted
    state, meta = checkpoint.load_checkpoint(ckpt)
    assert sorted(os.listdir(ckpt / 'checkpoints')) == ['0']
    assert tree_equal(state, convert.torch_to_flax(state_dict, model))
    assert (meta['model'], meta['num_classes'], meta['image_size']) == ('resnext50_4x4d', 10, 224)

    assert convert.main([str(ckpt), str(tmp_path / 'back.npz')]) == 0   # model from the meta
    with np.load(tmp_path / 'back.npz') as back:
        assert sorted(back.files) == sorted([*state_dict, convert.META_KEY])
        for key, value in state_dict.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_cli_safetensors_round_trip(converted, tmp_path):
    pytest.importorskip('safetensors')
    ckpt, _, state_dict, _ = converted
    assert convert.main([str(ckpt), str(tmp_path / 'w.safetensors')]) == 0
    back = convert.read_state_dict(str(tmp_path / 'w.safetensors'))
    assert sorted(back) == sorted(state_dict)
    assert all(np.array_equal(back[k], v) for k, v in state_dict.items())
    assert convert.main(['--model', 'resnext50_4x4d', '--model-options', SMALL,
                         str(tmp_path / 'w.safetensors'), str(tmp_path / 'again')]) == 0
    assert tree_equal(checkpoint.load_checkpoint(tmp_path / 'again')[0], checkpoint.load_checkpoint(ckpt)[0])


def test_cli_bad_input_is_one_error_line(converted, tmp_path, capsys):
    ckpt, weights, _, _ = converted
    (tmp_path / 'notes.txt').write_text('hello')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    ckpt, weights, out = str(ckpt), str(weights), str(tmp_path / 'out')
    cases = [
        ([str(tmp_path / 'missing.pth'), out], 'missing.pth does not exist'),
        ([str(tmp_path / 'notes.txt'), out, '--model', 'resnet50'],
         "unknown weights file type '.txt'"),
        ([weights, out, '--model', 'resnext50_8x2d', '--model-options', SMALL],
         "weights.npz does not fit --model resnext50_8x2d: key 'layer1.0.conv2.weight' has "
         'shape (16, 4, 3, 3) in the weights but the model expects (16, 2, 3, 3)'),
        ([weights, out], 'pass --model NAME'),
        ([weights, str(tmp_path / 'full'), '--model', 'resnet50'], 'is not an empty directory'),
        ([weights, out + '.pth', '--model', 'resnet50'], 'a weights file is read into'),
        ([ckpt, out + '.bin'], 'unknown weights file type'),
        ([ckpt, out + '.npz', '--model', 'resnet50'], "ckpt does not hold model resnet50"),
    ]
    for args, message in cases:
        assert convert.main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and message in err, (args, err)
    assert not os.path.exists(out)

    run = subprocess.run([sys.executable, '-m', 'resnext_jax.convert', weights, out], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f'error: {weights} does not record its network: pass --model NAME'], run.stderr


# ------------------------------------------------------------------------------ metadata, files

NAMES = [f'digit {k}' for k in range(10)]


@pytest.fixture(scope='module')
def recorded(tmp_path_factory):
    """(checkpoint, variables, meta): the tiny digits model with random weights, saved with the
    metadata a training run records (8×8 digits: their mean and std, augment 'cifar'), class
    names included."""
    config, root = helpers.tiny_config(), tmp_path_factory.mktemp('recorded')
    variables = random_variables(step_lib.build_model(config, 10), seed=1)
    variables['batch_stats'] = jax.tree_util.tree_map(lambda v: np.abs(v) + 0.5,
                                                      variables['batch_stats'])
    meta = json.loads(json.dumps(checkpoint.run_meta(config, 10, NAMES)))
    checkpoint.save_variables(root / 'run', variables, meta)
    return root / 'run', variables, meta


def top(results):
    """[(labels, probabilities)] of `predict.predict` results."""
    return [([label for _, label in best], [p for p, _ in best]) for _, best in results]


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_exported_weights_carry_the_model_classes_and_preprocessing(recorded, suffix, tmp_path,
                                                                    capsys):
    """workdir → weights file → checkpoint keeps what the workdir knew, and predict feeds the
    file and the checkpoint as the workdir (before: only the arrays travelled, convert back
    needed --model and --model-options, and predict fed digits weights ImageNet's 224 crop and
    statistics without a word)."""
    if suffix == '.safetensors':
        pytest.importorskip('safetensors')
    run, variables, meta = recorded
    weights, back = str(tmp_path / f'w{suffix}'), str(tmp_path / 'back')
    assert convert.main([str(run), weights]) == 0
    assert convert.main([weights, back]) == 0   # no --model: the file records it
    state, restored = checkpoint.load_checkpoint(back)
    assert tree_equal(state, variables)
    assert set(image_settings.EVAL_FIELDS) <= set(convert.FILE_META)
    assert {k: restored.get(k) for k in convert.FILE_META} == {
        k: meta.get(k) for k in convert.FILE_META}
    assert (restored['model'], restored['class_names'], restored['image_size'],
            restored['mean']) == ('resnext29_2x4d', NAMES, 8, [77.8] * 3)

    image = write_png(tmp_path / 'x.png', 20, 30, 0)
    expected = top(predict.predict(str(run), [image]))
    assert expected[0][0][0] in NAMES
    for source in (weights, back):
        labels, probabilities = top(predict.predict(source, [image]))[0]
        assert labels == expected[0][0]
        np.testing.assert_allclose(probabilities, expected[0][1], rtol=1e-5)
    assert capsys.readouterr().err == ''   # the preprocessing is recorded: no warning


def test_predict_warns_when_no_preprocessing_is_recorded_and_takes_one(recorded, tmp_path,
                                                                       capsys):
    """A plain weights file (as torchvision writes) records no preprocessing: predict says so
    in one line and uses ImageNet's; --preprocessing digits --image-size 8 feeds the weights as
    they were trained."""
    run, variables, meta = recorded
    np.savez(tmp_path / 'plain.npz', **convert.flax_to_torch(variables))
    ckpt, image = str(tmp_path / 'ckpt'), write_png(tmp_path / 'x.png', 20, 30, 0)
    assert convert.main(['--model', meta['model'], '--model-options',
                         json.dumps(meta['model_options']), str(tmp_path / 'plain.npz'),
                         ckpt]) == 0
    capsys.readouterr()
    assert predict.main(['--checkpoint', ckpt, image]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f'warning: {ckpt} records no preprocessing') and err.count('\n') == 1
    assert '--preprocessing imagenet|cifar10|cifar100|digits' in err

    assert predict.main(['--checkpoint', ckpt, '--preprocessing', 'digits', '--image-size', '8',
                         image]) == 0
    assert capsys.readouterr().err == ''
    np.testing.assert_array_equal(
        predict.load_image(image, predict.with_preprocessing({}, 'digits', 8)),
        predict.load_image(image, meta))
    (labels, probabilities), = top(predict.predict(ckpt, [image], preprocessing='digits',
                                                   image_size=8))
    (names, expected), = top(predict.predict(str(run), [image]))
    assert [NAMES[int(label)] for label in labels] == names
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)


def test_weights_files_get_the_mode_the_umask_gives(tmp_path):
    """As any file: 0666 less the umask (before: .safetensors 0600 whatever the umask)."""
    state_dict = {'fc.weight': np.ones((2, 3), np.float32)}
    suffixes = ['.npz'] + [s for s, module in (('.safetensors', 'safetensors'), ('.pth', 'torch'))
                           if importlib.util.find_spec(module)]
    for suffix in suffixes:
        for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
            path = tmp_path / f'{umask:o}{suffix}'
            old = os.umask(umask)
            try:
                convert.write_state_dict(state_dict, str(path))
            finally:
                os.umask(old)
            assert os.stat(path).st_mode & 0o777 == mode, (suffix, oct(umask))
            assert np.array_equal(convert.read_state_dict(str(path))['fc.weight'],
                                  state_dict['fc.weight'])


def test_a_failed_write_leaves_the_file_that_was_there(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) is one line and leaves the previous file
    whole and no temporary file (before: a truncated .npz at the destination)."""
    path = tmp_path / 'w.npz'
    convert.write_state_dict({'a': np.zeros(3)}, str(path))
    before = path.read_bytes()
    write_array = np.lib.format.write_array

    def full_disk(fid, array, *args, **kwargs):
        write_array(fid, array, *args, **kwargs)
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(np.lib.format, 'write_array', full_disk)
    with pytest.raises(OSError, match=r'^cannot write .*w\.npz \(No space left on device\): '):
        convert.write_state_dict({'a': np.ones(3), 'b': np.ones(3)}, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['w.npz']


def test_safetensors_files_need_only_the_safetensors_package(recorded, tmp_path, monkeypatch,
                                                             capsys):
    pytest.importorskip('safetensors')
    run, _, _ = recorded
    weights = str(tmp_path / 'w.safetensors')
    monkeypatch.setitem(sys.modules, 'torch', None)   # as if torch were not installed
    assert convert.main([str(run), weights]) == 0
    assert convert.main([weights, str(tmp_path / 'back')]) == 0
    for module in ('safetensors', 'safetensors.numpy'):
        monkeypatch.setitem(sys.modules, module, None)
    capsys.readouterr()
    for args in ([str(run), str(tmp_path / 'x.safetensors')], [weights, str(tmp_path / 'y')]):
        assert convert.main(args) == 1
        assert capsys.readouterr().err == ('error: .safetensors files need the safetensors '
                                           'package: pip install safetensors\n')


def test_bad_input_is_one_line_from_the_command_line(recorded, tmp_path):
    """python -m resnext_jax.convert: exit 1 and one line `error: ...` on stderr, nothing
    written (before: --num-classes -1 printed JAX internals, a non-.npz file numpy's advice to
    unpickle it, an unwritable destination a traceback, a bad --model-options JSON argparse's
    usage and exit status 2)."""
    run, variables, meta = recorded
    plain = tmp_path / 'plain.npz'
    np.savez(plain, **convert.flax_to_torch(variables))
    (tmp_path / 'random.npz').write_bytes(np.random.default_rng(0).bytes(4096))
    np.savez(tmp_path / 'objects.npz', a=np.array([{'x': 1}], dtype=object))
    (tmp_path / 'notes.txt').write_text('hello')
    model = ['--model', meta['model'], '--model-options', json.dumps(meta['model_options'])]
    out = tmp_path / 'out'
    cases = [
        ([*model, '--num-classes', '-1', plain, out], '--num-classes: -1 is not an integer ≥ 0; '),
        ([*model, tmp_path / 'random.npz', out], 'random.npz is not an .npz file (not a zip '),
        ([*model, tmp_path / 'objects.npz', out], 'objects.npz holds object arrays, which are '
                                                  'never unpickled: '),
        ([run, tmp_path / 'notes.txt' / 'w.npz'], 'w.npz (a file is in the way of its '
                                                  'directory): choose '),
        (['--model-options', '{"stage_sizes": [1, 1', plain, out], 'is not a JSON object: '),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, '-m', 'resnext_jax.convert', *map(str, args)],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: ') \
            and message in lines[0] and 'allow_pickle' not in lines[0], (args, result.stderr)
    assert sorted(os.listdir(tmp_path)) == ['notes.txt', 'objects.npz', 'plain.npz',
                                            'random.npz']


# ------------------------------------------------------------------------------ predict

def write_png(path, height, width, seed):
    rng = np.random.default_rng(seed)
    tf.io.write_file(str(path), tf.io.encode_png(rng.integers(0, 256, (height, width, 3),
                                                              dtype=np.uint8)))
    return str(path)


def test_predict_prints_the_top_5_of_each_image(converted, tmp_path, capsys):
    ckpt, _, _, _ = converted
    images = [write_png(tmp_path / 'wide.png', 240, 320, 0),
              write_png(tmp_path / 'tall.png', 300, 260, 1)]
    assert predict.main(['--checkpoint', str(ckpt), *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [lines[0], lines[6]] == [f'{images[0]}:', f'{images[1]}:'] and len(lines) == 12
    for top in (lines[1:6], lines[7:12]):
        probabilities = [float(line.split()[0].rstrip('%')) for line in top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 100
        assert {line.split()[1] for line in top} <= {str(i) for i in range(10)}   # indices

    # The same numbers by hand: shorter side to 256, centre 224 crop, ImageNet normalisation.
    model, variables, _ = convert.load_model(ckpt)
    image = tf.io.decode_png(tf.io.read_file(images[0])).numpy().astype(np.float32)
    image = tf.image.resize(image, (256, 341)).numpy()[16:240, 58:282]
    image = (image - np.array(image_settings.IMAGENET_MEAN)) / np.array(image_settings.IMAGENET_STD)
    np.testing.assert_allclose(predict.load_image(images[0]), image, rtol=1e-5, atol=1e-5)
    probs = jax.nn.softmax(jax.jit(model.apply)(variables, image[None].astype(np.float32)))[0]
    best = int(np.argmax(probs))
    assert lines[1].split()[1] == str(best)
    np.testing.assert_allclose(float(lines[1].split()[0].rstrip('%')), 100 * probs[best],
                               atol=0.006)

    assert predict.main(['--checkpoint', str(ckpt), str(tmp_path / 'nope.jpg')]) == 1
    assert capsys.readouterr().err == (
        f'error: {tmp_path / "nope.jpg"} does not exist: pass image files (JPEG, PNG, GIF, BMP)\n')


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """(config, workdir, final eval) of a run on 8×8 digits (augment 'cifar', the digits' mean
    and std)."""
    config, workdir = helpers.tiny_config(num_train_steps=2), tmp_path_factory.mktemp('digits')
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_predict_feeds_a_digits_checkpoint_as_its_training_evaluated(digits_run, tmp_path):
    """predict gives the probabilities the run's own evaluation input gives, not ImageNet's
    224 crop."""
    config, run, _ = digits_run
    source = sources.make_source(config)
    pixels = np.repeat(source.eval[0][:2], 3, axis=-1)   # two held-out digits, as RGB files
    images = [str(tmp_path / f'{k}.png') for k in range(2)]
    for path, image in zip(images, pixels):
        tf.io.write_file(path, tf.io.encode_png(image))
    batch = next(data.eval_batches(config, 8, source=source))
    model, variables, meta = convert.load_model(run)
    assert meta['mean'] == [77.8] * 3 and meta['std'] == [95.9] * 3 and meta['image_size'] == 8
    seen = step_lib.normalise(batch['image'][:2], meta['mean'], meta['std'])   # as the step sees it
    for path, image in zip(images, seen):
        np.testing.assert_allclose(predict.load_image(path, meta), image, rtol=1e-6, atol=1e-6)
    probs = np.asarray(jax.nn.softmax(model.apply(variables, seen)))
    for (path, top), p in zip(predict.predict(run, images), probs):
        best = int(np.argmax(p))
        assert top[0][1] == str(best)
        np.testing.assert_allclose(top[0][0], p[best], rtol=1e-4)


def test_eval_only_feeds_the_weights_as_they_were_trained(digits_run, tmp_path, caplog):
    """eval_only, of a workdir's checkpoint or of init_from weights, under a config with other
    statistics and augment: the checkpoint's normalisation and augment are used, so the
    result is the training run's own final evaluation (before, the config's were used: loss
    2.3053 instead of 2.2987, top-1 12.2 % instead of 13.3 %)."""
    config, run, expected = digits_run
    other = dict(mean=(0.0,) * 3, std=(255.0,) * 3, augment='imagenet', eval_only=True)
    for where, overrides in ((run, {}), (tmp_path, {'init_from': str(run)})):
        with caplog.at_level(logging.WARNING):
            result = train.train_and_evaluate(helpers.tiny_config(
                num_train_steps=2, **other, **overrides), where)
        for key in ('loss', 'top1', 'top5', 'num_examples'):
            np.testing.assert_allclose(result[key], expected[key], rtol=1e-6)
        assert ("as it was trained, with augment cifar, mean (77.8, 77.8, 77.8), std (95.9, "
                "95.9, 95.9) (the config says augment imagenet, mean (0.0, 0.0, 0.0)") in caplog.text


def test_imagenet_class_names_come_with_tensorflow_datasets():
    names = pretrained.imagenet_class_names()
    assert len(names) == 1000 and names[0].startswith('tench') and names[1].startswith(
        'goldfish') and names[999].startswith('toilet tissue')


# ------------------------------------------------------------------------------ init_from

def tiny_config(**overrides):
    """The tests' tiny recipe with pixels simply scaled to 0..1 and no augmentation."""
    return helpers.tiny_config(augment='none', mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0),
                               **overrides)


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
    """{classes: (directory, variables)}: converted-style checkpoints of the tiny model with
    random weights and BN statistics, for 7 and for 10 classes (digits have 10)."""
    config, root = tiny_config(), tmp_path_factory.mktemp('init')
    checkpoints = {}
    for classes in (7, 10):
        variables = random_variables(step_lib.build_model(config, classes), seed=classes)
        variables['batch_stats'] = jax.tree_util.tree_map(lambda v: np.abs(v) + 0.5,
                                                          variables['batch_stats'])
        checkpoint.save_variables(root / str(classes), variables,
                                {'model': config.model, 'num_classes': classes})
        checkpoints[classes] = (root / str(classes), variables)
    return checkpoints


def test_init_from_keeps_a_fresh_head_for_other_classes(tiny_checkpoints, caplog):
    directory, variables = tiny_checkpoints[7]
    mesh = parallel.make_mesh()
    fresh = jax.device_put(random_variables(step_lib.build_model(tiny_config(), 10), seed=0),
                           parallel.replicated(mesh))
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=fresh['params'],
                             batch_stats=fresh['batch_stats'], opt_state=())
    with caplog.at_level(logging.INFO):
        loaded, meta = checkpoint.init_from(state, str(directory))
    assert 'it has 7 classes, this run 10; the head starts fresh' in caplog.text
    assert (meta['model'], meta['num_classes']) == ('resnext29_2x4d', 7)
    expected = {**variables, 'params': {**variables['params'],
                                        'head': jax.device_get(fresh['params']['head'])}}
    assert tree_equal(jax.device_get({'params': loaded.params,
                                      'batch_stats': loaded.batch_stats}), expected)
    assert all(x.sharding == parallel.replicated(mesh)
               for x in jax.tree_util.tree_leaves(loaded.params))

    other = random_variables(create_model('resnext29_4x4d', num_classes=10, **TINY))
    with pytest.raises(ValueError, match=(
            r"resnext29_2x4d\) does not fit the model: \['batch_stats'\]\['stage1'\]\['block1'\]"
            r"\['aggregated'\]\['bn1'\]\['mean'\] has shape \(8,\) there and \(16,\) here")):
        checkpoint.init_from(state.replace(**other), str(directory))


def test_eval_only_evaluates_the_init_from_weights_once(tiny_checkpoints, tmp_path):
    directory, expected = tiny_checkpoints[10]
    config = tiny_config(init_from=str(directory), eval_only=True)
    result = train.train_and_evaluate(config, tmp_path)
    with open(tmp_path / 'metrics.jsonl') as f:
        assert [(r['step'], r['split']) for r in map(json.loads, f)] == [(0, 'eval')]
    assert not os.listdir(tmp_path / 'checkpoints')

    images, labels = sources.make_source(config).eval   # pixels / 255: the config's mean and std
    images = np.repeat(images.astype(np.float32) / 255.0, 3, axis=-1)
    logits = jax.jit(step_lib.build_model(config, 10).apply)(expected, images)
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    assert result['num_examples'] == 360
    np.testing.assert_allclose(result['loss'], -np.mean(logp[np.arange(360), labels]), rtol=1e-5)
    np.testing.assert_allclose(result['top1'], np.mean(np.argmax(logits, -1) == labels))


# ------------------------------------------------------------------------------ with torch

@pytest.mark.parametrize('name', ['resnet50', 'resnext50_32x4d', 'resnext101_64x4d'])
def test_full_size_torchvision_networks_match(name):
    """torchvision's own networks with random weights and BN statistics, both directions.
    Needs torch and torchvision (the `torch` extra; CI has it), a few seconds each."""
    pytest.importorskip('torch')
    from resnext_jax.benchmark import import_torchvision
    torch, torchvision = import_torchvision()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 * torch.rand(n, generator=generator) + 0.25)
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
        net.fc.weight.mul_(10.0)   # logits of order 1-10, as a trained network gives
    net.eval()
    images = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = net(images).numpy()

    model = create_model(name, form='grouped')
    variables = convert.torch_to_flax(net.state_dict(), model)
    logits = np.asarray(jax.jit(model.apply)(variables, images.numpy().transpose(0, 2, 3, 1)))
    print(f'{name}: max |logit| {np.abs(expected).max():.3f}, max abs difference '
          f'{np.abs(logits - expected).max():.2e}')
    assert np.abs(logits - expected).max() <= 1e-4

    state_dict = convert.flax_to_torch(variables, model)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)


def test_a_run_records_its_class_names_and_predict_prints_them(tmp_path, capsys):
    """An image folder's class folders (here blue/, green/, red/) are its class names: the
    checkpoints, exported weights and exported models record them, and predict prints them."""
    from PIL import Image
    colours = {'blue': (0, 0, 255), 'green': (0, 255, 0), 'red': (255, 0, 0)}
    for split in ('train', 'validation'):
        for name, rgb in colours.items():
            (tmp_path / 'data' / split / name).mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (8, 8), tuple(max(0, c - 9 * i) for c in rgb)).save(
                    tmp_path / 'data' / split / name / f'{i}.png')
    config = helpers.tiny_config(dataset=f'folder:{tmp_path / "data"}', eval_split='validation',
                                 augment='none', batch_size=8, num_train_steps=2)
    train.train_and_evaluate(config, tmp_path / 'run')
    assert checkpoint.load_checkpoint(tmp_path / 'run')[1]['class_names'] == [
        'blue', 'green', 'red']
    convert.export_weights(str(tmp_path / 'run'), str(tmp_path / 'w.npz'))
    image = str(tmp_path / 'data' / 'validation' / 'red' / '0.png')
    for weights in (tmp_path / 'run', tmp_path / 'w.npz'):
        (_, top), = predict.predict(str(weights), [image], top=3)
        assert sorted(label for _, label in top) == ['blue', 'green', 'red']
    assert predict.main(['--checkpoint', str(tmp_path / 'w.npz'), image]) == 0
    printed = capsys.readouterr().out.split()
    assert {'blue', 'green', 'red'} <= set(printed) and not {'0', '1', '2'} & set(printed)


def test_predict_on_a_broken_image_prints_only_its_own_line(digits_run, tmp_path):
    """A truncated JPEG: one `error:` line, without libjpeg's `Improper call to JPEG library`
    or TensorFlow's `W0000 … local_rendezvous` lines before it."""
    _, run, _ = digits_run
    good = tmp_path / 'good.jpg'
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8)).save(good)
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(good.read_bytes()[:300])
    p = subprocess.run([sys.executable, '-m', 'resnext_jax.predict', '--checkpoint', str(run),
                        str(broken)], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        f'error: {broken} is not an image that TensorFlow can decode'], p.stderr
