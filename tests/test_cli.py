"""Every bad command-line input to the tools is one `error:` line on stderr and exit status 1:
no traceback, no usage block, no start-up noise (TensorFlow's C++ lines, absl INFO logs)."""
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO
from resnext_jax import benchmark, summary, tables

ROW = '--config=configs/paper.py:table7_cifar10_resnext29_8x64d'


def assert_one_error_line(status, stderr):
    assert status == 1 and 'Traceback' not in stderr, stderr
    assert stderr.endswith('\n') and stderr.count('\n') == 1, stderr
    assert stderr.startswith('error: ') and stderr.strip() != 'error:', stderr


COMMANDS = [
    ('summary', ['resnext29_8x4d', '--image-size', '0']),
    ('benchmark', ['--input', '--config=configs/nonexistent.py']),
    ('plan', ['--config=configs/nonexistent.py', '--topology=v5e-8']),
    ('plan', [ROW, '--topology=v5e-8', '--config.batch_size=0']),
    ('plan', [ROW, '--topology=v5e-8', '--config.bogus=1']),
    ('plan', [ROW, '--topology=v5e-8', '--num-classes=0']),
    ('plan', [ROW, '--topology=v5e-8', '--config.model=resnext51']),   # TensorFlow has started
    ('convert', ['--num-classes', '-1', 'weights.npz', 'ckpt']),
    ('predict', ['--checkpoint', 'no-such-checkpoint', 'cat.jpg']),    # JAX and TensorFlow run
    ('export', ['no-such-checkpoint', '--format', 'savedmodel', '--out', 'no-such-model']),
    ('export', ['no-such-checkpoint', '--format', 'tflite', '--out', 'no-such-model']),
]
# A user's shell: none of the settings tests/conftest.py makes for the suite (with the tpu extra
# installed, as in CI, JAX would probe libtpu for TPU hosts; TensorFlow logs at its defaults).
USER_SHELL = {k: v for k, v in os.environ.items() if k not in (
    'JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'TPU_SKIP_MDS_QUERY')}
CALLS = [
    ('summary', ['resnext29_8x4d', '--num-classes', '-3']),
    ('summary', ['resnext29_8x4d', '--image-size', '-5']),
    ('summary', ['resnext29_8x4d', '--image-size', 'x']),
    ('summary', ['resnext51_32x4d']),
    ('summary', []),
    ('benchmark', ['--steps', '0']),
    ('benchmark', ['--batch-size', '0']),
    ('benchmark', ['--warmup', '-1']),
    ('benchmark', ['--image-size', '0']),
    ('benchmark', ['--layer', '--width', '10', '--groups', '4']),
    ('benchmark', ['--mode', 'fly']),
    ('benchmark', ['--seconds', '5']),   # an --input flag without --input
    ('benchmark', ['--inp']),
    ('tables', ['--rows', 'table9']),
    ('tables', ['--results', 'README.md']),
    ('tables', ['--bogus']),
]
MAINS = {'summary': summary.main, 'benchmark': benchmark.main, 'tables': tables.main}


def ids(cases):
    return [' '.join([tool, *args]) for tool, args in cases]


@pytest.mark.parametrize('tool, args', COMMANDS, ids=ids(COMMANDS))
def test_bad_input_is_one_line_from_the_command(tool, args):
    p = subprocess.run([sys.executable, '-m', f'resnext_jax.{tool}', *args], cwd=REPO,
                       env=USER_SHELL, capture_output=True, text=True, timeout=120)
    assert_one_error_line(p.returncode, p.stderr)
    assert p.stdout == ''


@pytest.mark.parametrize('tool, args', CALLS, ids=ids(CALLS))
def test_bad_input_is_one_line(tool, args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        MAINS[tool](args)
    code = e.value.code   # sys.exit('error: ...') prints the text and exits with status 1
    message = code + '\n' if isinstance(code, str) else ''
    assert_one_error_line(1 if message else code, capsys.readouterr().err + message)


def test_unknown_model_names_the_command_that_lists_them(capsys):
    with pytest.raises(SystemExit):
        summary.main(['resnext51_32x4d'])
    err = capsys.readouterr().err
    assert 'list_models()' in err and 'python -m resnext_jax.summary --list' in err


def test_benchmark_help_lists_the_input_flags(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ('--input', '--config', '--seconds'):
        assert f'\n  {flag} ' in out, out


@pytest.mark.parametrize('command', ['summary --list', 'tables', 'summary --all --json'])
def test_a_closed_pipe_ends_a_tool_quietly(command):
    """`python -m resnext_jax.TOOL … | head -1`: one line, no BrokenPipeError traceback."""
    p = subprocess.run(f'{sys.executable} -m resnext_jax.{command} | head -1', shell=True,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.stdout.count('\n') == 1 and p.stderr == '', p.stderr[-2000:]


def test_the_readme_log_excerpt_cites_the_lines_that_log():
    """The quick start's log in the README names `train.py:N` for each line: N must still be a
    `logging.info(` call of train.py or resnext_jax/train.py (absl prints the file's base name),
    so that the excerpt stays what a run prints."""
    readme = open(os.path.join(REPO, 'README.md')).read()
    cited = sorted({int(n) for n in re.findall(r'train\.py:(\d+)\]', readme)})
    assert len(cited) >= 6
    sources = [open(os.path.join(REPO, *p)).read().splitlines()
               for p in (('train.py',), ('resnext_jax', 'train.py'))]
    for n in cited:
        assert any(n <= len(lines) and 'logging.info(' in lines[n - 1] for lines in sources), n
