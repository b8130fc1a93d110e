"""The benchmark tool runs and reports sane figures; the fast CPU paths compute the same math."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import REPO
from resnext_jax import benchmark, create_model
from resnext_jax.models import max_pool_3x3_s2
from resnext_jax.summary import count_params


def test_benchmark_json_on_a_small_network(capsys):
    benchmark.main(['--model', 'resnext29_2x4d', '--batch-size', '8', '--image-size', '8',
                    '--form', 'auto,grouped', '--steps', '1', '--warmup', '0', '--json'])
    report = json.loads(capsys.readouterr().out)
    assert report['environment']['backend'] == 'cpu' and report['batch_size'] == 8
    forms = [r['form'] for r in report['rows']]
    assert forms == ['auto=sliced', 'grouped']
    for r in report['rows']:
        assert r['train_images_per_sec'] > 0 and r['infer_images_per_sec'] > 0
        assert r['compile_sec'] > 0 and r['planned_memory_mb'] > 0
        assert r['peak_memory_mb'] is None      # the CPU reports no peak


def test_the_peak_memory_is_read_after_the_timed_steps(monkeypatch, capsys):
    """A device whose peak grows with each finished step (as a GPU's does while the step's
    buffers come and go): the row reports the peak after every timed call, inference and
    training, not the one right after compiling."""
    finished = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, 'block_until_ready', lambda x: finished.append(1) or real(x))
    monkeypatch.setattr(benchmark, '_memory_stats',
                        lambda: {'peak_bytes_in_use': len(finished) * 2**20})
    benchmark.main(['--model', 'resnext29_2x4d', '--batch-size', '8', '--image-size', '8',
                    '--steps', '3', '--warmup', '1', '--json'])
    (row,) = json.loads(capsys.readouterr().out)['rows']
    assert len(finished) == 2 * (1 + 1 + 3)        # first call, warm-up, timed; twice
    assert row['peak_memory_mb'] == len(finished)


def test_a_recipe_is_timed_beside_the_host_cores_that_feed_it(tmp_path):
    """`--config`: the step train.py compiles for the recipe (its augmentation in the step)
    and the input pipeline's images/s per busy core, and their ratio; with augment_on='host'
    the host does the augmentation and feeds bfloat16."""
    config = tmp_path / 'recipe.py'
    config.write_text(f'import sys\nsys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
                      'from helpers import tiny_config\n'
                      'def get_config():\n    return tiny_config(color_jitter=0.4, '
                      "pca_lighting=0.1, auto_augment='ta_wide', random_erase=0.1)\n")
    reports = {}
    for where in ('device', 'host'):
        out = subprocess.run(
            [sys.executable, '-m', 'resnext_jax.benchmark', f'--config={config}',
             f'--config.augment_on={where}', '--seconds=1', '--steps=2', '--warmup=0',
             '--json'], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        reports[where] = report = json.loads(out.stdout)
        assert report['augment_on'] == where and report['batch_size'] == 16
        assert report['augmentation'].endswith(f"(augment_on='{where}')")
        step, feed = report['step'], report['input']
        assert step['train_images_per_sec'] > 0 and step['planned_memory_mb'] > 0
        assert feed['part'] == 'train' and feed['images'] >= 16 and feed['seconds'] >= 1
        assert report['host_cores_to_feed'] == pytest.approx(
            step['train_images_per_sec'] / feed['images_per_core_sec'])
    assert 'in the step' in reports['device']['augmentation']
    assert 'on the host' in reports['host']['augmentation']
    bad = subprocess.run([sys.executable, '-m', 'resnext_jax.benchmark', f'--config={config}',
                          '--config.batch_size=12'], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        'error: batch_size 12 is not divisible by the 8 devices: fix --config.batch_size')


def test_the_table_is_printed_once_aligned_naming_each_framework(capsys):
    """One header and one line per row on stdout, nothing on stderr; every line as long as the
    header (a missing figure is a '—' in its column); PyTorch named with its version and
    torchvision's; its own speed ratio 1.00."""
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    benchmark.main(['--model', 'resnext29_2x4d', '--batch-size', '8', '--image-size', '8',
                    '--form', 'auto,grouped', '--steps', '1', '--warmup', '0', '--torch'])
    out, err = capsys.readouterr()
    assert err == ''
    title, header, *lines = out.strip('\n').splitlines()
    assert title.startswith('resnext29_2x4d, batch 8, 8×8, float32, cpu')
    assert header.startswith('framework') and 'train ×torch' in header
    assert len(lines) == 3 and {len(line) for line in lines} == {len(header)}
    torch_line, *jax_lines = lines
    assert torch_line.startswith(f'torch {torch.__version__} ') and (
        f'torchvision {torchvision.__version__} (cpu)' in torch_line)
    assert torch_line.split()[-2:] == ['1.00', '1.00']
    assert [line.split()[1] for line in jax_lines] == ['auto=sliced', 'grouped']
    assert all('—' in line for line in lines)   # no peak memory on CPU
    # an accelerator's MFU column (it raised ValueError: '5.1f%' is no format)
    row = benchmark.format_row(benchmark.Row('jax', 'grouped', 1.0, 2.0, 3.0, 4.0, 5.0, 0.4567))
    assert row.endswith(' 45.7%') and len(row) == len(benchmark.format_header())


def test_benchmark_layer_and_errors(capsys):
    benchmark.main(['--layer', '--batch-size', '2', '--image-size', '8', '--width', '16',
                    '--groups', '4', '--steps', '1', '--warmup', '0'])
    out = capsys.readouterr().out
    for form in ('grouped', 'blockdiag', 'sliced', 'concat'):
        assert form in out
    with pytest.raises(SystemExit, match="error: unknown form 'fast'"):
        benchmark.main(['--form', 'fast'])
    with pytest.raises(SystemExit, match='not divisible by the 8 devices'):
        benchmark.main(['--model', 'resnext29_2x4d', '--batch-size', '4', '--image-size', '8',
                        '--mode', 'infer'])


@pytest.mark.parametrize('name', ['resnext50_32x4d', 'resnext29_8x64d'])
def test_torch_reference_is_the_same_network(name):
    """The --torch side (optional extra) has exactly our parameter count."""
    try:
        benchmark.import_torchvision()
    except ImportError:
        pytest.skip('torch and torchvision (optional extra) are not installed')
    torch_net = benchmark.torch_model(name)
    model = create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    assert sum(p.numel() for p in torch_net.parameters()) == count_params(shapes['params'])


def test_slice_max_pool_equals_flax_max_pool():
    for shape in [(2, 8, 8, 3), (2, 7, 9, 3)]:
        x = jax.random.normal(jax.random.key(0), shape)
        ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
        np.testing.assert_array_equal(max_pool_3x3_s2(x), ref(x))
        probe = jax.random.normal(jax.random.key(1), ref(x).shape)
        g = jax.grad(lambda x: (max_pool_3x3_s2(x) * probe).sum())(x)
        g_ref = jax.grad(lambda x: (ref(x) * probe).sum())(x)
        np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def test_input_pipeline_benchmark():
    def run(*args):
        return subprocess.run([sys.executable, '-m', 'resnext_jax.benchmark', '--input', *args],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    out = run('--config=configs/quickstart.py', '--config.batch_size=64', '--seconds=1',
              '--json')
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report['source'] == 'in memory' and report['batch_size'] == 64
    assert [r['part'] for r in report['rows']] == ['train', 'eval']
    train, evaluation = report['rows']
    assert train['images'] % 64 == 0 and train['images'] >= 64
    assert evaluation['images'] >= 360   # the held-out 360 digits, at least once, no padding
    for r in report['rows']:
        assert r['seconds'] >= 1 and r['cpu_cores'] > 0 and r['images_per_core_sec'] > 0
    bad = run()
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        'error: --input needs --config=configs/NAME.py[:ROW]']


def test_torch_is_timed_on_the_kind_of_device_jax_uses():
    assert benchmark.torch_device('cpu', cuda_available=True) == 'cpu'
    assert benchmark.torch_device('gpu', cuda_available=True) == 'cuda'
    with pytest.raises(ValueError, match='JAX runs on gpu, where this PyTorch cannot run'):
        benchmark.torch_device('gpu', cuda_available=False)   # a CPU-only torch on a GPU host
    with pytest.raises(ValueError, match='JAX runs on tpu'):
        benchmark.torch_device('tpu', cuda_available=False)
