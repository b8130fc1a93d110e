"""Serving export (resnext_jax.export): each format loaded in its own runtime
(`jax.export.deserialize`, onnxruntime, `tf.saved_model.load`) and run beside JAX, the held-out
digits classified as the run's evaluation classified them, the ONNX graph's grouped `Conv`, the
metadata each format carries, `predict` on exported models, and bad input as one line. ONNX
needs the `serve` extra (onnx, onnxruntime), which CI installs; TensorFlow is a dependency."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import REPO, tiny_config
from resnext_jax import create_model, data, export, sources, train
from resnext_jax.aggregated import FORMS


def needs_runtime(fmt):
    """ONNX needs the `serve` extra (CI installs it); the other runtimes are dependencies."""
    if fmt == 'onnx':
        pytest.importorskip('onnx')
        pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny ResNeXt (cardinality 2) trained 20 steps on the digits, with an EMA."""
    workdir = tmp_path_factory.mktemp('export') / 'run'
    config = tiny_config(num_train_steps=20, ema_decay=0.9, checkpoint_every_steps=20)
    result = train.train_and_evaluate(config, workdir)
    return {'workdir': str(workdir), 'config': config, 'result': result}


def held_out(config):
    """The 360 held-out digits as the input pipeline feeds them (uint8, 8×8×3) and labels."""
    images, labels = [], []
    for batch in data.eval_batches(config, 64, source=sources.make_source(config)):
        keep = batch['mask'] > 0
        images.append(batch['image'][keep])
        labels.append(batch['label'][keep])
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize('fmt', export.FORMATS)
def test_each_format_runs_in_its_runtime_as_jax_does(run, fmt, tmp_path):
    """A dynamic-batch export, loaded by its own runtime: logits within 1e-4 of JAX's at two
    batch sizes, the same top-1, and the held-out digits classified exactly as well as the
    run's own evaluation did; the metadata says how to feed it."""
    needs_runtime(fmt)
    out = str(tmp_path / f'model.{fmt}')
    report = export.export(run['workdir'], fmt, out)
    assert report['bytes'] > 0 and report['seconds'] > 0
    assert set(report['check']) == set(export.CHECK_BATCHES)
    for diff, same in report['check'].values():
        assert diff <= 1e-4 and same
    # the runtime on its own, on real images
    images, labels = held_out(run['config'])
    model = export.runner(fmt, out)
    net, variables, meta = export.load(run['workdir'])
    jax_logits = np.asarray(jax.jit(export.serving_function(net, variables, meta))(images))
    for n in (1, 7, len(images)):
        np.testing.assert_allclose(model(images[:n]), jax_logits[:n], atol=1e-4)
    accuracy = float((model(images).argmax(-1) == labels).mean())
    assert len(labels) == run['result']['num_examples'] == 360
    assert accuracy == pytest.approx(run['result']['top1'], abs=1e-9)
    metadata = export.read_metadata(fmt, out)
    assert metadata == report['metadata']
    assert metadata['model'] == 'resnext29_2x4d' and metadata['num_classes'] == 10
    assert metadata['input'] == {'name': 'images', 'dtype': 'uint8', 'shape': [None, 8, 8, 3],
                                 'layout': 'NHWC', 'channels': 'RGB', 'normalised_inside': True}
    assert (metadata['dataset'], metadata['image_size'], metadata['augment'],
            metadata['mean'], metadata['std']) == ('digits', 8, 'cifar', [77.8] * 3, [95.9] * 3)
    assert metadata['output'] == {'name': 'logits', 'dtype': 'float32', 'shape': [None, 10]}


def test_fixed_batch_probabilities_raw_and_ema(run, tmp_path):
    images, _ = held_out(run['config'])
    net, variables, meta = export.load(run['workdir'])
    logits = np.asarray(jax.jit(export.serving_function(net, variables, meta))(images[:4]))
    # a fixed batch refuses another
    out = str(tmp_path / 'fixed.stablehlo')
    report = export.export(run['workdir'], 'stablehlo', out, batch=4, output='probabilities')
    assert list(report['check']) == [4]
    probabilities = export.runner('stablehlo', out)(images[:4])
    np.testing.assert_allclose(probabilities, jax.nn.softmax(logits), atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-6)
    with pytest.raises(Exception, match='shape'):
        export.runner('stablehlo', out)(images[:3])
    # --raw: the network alone, on normalised float32
    raw = str(tmp_path / 'raw.savedmodel')
    export.export(run['workdir'], 'savedmodel', raw, raw=True)
    normalised = ((images[:4] - 77.8) / 95.9).astype(np.float32)
    np.testing.assert_allclose(export.runner('savedmodel', raw)(normalised), logits, atol=1e-4)
    assert export.read_metadata('savedmodel', raw)['input']['dtype'] == 'float32'
    # --ema: the EMA weights, which give other logits
    averaged = str(tmp_path / 'ema.stablehlo')
    export.export(run['workdir'], 'stablehlo', averaged, ema=True)
    ema_net, ema_variables, ema_meta = export.load(run['workdir'], ema=True)
    ema_logits = np.asarray(export.serving_function(ema_net, ema_variables, ema_meta)(images[:4]))
    np.testing.assert_allclose(export.runner('stablehlo', averaged)(images[:4]), ema_logits,
                               atol=1e-4)
    assert not np.allclose(ema_logits, logits, atol=1e-3)


def test_the_onnx_graph_is_the_network_with_grouped_convolutions(run, tmp_path):
    """One `Conv` per convolution, the aggregated 3×3 with `group` = the cardinality; batch
    norm as `BatchNormalization`; opset 17; every form of the network computes what the graph
    computes (the parameters are the same in every form)."""
    needs_runtime('onnx')
    onnx = pytest.importorskip('onnx')
    out = str(tmp_path / 'model.onnx')
    export.export(run['workdir'], 'onnx', out)
    graph = onnx.load(out)
    ops = [n.op_type for n in graph.graph.node]
    # tiny: stem, 3 stages × (1 block: conv1, conv2, conv3, projection)
    assert ops.count('Conv') == 1 + 3 * 4 and ops.count('BatchNormalization') == 1 + 3 * 4
    groups = sorted(next((a.i for a in n.attribute if a.name == 'group'), 1)
                    for n in graph.graph.node if n.op_type == 'Conv')
    assert groups == [1] * 10 + [2] * 3
    assert [(o.domain, o.version) for o in graph.opset_import] == [('', export.ONNX_OPSET)]
    images, _ = held_out(run['config'])
    onnx_logits = export.runner('onnx', out)(images[:16])
    _, variables, meta = export.load(run['workdir'])
    for form in FORMS:
        net = create_model('resnext29_2x4d', num_classes=10, form=form, **meta['model_options'])
        ours = jax.jit(export.serving_function(net, variables, meta))(images[:16])
        np.testing.assert_allclose(ours, onnx_logits, atol=1e-4, err_msg=form)


def command(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'resnext_jax.export', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_command_reports_its_check_and_refuses_bad_input_in_one_line(run, tmp_path):
    out = tmp_path / 'model.stablehlo'
    ok = command(run['workdir'], '--format', 'stablehlo', '--out', str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.strip().splitlines()
    assert lines[0].startswith(f'wrote {out}: resnext29_2x4d, uint8 N×8×8×3 → logits; ')
    assert [line.split(':')[0].strip() for line in lines[1:]] == [
        'checked in its runtime at batch 1', 'checked in its runtime at batch 3']
    assert all(line.endswith('top-1 the same') for line in lines[1:])
    before = out.read_bytes()

    def refused(*args, message, env=None):
        bad = command(*args, env=env)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert bad.stderr.strip().splitlines() == [message], bad.stderr

    refused(run['workdir'], '--format', 'tflite', '--out', str(tmp_path / 'x'),
            message="error: unknown format 'tflite': use one of stablehlo, onnx, savedmodel")
    refused(run['workdir'], '--format', 'stablehlo', '--out', str(out),
            message=f'error: {out} exists: pass --force to replace it, or choose another --out')
    assert out.read_bytes() == before
    blocker = tmp_path / 'file'
    blocker.write_text('')
    refused(run['workdir'], '--format', 'stablehlo', '--out', str(blocker / 'model.stablehlo'),
            message=f'error: cannot write {blocker / "model.stablehlo"} (a file is in the way of '
                    'its directory): choose a file in a writable directory')
    plain = tmp_path / 'plain'
    train.train_and_evaluate(tiny_config(num_train_steps=2), plain)
    bad = command(str(plain), '--format', 'stablehlo', '--out', str(tmp_path / 'y'), '--ema')
    assert bad.returncode == 1 and bad.stderr.count('\n') == 1 and 'EMA' in bad.stderr
    refused(str(tmp_path / 'nothing'), '--format', 'stablehlo', '--out', str(tmp_path / 'z'),
            message=f'error: {tmp_path / "nothing"} is not a checkpoint directory or weights '
                    'file: pass a training workdir, a directory that convert wrote or a '
                    '.safetensors / .npz / .pth file')
    refused(run['workdir'], '--format', 'stablehlo', '--out', str(tmp_path / 'w'), '--batch',
            '0', message='error: --batch: 0 is not an integer ≥ 1; python -m resnext_jax.export '
                         '--help describes every option')
    # a missing optional package: which extra installs it
    no_onnx = tmp_path / 'no_onnx'
    no_onnx.mkdir()
    (no_onnx / 'sitecustomize.py').write_text(
        'import sys\n'
        'class NoOnnx:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name.split('.')[0] == 'onnx':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        'sys.meta_path.insert(0, NoOnnx())\n')
    refused(run['workdir'], '--format', 'onnx', '--out', str(tmp_path / 'v.onnx'),
            env={'PYTHONPATH': f'{no_onnx}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'},
            message="error: --format onnx needs the onnx package: pip install -e '.[serve]'")
    assert export.read_metadata('stablehlo', str(out))['num_classes'] == 10


@pytest.mark.parametrize('fmt', ['onnx', 'savedmodel'])
def test_predict_runs_an_exported_model_as_it_runs_the_workdir(run, fmt, tmp_path):
    """`predict --checkpoint MODEL`: the exported file in its runtime, images fed as its
    metadata says; the same classes and probabilities as from the workdir."""
    needs_runtime(fmt)
    from PIL import Image
    from resnext_jax import predict
    images, _ = held_out(run['config'])
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(images[i]).save(paths[-1])
    out = str(tmp_path / f'model.{fmt}')
    export.export(run['workdir'], fmt, out, batch=2 if fmt == 'onnx' else None, verify=False)
    assert export.exported_format(out) == fmt
    exported = predict.predict(out, paths, top=3)
    direct = predict.predict(run['workdir'], paths, top=3)
    for (p1, top1), (p2, top2) in zip(exported, direct):
        assert p1 == p2 and [c for _, c in top1] == [c for _, c in top2]
        np.testing.assert_allclose([q for q, _ in top1], [q for q, _ in top2], atol=1e-5)
    with pytest.raises(ValueError, match='is an exported model'):
        predict.predict(out, paths, ema=True)
