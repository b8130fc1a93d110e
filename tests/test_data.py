"""Input pipeline: splits, multi-host equivalence, resume, epochs, eval padding, sources, errors."""
import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from configs import default
from resnext_jax import data, image_settings, preprocess, sources
from resnext_jax import step as step_lib


def make_config(**kw):
    config = default.get_config()
    config.update(dataset='digits', train_split='train', eval_split='test', image_size=16,
                  augment='cifar', shuffle_buffer=64, seed=3)
    config.update(kw)
    return config


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def index_source(num_train, num_eval, size=4):
    """An ArraySource whose image k (train) / 1000 + k (eval) encodes k in pixel (0, 0, 0..1)."""
    def images(ids):
        x = np.zeros((len(ids), size, size, 1), np.float32)
        x[:, 0, 0, 0], x[:, 0, 1, 0] = ids // 256, ids % 256
        return x
    train, evals = np.arange(num_train), 1000 + np.arange(num_eval)
    return sources.ArraySource(images(train), train % 5, images(evals), evals % 5, 5)


def decode_ids(batch):
    """Inverts index_source under mean 0, std 1, augment 'none'."""
    x = np.round(batch['image'][:, 0, :2, 0]).astype(int)
    return x[:, 0] * 256 + x[:, 1]


@pytest.fixture(scope='module')
def digits():
    return sources.make_source(make_config())


def test_digits_split_is_the_held_out_fifth(digits):
    config = make_config(image_size=8, augment='none', mean=(0., 0., 0.), std=(1., 1., 1.))
    info = sources.dataset_info(config, digits)
    assert info == sources.DatasetInfo(10, 1437, 360, 8, tuple('0123456789'))
    sk = load_digits()
    held_out = np.random.default_rng(0).permutation(1797)[-360:]
    expected = np.round(sk.images[held_out] * 255 / 16)
    batches = list(data.eval_batches(config, 100, source=digits))
    assert len(batches) == data.num_eval_batches(info, 100, 1) == 4
    images = np.concatenate([b['image'] for b in batches])[:360]
    labels = np.concatenate([b['label'] for b in batches])[:360]
    np.testing.assert_array_equal(images, np.repeat(expected[..., None], 3, -1))
    np.testing.assert_array_equal(labels, sk.target[held_out])
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.sum() == 360 and not mask[360:].any()
    epoch = np.concatenate([b['image'][..., 0] for b in take(
        data.train_batches(config, 479, source=digits), 3)])  # 3 × 479 = 1437: one epoch
    train = np.round(sk.images[np.setdiff1d(np.arange(1797), held_out)] * 255 / 16)
    assert sorted(map(bytes, epoch.astype(np.uint8))) == sorted(map(bytes, train.astype(np.uint8)))


def test_digits_shapes_dtypes_and_normalisation(digits):
    config = make_config()
    batch = next(data.train_batches(config, 64, source=digits))
    # pixels cross to the devices as uint8, a quarter of float32's bytes
    assert batch['image'].shape == (64, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
    assert set(batch) == {'image', 'label'}
    ev = next(data.eval_batches(config, 64, source=digits))
    assert ev['image'].shape == (64, 16, 16, 3) and ev['image'].dtype == np.uint8
    assert ev['mask'].dtype == np.float32
    # the steps normalise them on the device with the dataset's statistics
    images = np.asarray(step_lib.normalise(ev['image'], *image_settings.normalisation(config)))
    assert images.dtype == np.float32
    assert abs(images.mean()) < 0.3 and 0.5 < images.std() < 1.5


@pytest.mark.parametrize('augment', ['imagenet', 'cifar'])
def test_device_normalisation_equals_host_normalisation(augment):
    """uint8 pixels normalised on the device are the host's float32 normalisation of the same
    preprocessing, up to rounding the pixels to integers (half a grey level); here with the
    colour noise on the host (`augment_on='host'`)."""
    config = make_config(dataset='imagenet2012', image_size=24, augment=augment,
                         color_jitter=0.4, pca_lighting=0.1, augment_on='host')
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    pixels[:20] = np.maximum(pixels[:20], 230)   # bright: brightness jitter passes 255
    mean, std = image_settings.normalisation(config)
    left = []
    for train_, seed in [(False, (0, 0)), *((True, (3, k)) for k in range(6))]:
        seed = tf.constant(seed, tf.int64)
        host = preprocess.preprocess_fn(config, train_, None)(tf.constant(pixels), seed)
        sent = preprocess.preprocess_fn(config, train_, None, normalise=False)(
            tf.constant(pixels), seed)
        # colour noise may leave 0..255: training then sends bfloat16, evaluation uint8
        assert sent.dtype == (tf.bfloat16 if train_ else tf.uint8)
        device = np.asarray(step_lib.normalise(sent.numpy()[None], mean, std))[0]
        # half a grey level: uint8 rounding, or bfloat16's 8 significant bits for |pixels| <
        # 256 (one grey level from 256 to 512, where brightness jitter can take a pixel)
        raw = host.numpy() * std + mean
        levels = np.abs(device - host.numpy()) * std
        assert (levels <= np.where(np.abs(raw) < 256, 0.5, 1.0) + 1e-3).all(), levels.max()
        if train_:
            left.append(((host.numpy() * std + mean < 0) | (host.numpy() * std + mean > 255)).any())
    assert any(left)   # the noise left 0..255 for some seed, and the device saw it unclipped
    plain = make_config(dataset='imagenet2012', image_size=24, augment=augment)
    assert (image_settings.feed_dtype(plain, True) == image_settings.feed_dtype(plain, False)
            == 'uint8')


HOST_PIXELS = dict(augment_on='host', color_jitter=0.4, pca_lighting=0.1,
                   auto_augment='rand-m9-n2-mstd0.5', random_erase=0.25)


@pytest.mark.parametrize('augment,extra', [('cifar', {}), ('imagenet', {}),
                                           ('imagenet', HOST_PIXELS)],
                         ids=['cifar', 'imagenet', 'imagenet-host-pixels'])
def test_process_count_does_not_change_the_global_batch(digits, augment, extra):
    """Also with every per-pixel ingredient on the host (`augment_on='host'`)."""
    config = make_config(augment=augment, **extra)
    start, steps, global_batch = 43, 4, 32  # 1437 / 32 ≈ 44.9: crosses the epoch boundary
    reference = take(data.train_batches(config, global_batch, start_step=start,
                                        source=digits), steps)
    assert_process_counts_give(reference, config, digits, start)


def assert_process_counts_give(reference, config, source, start, counts=(2, 4)):
    """The local batches of 2 and 4 processes, from step `start`, joined are `reference` (one
    process's global batches) bitwise."""
    global_batch = len(reference[0]['label'])
    for count in counts:
        parts = [take(data.train_batches(config, global_batch // count, start_step=start,
                                         process_index=i, process_count=count,
                                         source=source), len(reference)) for i in range(count)]
        for t in range(len(reference)):
            for key in ('image', 'label'):
                joined = np.concatenate([parts[i][t][key] for i in range(count)])
                np.testing.assert_array_equal(joined, reference[t][key])


@pytest.mark.parametrize('extra', [{}, HOST_PIXELS], ids=['cifar', 'cifar-host-pixels'])
def test_resume_matches_the_uninterrupted_stream(digits, extra):
    config = make_config(**extra)
    full = take(data.train_batches(config, 32, source=digits), 48)
    assert not np.array_equal(full[0]['image'], full[1]['image'])
    for k in (1, 44):
        resumed = take(data.train_batches(config, 32, start_step=k, source=digits), 48 - k)
        for a, b in zip(resumed, full[k:]):
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['label'], b['label'])
    other_seed = next(data.train_batches(make_config(seed=4), 32, source=digits))
    assert not np.array_equal(other_seed['label'], full[0]['label'])


def test_every_example_once_per_epoch_and_reshuffled():
    source = index_source(60, 7)
    config = make_config(augment='none', image_size=4, mean=(0.,) * 3, std=(1.,) * 3)
    batches = take(data.train_batches(config, 12, source=source), 10)  # two epochs
    ids = np.concatenate([decode_ids(b) for b in batches])
    assert sorted(ids[:60]) == list(range(60)) and sorted(ids[60:]) == list(range(60))
    assert not np.array_equal(ids[:60], ids[60:])
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), ids % 5)


def test_batches_cross_epoch_boundaries_as_one_stream():
    source = index_source(50, 3)
    config = make_config(augment='none', image_size=4, mean=(0.,) * 3, std=(1.,) * 3)
    ids = np.concatenate([decode_ids(b) for b in take(data.train_batches(
        config, 16, source=source), 7)])  # 112 = 50 + 50 + 12
    for epoch in range(2):
        assert sorted(ids[50 * epoch:50 * (epoch + 1)]) == list(range(50))
    assert len(set(ids[100:])) == 12


@pytest.mark.parametrize('count', [1, 3])
def test_eval_covers_every_example_once(count):
    source = index_source(20, 23)
    config = make_config(augment='none', image_size=4, mean=(0.,) * 3, std=(1.,) * 3)
    expected_batches = data.num_eval_batches(sources.dataset_info(config, source), 4, count)
    assert expected_batches == -(-(-(-23 // count)) // 4)
    seen = []
    for i in range(count):
        batches = list(data.eval_batches(config, 4, process_index=i, process_count=count,
                                         source=source))
        assert len(batches) == expected_batches
        for b in batches:
            assert b['image'].shape == (4, 4, 4, 3)
            keep = b['mask'] == 1.0
            assert set(np.unique(b['mask'])) <= {0.0, 1.0}
            assert not b['image'][~keep].any() and not b['label'][~keep].any()
            seen += list(decode_ids(b)[keep])
    assert sorted(seen) == list(range(1000, 1023))


def test_grayscale_and_float_array_source():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (10, 6, 6, 1)).astype(np.uint8)
    source = sources.ArraySource(gray, np.arange(10) % 2, gray[:3], [0, 1, 0], 2)
    config = make_config(augment='none', image_size=6, mean=(0.,) * 3, std=(1.,) * 3)
    ev = next(data.eval_batches(config, 3, source=source))
    np.testing.assert_array_equal(ev['image'], np.repeat(gray[:3], 3, -1).astype(np.float32))


def test_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    counts = {'train': {'cat': 3, 'dog': 2, 'emu': 4}, 'val': {'cat': 1, 'emu': 2}}
    for split, classes in counts.items():
        for name, n in classes.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                size = (5 + k, 7, 3 if k % 2 else 1)
                png = tf.io.encode_png(rng.integers(0, 256, size).astype(np.uint8))
                (folder / f'{k}.png').write_bytes(png.numpy())
            (folder / 'notes.txt').write_text('not an image')
    config = make_config(dataset=f'folder:{tmp_path}', eval_split='val', image_size=8)
    source = sources.make_source(config)
    assert sources.dataset_info(config, source) == sources.DatasetInfo(3, 9, 3, 8,
                                                                       ('cat', 'dog', 'emu'))
    ev = list(data.eval_batches(config, 8, source=source))
    assert len(ev) == 1 and ev[0]['mask'].sum() == 3
    assert list(ev[0]['label'][:3]) == [0, 2, 2]  # cat, emu, emu in sorted class order
    assert ev[0]['image'].shape == (8, 8, 8, 3)
    for augment in ('imagenet', 'cifar'):
        batch = next(data.train_batches(make_config(**{**config.to_dict(), 'augment': augment}),
                                        9, source=source))
        assert batch['image'].shape == (9, 8, 8, 3)
        assert sorted(batch['label']) == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_folder_errors(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    config = make_config(dataset=f'folder:{tmp_path}', eval_split='val')
    with pytest.raises(ValueError, match='no .* images'):
        sources.make_source(config)
    (tmp_path / 'train' / 'a' / 'x.png').write_bytes(
        tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    with pytest.raises(ValueError, match='val does not exist'):
        sources.make_source(config)


def test_tfds_cifar10_in_memory_and_streaming():
    config = make_config(dataset='cifar10', image_size=32, augment='cifar')
    with tfds.testing.mock_data(num_examples=24):
        for in_memory in (None, False):
            config.in_memory = in_memory
            source = sources.make_source(config)
            assert isinstance(source, sources.TfdsSource) == (in_memory is False)
            info = sources.dataset_info(config, source)
            assert (info.num_classes, info.num_train, info.num_eval) == (10, 24, 24)
            batch = next(data.train_batches(config, 8, source=source))
            assert batch['image'].shape == (8, 32, 32, 3) and batch['label'].dtype == np.int32
            ev = list(data.eval_batches(config, 10, source=source))
            assert len(ev) == 3 and sum(b['mask'].sum() for b in ev) == 24


def test_tfds_streaming_resume_and_imagenet_crop():
    config = make_config(dataset='imagenet2012', image_size=24, augment='imagenet',
                         in_memory=False, shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=20):
        source = sources.make_source(config)
        assert isinstance(source, sources.TfdsSource) and source.num_classes == 1000
        full = take(data.train_batches(config, 4, source=source), 8)
        resumed = take(data.train_batches(config, 4, start_step=5, source=source), 3)
        for a, b in zip(resumed, full[5:]):
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['label'], b['label'])
        assert full[0]['image'].shape == (4, 24, 24, 3)
        ev = next(data.eval_batches(config, 4, process_index=1, process_count=2,
                                    source=source))
        assert ev['image'].shape == (4, 24, 24, 3) and ev['mask'].all()


def test_the_eval_resize_keeps_its_ratio_when_the_image_size_changes():
    """augment 'imagenet' evaluates the shorter side resized to crop × 256/224: at image_size
    112 a 128 × 96 image is resized to 171 × 128 and centre-cropped, as the paper's 256 → 224
    (the old default, a fixed 256, resized it to 341 × 256 instead)."""
    pixels = np.random.default_rng(0).integers(0, 256, (128, 96, 3)).astype(np.float32)
    config = make_config(dataset='imagenet2012', image_size=112, augment='imagenet',
                         mean=(0.0,) * 3, std=(1.0,) * 3)
    no_seed = tf.zeros([2], tf.int64)
    image = preprocess.preprocess_fn(config, False, None)(tf.constant(pixels), no_seed)
    expected = tf.image.resize(pixels, (171, 128)).numpy()[29:141, 8:120]
    np.testing.assert_allclose(image.numpy(), expected, rtol=1e-6, atol=1e-4)
    assert image_settings.eval_settings(config)['eval_resize'] == 128
    config.eval_resize = 256   # a fixed side still works when asked for
    image = preprocess.preprocess_fn(config, False, None)(tf.constant(pixels), no_seed)
    np.testing.assert_allclose(image.numpy(), tf.image.resize(pixels, (341, 256)).numpy()[
        114:226, 72:184], rtol=1e-6, atol=1e-4)


def test_unknown_and_unprepared_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        sources.make_source(make_config(dataset='no_such_set'))
    # the error names the command that prepares it (TFDS downloads mnist itself; imagenet2012
    # needs its archives first)
    with pytest.raises(ValueError) as error:
        sources.make_source(make_config(dataset='mnist', data_dir=str(tmp_path)))
    assert str(error.value) == (
        f"dataset 'mnist' is not prepared in {tmp_path}: run `tfds build mnist "
        f"--data_dir={tmp_path}` (TFDS downloads it), or set --config.data_dir to where it is")
    with pytest.raises(ValueError) as error:
        sources.make_source(make_config(dataset='imagenet2012', data_dir=str(tmp_path)))
    assert (f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org) into '
            f'{tmp_path}/downloads/manual, then run `tfds build imagenet2012 '
            f'--data_dir={tmp_path}`') in str(error.value) and '\n' not in str(error.value)


def test_array_source_errors(digits):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='outside'):
        sources.ArraySource(images, [0, 1, 2, 3], images, [0, 0, 0, 0], 3)
    with pytest.raises(ValueError, match=r'pixels in \[-1, 1\]; pass pixels in 0..255'):
        sources.ArraySource(np.linspace(-1, 1, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3),
                            [0, 1, 2, 0], images, [0, 0, 0, 0], 3)   # normalised floats
    with pytest.raises(ValueError, match='4 images but labels'):
        sources.ArraySource(images, [0, 1, 2], images, [0, 0, 0, 0], 3)
    with pytest.raises(ValueError, match='exceeds the 1437 train examples'):
        data.train_batches(make_config(), 1000, process_count=2, source=digits)
    with pytest.raises(ValueError, match="digits has splits"):
        sources.make_source(make_config(eval_split='validation'))
