"""Published weights by name (`resnext_jax.pretrained`): the registry against timm, downloads
from a real local HTTP server that speaks the Hub's protocol (tests/hub_server.py) through the
real, unpatched huggingface_hub client, the cache, every failure's one line, concurrent
loads, and every tool that takes a registry name. No internet: the weights served are made
here (random arrays in timm's layout, or torchvision's / timm's own networks with random
weights)."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import helpers
from helpers import REPO
from hub_server import HubServer
from resnext_jax import convert, pretrained
from resnext_jax.image_settings import IMAGENET_MEAN, IMAGENET_STD
from resnext_jax.models import create_model
from resnext_jax.pretrained import WEIGHTS, PretrainedError

SMALL = 'resnet26.bt_in1k'   # the smallest registered network (16.0 M parameters)


def random_state_dict(name, seed=0):
    """A state dict in timm's layout for registry weights `name`: random weights, positive
    BN variances, num_batches_tracked as torch writes it."""
    w = WEIGHTS[name]
    shapes = convert.torch_shapes(convert.abstract_variables(create_model(w.model, **w.options)))
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        value = rng.standard_normal(shape).astype(np.float32) * 0.05
        sd[key] = np.abs(value) + 0.5 if key.endswith('running_var') else value
        if key.endswith('running_var'):
            sd[key[:-len('running_var')] + 'num_batches_tracked'] = np.array(7, np.int64)
    return sd


def publish(root, name, state_dict):
    """Lays `state_dict` out as the Hub repository timm/<name> holds it."""
    directory = root / 'timm' / name
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / pretrained.FILENAME))
    (directory / 'config.json').write_text(json.dumps({'architecture': name.split('.')[0]}))
    return directory / pretrained.FILENAME


@pytest.fixture(scope='module')
def hub_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub')
    publish(root, SMALL, random_state_dict(SMALL))
    return root


@pytest.fixture
def hub(hub_root, tmp_path, monkeypatch):
    """The local Hub serving `hub_root`, with this test's own empty caches."""
    with HubServer(hub_root) as server:
        monkeypatch.setenv('HF_ENDPOINT', server.url)
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
        monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path / 'ours'))
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        server.corrupt, server.cut_after = False, None
        yield server


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, names in os.walk(path) for f in names)


# ------------------------------------------------------------------------------ the registry

def test_every_entry_is_our_network_with_timms_parameter_count():
    """Shapes only (jax.eval_shape), no download: each entry builds, and its parameter count
    is timm's param_count (results-imagenet.csv, millions to 2 decimals)."""
    counts = {}
    for w in WEIGHTS.values():
        if (w.model, str(w.options)) not in counts:
            v = convert.abstract_variables(create_model(w.model, **w.options))
            counts[(w.model, str(w.options))] = sum(
                int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v['params']))
        assert round(counts[(w.model, str(w.options))] / 1e6, 2) == w.params_m, w.name
    # The exact counts the issue and torchvision give (DESIGN.md and torchvision's docs).
    assert counts[('resnext101_32x48d', '{}')] == 828_411_176
    assert counts[('resnext50_1x128d', '{}')] == 68_883_240
    assert counts[('resnext101_1x128d', '{}')] == 126_886_696
    assert counts[('resnext50_32x4d', '{}')] == 25_028_904
    assert len(WEIGHTS) == 64 and all(w.repo == f'timm/{w.name}' for w in WEIGHTS.values())


def test_registry_is_timms_and_so_are_the_networks():
    """Each entry's facts against the installed timm's pretrained config (hub id, licence,
    sizes, crops, interpolation, mean, std, classes), and our network's state-dict keys and
    shapes against timm's own network of that name (built on torch's meta device)."""
    timm = pytest.importorskip('timm')
    torch = pytest.importorskip('torch')
    from timm.models.resnet import Bottleneck, ResNet
    seen = set()
    for w in WEIGHTS.values():
        cfg = timm.models.get_pretrained_cfg(w.name)
        if w.arch == 'resnext101_32x48d':   # timm 1.0.31 no longer registers it
            assert cfg is None
            with torch.device('meta'):
                theirs = ResNet(Bottleneck, [3, 4, 23, 3], cardinality=32, base_width=48)
        else:
            assert cfg.hf_hub_id == w.repo, w.name
            assert cfg.license == w.licence and cfg.interpolation == w.interpolation, w.name
            assert cfg.input_size == (3, w.train_size, w.train_size), w.name
            assert (cfg.test_input_size or cfg.input_size) == (3, w.test_size, w.test_size)
            assert cfg.crop_pct == w.train_crop, w.name
            assert (cfg.test_crop_pct or cfg.crop_pct) == w.test_crop, w.name
            assert cfg.num_classes == 1000
            np.testing.assert_allclose(np.array(cfg.mean) * 255, IMAGENET_MEAN, rtol=1e-6)
            np.testing.assert_allclose(np.array(cfg.std) * 255, IMAGENET_STD, rtol=1e-6)
            if w.arch in seen:
                continue
            with torch.device('meta'):
                theirs = timm.create_model(w.arch, pretrained=False)
        seen.add(w.arch)
        shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()
                  if not k.endswith('num_batches_tracked')}
        ours = convert.torch_shapes(convert.abstract_variables(
            create_model(w.model, **w.options)))
        assert shapes == ours, w.arch


def test_names_and_their_one_line_errors():
    assert pretrained.is_name('resnext50_32x4d.tv2_in1k')
    assert pretrained.is_name('resnext50_32x4d.nonsense') and not pretrained.is_name('ckpt/x.y')
    assert not pretrained.is_name('resnext50_32x4d') and not pretrained.is_name('weights.npz')
    with pytest.raises(PretrainedError, match=r"'resnext50_32x4d'.*did you mean "
                       r'resnext50_32x4d\.a1_in1k, .*summary --pretrained'):
        pretrained.get('resnext50_32x4d')
    with pytest.raises(PretrainedError, match=r'did you mean resnext50_32x4d\.tv2_in1k'):
        pretrained.get('resnext50_32x4d.tv2_in1k_')
    w = WEIGHTS['resnext50_32x4d.tv2_in1k']   # torchvision's IMAGENET1K_V2 weights
    assert (w.train_size, w.test_size, w.eval_resize, w.interpolation) == (176, 224, 232,
                                                                          'bilinear')
    assert WEIGHTS['resnet50.a1_in1k'].eval_resize == 288   # crop 1.0: resized to the crop


# ------------------------------------------------------------------------------ downloads

def test_first_load_downloads_converts_and_caches_then_no_request(hub, hub_root, tmp_path):
    model, variables, meta = pretrained.load_pretrained(SMALL)
    assert hub.gets(pretrained.FILENAME) == 1
    served = load_file(str(hub_root / 'timm' / SMALL / pretrained.FILENAME))
    kernel = variables['params']['stage2']['block1']['aggregated']['conv2']['kernel']
    np.testing.assert_array_equal(kernel, np.transpose(served['layer2.0.conv2.weight'],
                                                       (2, 3, 1, 0)))
    np.testing.assert_array_equal(variables['batch_stats']['stem']['bn']['var'],
                                  served['bn1.running_var'])
    assert (model.stage_sizes, meta['model'], meta['num_classes']) == ((2, 2, 2, 2),
                                                                       'resnet26', 1000)
    assert meta['class_names'][0].startswith('tench') and len(meta['class_names']) == 1000
    assert (meta['eval_image_size'], meta['eval_resize'], meta['interpolation']) == (
        288, 303, 'bicubic')
    assert meta['published_top1'] == 76.384 and meta['pretrained'] == SMALL
    sha = hashlib.sha256((hub_root / 'timm' / SMALL / pretrained.FILENAME).read_bytes())
    assert files_under(tmp_path / 'ours') == [
        f'flax/{SMALL}-{sha.hexdigest()[:16]}.safetensors',
        f'flax/{SMALL}-{sha.hexdigest()[:16]}.safetensors.lock']

    before = len(hub.requests)
    _, again, _ = pretrained.load_pretrained(SMALL)   # the Flax form, no request at all
    assert len(hub.requests) == before
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def test_a_corrupt_download_is_refused_and_removed_then_downloaded_again(hub, tmp_path):
    hub.corrupt = True   # a flipped byte; the Hub's sha256 stays the true file's
    with pytest.raises(PretrainedError, match=r'failed its sha256 check .* removed from the '
                       r'cache .*run the same command again'):
        pretrained.load_variables(SMALL)
    assert [f for f in files_under(tmp_path / 'hf') if '/blobs/' in f or '/snapshots/' in f] == []
    assert [f for f in files_under(tmp_path / 'ours') if f.endswith('.safetensors')] == []
    hub.corrupt = False
    pretrained.load_variables(SMALL)
    assert hub.gets(pretrained.FILENAME) == 2


def test_a_cut_download_is_resumed_and_one_that_always_fails_leaves_nothing(hub, tmp_path):
    hub.cut_after, hub.cut_times = (10 << 20) + 1000, 1   # after the first 10 MiB chunk
    pretrained.load_variables(SMALL)
    ranges = [h.get('range') for m, p, h in hub.requests if m == 'GET' and 'range' in h]
    assert ranges == ['bytes=10485760-']   # resumed where the written chunks end

    other = tmp_path / 'other'
    os.environ['HF_HUB_CACHE'] = str(other / 'hf')   # restored by the fixture's monkeypatch
    os.environ['RESNEXT_JAX_CACHE'] = str(other / 'ours')
    hub.cut_after, hub.cut_times = 1000, 100
    with pytest.raises(PretrainedError, match=r'^the download of timm/resnet26\.bt_in1k/model'
                       r'\.safetensors from http://127\.0\.0\.1:\d+ failed \(.*\) \(cache '):
        pretrained.load_variables(SMALL)
    assert [f for f in files_under(other) if '/blobs/' in f or f.endswith('.safetensors')] == []


def test_offline_missing_and_unknown_are_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    cache = str(tmp_path / 'hf')
    with pytest.raises(PretrainedError) as e:
        pretrained.load_variables(SMALL)
    text = str(e.value)
    assert '\n' not in text and f'not in the cache {cache}' in text and 'HF_HUB_OFFLINE' in text
    assert f'hf download timm/{SMALL} model.safetensors --cache-dir {cache}' in text
    assert hub.requests == []
    monkeypatch.delenv('HF_HUB_OFFLINE')
    pretrained.load_variables(SMALL)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')   # cached: offline is fine
    os.remove(os.path.join(pretrained.flax_cache_dir(), 'flax', files_under(
        os.path.join(pretrained.flax_cache_dir(), 'flax'))[0]))   # converted again, offline
    pretrained.load_variables(SMALL)
    monkeypatch.delenv('HF_HUB_OFFLINE')
    with pytest.raises(PretrainedError, match=r'^http://127\.0\.0\.1:\d+ has no timm/resnet50'
                       r'\.a1_in1k/model\.safetensors \(cache .*\): check HF_ENDPOINT'):
        pretrained.load_variables('resnet50.a1_in1k')   # not on this server


def test_concurrent_processes_download_and_convert_once(hub, tmp_path):
    """Four processes load at once (a slow server makes them overlap): one download, one
    conversion, the same weights in each."""
    hub.delay = 1.0
    code = ('import hashlib, jax, numpy as np, resnext_jax\n'
            f'_, v, _ = resnext_jax.load_pretrained({SMALL!r})\n'
            'h = hashlib.sha256()\n'
            'for x in jax.tree_util.tree_leaves(v): h.update(np.ascontiguousarray(x).tobytes())\n'
            'print(h.hexdigest())\n')
    procs = [subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert len({o[0].strip() for o in outs}) == 1
    assert hub.gets(pretrained.FILENAME) == 1
    assert len([f for f in files_under(tmp_path / 'ours') if f.endswith('.safetensors')]) == 1


# ------------------------------------------------------------------------------ against torch

@pytest.fixture(scope='module')
def torch_hub(tmp_path_factory):
    """torchvision's ResNeXt-50 32×4d and timm's ResNet-26 with random weights and BN
    statistics, published as their registry names."""
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    nets = {'resnext50_32x4d.tv2_in1k': torchvision.models.resnext50_32x4d(),
            'resnet26.bt_in1k': timm.create_model('resnet26', pretrained=False)}
    root = tmp_path_factory.mktemp('torch_hub')
    for name, net in nets.items():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
        net.eval()
        publish(root, name, {k: v.numpy() for k, v in net.state_dict().items()})
    return root, nets


@pytest.mark.parametrize('name', ['resnext50_32x4d.tv2_in1k', 'resnet26.bt_in1k'])
def test_loaded_weights_compute_torchvisions_and_timms_logits(torch_hub, tmp_path, monkeypatch,
                                                              name):
    import torch
    from flax import nnx
    from resnext_jax import nnx as rnnx
    root, nets = torch_hub
    with HubServer(root) as server:
        monkeypatch.setenv('HF_ENDPOINT', server.url)
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
        monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path / 'ours'))
        model, variables, _ = pretrained.load_pretrained(name)
        nnx_model, meta = rnnx.load_pretrained(name)
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = nets[name](torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
    # float32 through 26 or 50 layers, two summation orders: logits of size ~1-10.
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)
    nnx_model.eval()
    np.testing.assert_allclose(np.asarray(nnx_model(jnp.asarray(images))), ours, atol=1e-5)
    assert isinstance(nnx_model, nnx.Module) and meta['pretrained'] == name


# ------------------------------------------------------------------------------ the tools

def test_configure_takes_the_weights_network_and_preprocessing():
    from configs import finetune
    c = finetune.get_config()
    with pytest.raises(ValueError, match=r"model '' takes the model of the published weights"):
        pretrained.configure(c)
    c.init_from = 'resnext50_32x4d.tv2_in1k'
    r = pretrained.configure(c)
    assert (r.model, r.image_size, r.eval_image_size, r.eval_resize, r.interpolation) == (
        'resnext50_32x4d', 176, 224, 232, 'bilinear')
    c.model = 'resnet50'
    with pytest.raises(ValueError, match=r'is a resnext50_32x4d, not --config.model resnet50'):
        pretrained.configure(c)
    c.model, c.image_size, c.eval_image_size = '', 160, 192   # the user's sizes stay
    r = pretrained.configure(c)
    assert (r.image_size, r.eval_image_size, r.eval_resize, r.interpolation) == (
        160, 192, None, 'bilinear')
    c.init_from, c.interpolation = 'runs/other', 'bicubic'   # a workdir decides nothing
    with pytest.raises(ValueError, match=r"model '' takes .*--config.init_from to one of"):
        pretrained.configure(c)


def image_folder(root, classes=('cat', 'dog'), per_class=8, size=40):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class if split == 'train' else 2):
                pixels = rng.integers(0, 256, (size, size + 8, 3)).astype(np.uint8)
                pixels[..., k] = 255   # the class is the colour
                tf.io.write_file(str(root / split / name / f'{i}.png'),
                                 tf.io.encode_png(pixels))
    return root


def run_tool(module, *args, env):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_convert_predict_and_export_take_a_registry_name(hub, hub_root, tmp_path):
    env = dict(os.environ)
    folder = image_folder(tmp_path / 'images')
    image = str(folder / 'validation' / 'cat' / '0.png')

    # convert NAME out.npz writes the state dict the Hub file holds (+ our metadata)
    out = tmp_path / 'out.npz'
    r = run_tool('resnext_jax.convert', SMALL, str(out), env=env)
    assert r.returncode == 0, r.stderr
    served = load_file(str(hub_root / 'timm' / SMALL / pretrained.FILENAME))
    written, meta = convert.read_weights(str(out))
    assert set(written) == set(served)
    for key, value in served.items():
        if not key.endswith('num_batches_tracked'):   # written as 0, as torchvision resets it
            np.testing.assert_array_equal(written[key], value, err_msg=key)
    assert meta['model'] == 'resnet26' and meta['eval_resize'] == 303
    assert hub.gets(pretrained.FILENAME) == 1

    # predict NAME prints ImageNet class names, as timm's weights were evaluated (no warning)
    r = run_tool('resnext_jax.predict', '--checkpoint', SMALL, image, env=env)
    assert r.returncode == 0 and 'warning' not in r.stderr, r.stderr
    assert r.stdout.splitlines()[0] == f'{image}:' and len(r.stdout.splitlines()) == 6
    assert hub.gets(pretrained.FILENAME) == 1   # the cache

    # export NAME --format onnx, checked in onnxruntime by export itself
    pytest.importorskip('onnxruntime')
    r = run_tool('resnext_jax.export', SMALL, '--format', 'onnx', '--out',
                 str(tmp_path / 'm.onnx'), '--batch', '1', env=env)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / 'm.onnx') and hub.gets(pretrained.FILENAME) == 1


def test_finetune_starts_from_a_registry_name(hub, tmp_path):
    """configs/finetune.py from a name: the weights' network, a fresh head, the weights'
    interpolation; the first screen names the weights and their published accuracy."""
    env = {**os.environ,   # one device compiles this network in half the time of eight
           'XLA_FLAGS': '--xla_force_host_platform_device_count=1 '
                        '--xla_backend_optimization_level=0'}
    folder = image_folder(tmp_path / 'images')
    workdir = tmp_path / 'ft'
    r = subprocess.run(
        [sys.executable, 'train.py', '--config=configs/finetune.py', f'--workdir={workdir}',
         f'--config.init_from={SMALL}', f'--config.dataset=folder:{folder}',
         '--config.num_train_steps=2', '--config.batch_size=8', '--config.image_size=32',
         '--config.eval_image_size=32', '--config.log_every_steps=1'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f'initialised from {SMALL} (timm/{SMALL}; published ImageNet top-1 76.38%, top-5 '
            '93.18% at 288×288; licence apache-2.0)') in r.stderr
    assert 'it has 1000 classes, this run 2; the head starts fresh' in r.stderr
    assert 'resnet26 (' in r.stderr
    config = json.loads((workdir / 'config.json').read_text())
    assert (config['model'], config['interpolation']) == ('resnet26', 'bicubic')


def test_tools_say_one_line_for_a_name_that_is_not_there(hub, tmp_path):
    env = dict(os.environ)
    r = run_tool('resnext_jax.predict', '--checkpoint', 'resnext50_32x4d.tv3_in1k', 'x.jpg',
                 env=env)
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert "unknown pretrained weights 'resnext50_32x4d.tv3_in1k': did you mean" in r.stderr
    env['HF_HUB_OFFLINE'] = '1'
    r = run_tool('resnext_jax.convert', SMALL, str(tmp_path / 'x.npz'), env=env)
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert 'is not in the cache' in r.stderr and not os.path.exists(tmp_path / 'x.npz')
