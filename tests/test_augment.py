"""Per-pixel augmentation in the jitted step (resnext_jax.augment, `augment_on='device'`): what
each image gets is a function of (seed, step, its row of the global batch) only, whatever
devices hold it; the config decides where it runs; and the step, `plan` and `benchmark` work
without TensorFlow. (The ops and their distributions: tests/test_autoaugment.py; the whole
run's resume and 1×8 = 2×4: tests/test_train.py, tests/test_multiprocess.py.)"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import default
from helpers import REPO, tiny_config
from resnext_jax import augment, image_settings, parallel, policies
from resnext_jax import step as step_lib

EVERYTHING = dict(color_jitter=0.4, pca_lighting=0.1, auto_augment='rand-m9-n2-mstd0.5',
                  random_erase=0.25)


def pixels(n, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize('spec', ['rand-m9-n2-mstd0.5', 'ta_wide'])
def test_each_image_depends_on_the_key_and_its_row_only(spec):
    """Image i of a batch gets fold_in(key, i): the same pixels whether the batch holds 16
    images or its first 4, whether it is split over 8 devices or on one; another key or row
    gives another augmentation."""
    aug = augment.Augmentation(mean=image_settings.IMAGENET_MEAN,
                               std=image_settings.IMAGENET_STD, color_jitter=0.4,
                               pca_lighting=0.1, policy=policies.parse(spec), random_erase=0.25)
    x = pixels(16)
    key = jax.random.key(3)
    whole = np.asarray(jax.jit(aug)(key, x))
    np.testing.assert_allclose(np.asarray(jax.jit(aug)(key, x[:4])), whole[:4], atol=1e-5)
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        split = jax.jit(aug)(key, jax.device_put(x, parallel.batch_sharding(mesh)))
    assert len(split.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(split), whole, atol=1e-5)
    same = np.broadcast_to(x[:1], x.shape)           # one image in every row
    rows = np.asarray(jax.jit(aug)(key, same))
    assert len({r.tobytes() for r in rows}) == 16     # each row its own augmentation
    other = np.asarray(jax.jit(aug)(jax.random.key(4), x))
    assert sum(not np.allclose(a, b) for a, b in zip(other, whole)) >= 12


def test_the_config_decides_where_the_augmentation_runs():
    config = tiny_config(**EVERYTHING)
    assert config.augment_on == default.get_config().augment_on == 'auto'
    # 'auto': in the step, but for auto_augment on TPUs (gathers, which the TPU compiler
    # prices far above the rest of the step)
    for backend in ('cpu', 'gpu', 'tpu'):
        assert image_settings.augment_place(config, backend) == (
            'host' if backend == 'tpu' else 'device')
        plain = tiny_config(color_jitter=0.4, pca_lighting=0.1, random_erase=0.25)
        assert image_settings.augment_place(plain, backend) == 'device'
        for where in ('device', 'host'):
            assert image_settings.augment_place(tiny_config(**EVERYTHING, augment_on=where),
                                                backend) == where
    assert jax.default_backend() == 'cpu' and image_settings.on_device(config)
    on_device = augment.from_config(config)
    assert on_device == augment.Augmentation(
        mean=image_settings.normalisation(config)[0], std=image_settings.normalisation(config)[1],
        color_jitter=0.4, pca_lighting=0.1, policy=policies.parse('rand-m9-n2-mstd0.5'),
        random_erase=0.25)
    assert image_settings.feed_dtype(config, True) == 'uint8'     # the host sends the crop
    host = tiny_config(**EVERYTHING, augment_on='host')
    assert augment.from_config(host) is None
    assert image_settings.feed_dtype(host, True) == 'bfloat16'    # colour noise leaves 0..255
    assert augment.from_config(tiny_config()) is None             # nothing per pixel to do
    with pytest.raises(ValueError, match='fix --config.auto_augment'):
        augment.from_config(tiny_config(auto_augment='rand-n0'))


def test_the_train_step_augments_with_the_step_key():
    """The step normalises through `augment.from_config`'s augmentation with the key
    fold_in(fold_in(key(seed), step), 2): the loss it reports is that of those images."""
    config = tiny_config(**EVERYTHING, seed=5, image_size=12)
    model = step_lib.build_model(config, 10)
    tx = step_lib.create_optimizer(config, 0.1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA,))
    init, _, shardings = step_lib.state_layout(config, model, tx, mesh)
    batch = {'image': pixels(16), 'label': np.arange(16, dtype=np.int32) % 10}
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        p_train, _ = step_lib.make_steps(config, model, tx, mesh, shardings)
        _, metrics = p_train(jax.tree_util.tree_map(jnp.copy, state), batch)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 0), 2)
    images = augment.from_config(config)(key, batch['image'])
    logits = model.apply(variables, images, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.fold_in(jax.random.key(5), 0)})[0]
    expected = step_lib.training_loss(logits, batch['label']).mean()
    np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
    plain = model.apply(variables, step_lib.normalise(
        batch['image'], *image_settings.normalisation(config)), train=True,
        mutable=['batch_stats'])[0]
    assert abs(float(step_lib.training_loss(plain, batch['label']).mean()) - expected) > 1e-4


NO_TENSORFLOW = '''
import sys


class NoTensorFlow:   # importing TensorFlow fails, as on a machine without it
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
            raise ModuleNotFoundError(f'No module named {name!r}')


sys.meta_path.insert(0, NoTensorFlow())
'''


def test_the_step_plan_and_benchmark_need_no_tensorflow():
    """With TensorFlow unavailable: the step module, `plan` and `benchmark` import; benchmark
    times a network; a modern recipe's config is checked, planned as a batch and its step
    (every per-pixel ingredient on the device) traced and run."""
    script = NO_TENSORFLOW + '''
import jax, jax.numpy as jnp, numpy as np
from resnext_jax import benchmark, plan, step, validate
from configs import modern
sys.path.insert(0, 'tests')
from helpers import tiny_config

benchmark.main(['--model', 'resnext29_2x4d', '--batch-size', '8', '--image-size', '8',
                '--steps', '1', '--warmup', '0', '--mode', 'train', '--json'])
config = modern.get_config('rsb_a1_resnext50_32x4d')
validate.check_config(config)
assert plan.batch_shapes(plan.tpu_config(config), 64, 224)['image'].dtype == jnp.uint8
config = tiny_config(color_jitter=0.4, pca_lighting=0.1, auto_augment='ta_wide',
                     random_erase=0.25)
model = step.build_model(config, 10)
tx = step.create_optimizer(config, 0.1)
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
init, _, shardings = step.state_layout(config, model, tx, mesh)
with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    p_train, _ = step.make_steps(config, model, tx, mesh, shardings, 10)
    batch = {'image': np.zeros((16, 8, 8, 3), np.uint8), 'label': np.zeros(16, np.int32)}
    state, metrics = p_train(state, batch)
assert np.isfinite(float(metrics['loss']))
assert not [m for m in sys.modules if m.startswith('tensorflow')]
print('no tensorflow: ok')
'''
    run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith('no tensorflow: ok')
    # ... and the blocker works: the input pipeline does need TensorFlow
    blocked = subprocess.run([sys.executable, '-c', NO_TENSORFLOW + 'import resnext_jax.data'],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert blocked.returncode == 1 and "No module named 'tensorflow'" in blocked.stderr
