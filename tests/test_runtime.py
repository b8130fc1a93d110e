"""The entry points' process settings: YNNPACK fusions that keep the results, and one restart with
malloc's transparent huge pages, each only where it applies and never over the user's choice."""
import os
import subprocess
import sys

import numpy as np
import pytest

from resnext_jax import runtime

YNN = '--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce'

ENTRY_POINT = """
import os, sys
from resnext_jax import runtime
print('started', sys.argv[1:], flush=True)
runtime.prepare_process()
print('running', os.environ.get('GLIBC_TUNABLES', ''), flush=True)
print('xla', os.environ.get('XLA_FLAGS', ''), flush=True)
"""

# One training-mode value-and-grad and one inference pass of a small ResNeXt (full topology:
# stride-2 stage, projection shortcuts, grouped 3x3, batch norm), saved with the compiled code.
GRADIENTS = """
import sys, jax, jax.numpy as jnp, numpy as np
from resnext_jax import ResNeXt
model = ResNeXt(stage_sizes=(1, 2), cardinality=4, bottleneck_width=4, base_features=16,
                stem_width=8, num_classes=5)
x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
v = model.init(jax.random.key(1), x)
def loss(params):
    logits, stats = model.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits)), (logits, stats)
step = jax.jit(jax.value_and_grad(loss, has_aux=True))
(_, (logits, stats)), grads = step(v['params'])
infer = jax.jit(lambda v: model.apply(v, x))
leaves = jax.tree_util.tree_leaves((logits, stats, grads, infer(v)))
np.savez(sys.argv[1], *[np.asarray(a) for a in leaves],
         hlo=step.lower(v['params']).compile().as_text())
"""


def test_ynn_fusions_are_added_for_the_measured_jaxlib_and_never_over_a_choice():
    assert runtime.xla_flags_with_ynn_fusions('', (0, 10)) == YNN
    assert runtime.xla_flags_with_ynn_fusions('--xla_cpu_ftz=true', (0, 10)) == (
        '--xla_cpu_ftz=true ' + YNN)
    chosen = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
    assert runtime.xla_flags_with_ynn_fusions(chosen, (0, 10)) == chosen
    assert runtime.xla_flags_with_ynn_fusions('', (0, 11)) == ''  # not measured there


def test_huge_pages_only_with_a_new_glibc_madvise_thp_and_no_tunable_yet():
    assert runtime.huge_pages_wanted({}, (2, 36), 'madvise')
    assert runtime.huge_pages_wanted({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, (2, 35),
                                     'madvise')
    assert not runtime.huge_pages_wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, (2, 36),
                                         'madvise')
    assert not runtime.huge_pages_wanted({}, (2, 34), 'madvise')  # the tunable is new in 2.35
    assert not runtime.huge_pages_wanted({}, None, 'madvise')     # musl, macOS, Windows
    assert not runtime.huge_pages_wanted({}, (2, 36), 'always')   # huge pages without asking
    assert not runtime.huge_pages_wanted({}, (2, 36), 'never')
    assert not runtime.huge_pages_wanted({}, (2, 36), None)


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
    setting = tmp_path / 'enabled'
    setting.write_text('always [madvise] never\n')
    assert runtime.thp_mode(str(setting)) == 'madvise'
    setting.write_text('[always] madvise never\n')
    assert runtime.thp_mode(str(setting)) == 'always'
    assert runtime.thp_mode(str(tmp_path / 'missing')) is None


def _run(tmp_path, code, *args, **environ):
    script = tmp_path / 'script.py'
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
    env.update(environ)
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, check=True).stdout.splitlines()


def test_entry_point_restarts_once_with_the_same_arguments(tmp_path):
    started = "started ['--flag', 'a b']"
    lines = _run(tmp_path, ENTRY_POINT, '--flag', 'a b')
    if runtime.huge_pages_wanted({}, runtime.glibc_version(), runtime.thp_mode()):
        assert lines[:3] == [started, started, 'running glibc.malloc.hugetlb=1']
    else:  # nothing to gain on this machine: no restart, environment untouched
        assert lines[:2] == [started, 'running ']
    # Other tunables and flags are kept; an explicit choice is respected (the opt-outs).
    lines = _run(tmp_path, ENTRY_POINT, '--flag', 'a b', GLIBC_TUNABLES='glibc.malloc.arena_max=4',
                 XLA_FLAGS='--xla_cpu_ftz=true')
    assert lines[-2].startswith('running glibc.malloc.arena_max=4')
    assert lines[-1].startswith('xla --xla_cpu_ftz=true')
    assert _run(tmp_path, ENTRY_POINT, '--flag', 'a b', GLIBC_TUNABLES='glibc.malloc.hugetlb=0',
                XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=individual_dot') == [
        started, 'running glibc.malloc.hugetlb=0',
        'xla --xla_cpu_experimental_ynn_fusion_type=individual_dot']


@pytest.mark.skipif(runtime.jaxlib_version() != runtime.YNN_JAXLIB,
                    reason='prepare_process adds the YNNPACK fusions only with jaxlib 0.10')
def test_ynn_fusions_give_the_same_outputs_and_gradients(tmp_path):
    quick = '--xla_backend_optimization_level=0'  # compiles faster; YNNPACK fusions still form
    _run(tmp_path, GRADIENTS, str(tmp_path / 'default.npz'), XLA_FLAGS=quick)
    _run(tmp_path, GRADIENTS, str(tmp_path / 'ynn.npz'), XLA_FLAGS=f'{quick} {YNN}')
    default, ynn = np.load(tmp_path / 'default.npz'), np.load(tmp_path / 'ynn.npz')
    assert 'ynn_fusion' in str(ynn['hlo']) and 'ynn_fusion' in str(default['hlo'])
    # More of the step is handed to YNNPACK (not just the matrix products).
    assert str(ynn['hlo']).count('ynn_fusion') > str(default['hlo']).count('ynn_fusion')
    leaves = [k for k in default.files if k != 'hlo']
    assert len(leaves) > 20
    for k in leaves:
        err = np.max(np.abs(ynn[k] - default[k])) / max(np.max(np.abs(default[k])), 1e-30)
        assert err <= 1e-5, (k, err)
