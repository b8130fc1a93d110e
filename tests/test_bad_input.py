"""Bad input (issue 13): each is one `error:` line and a non-zero exit, never a traceback or a
lost result. Most rows are checked in-process; a few go through train.py to see the CLI."""
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import default, paper, quickstart
from resnext_jax import create_model, data, sources, tables, validate
from resnext_jax.metrics import MetricsWriter
from test_data import make_config, take
from helpers import TINY, run_cli, tiny_config


def assert_one_error_line(out, expected_start):
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(expected_start), last
    return last


# ------------------------------------------------------------------------------ flags (row 1)

def test_cli_typo_in_a_config_field_is_one_line_with_the_suggestion(tmp_path):
    for config in ([], ['--config=configs/quickstart.py']):  # the default recipe loads earlier
        out = run_cli(f'--workdir={tmp_path}', *config, '--config.batchsize=32')
        assert out.stderr.strip() == ('error: --config.batchsize: the config has no such field; '
                                      'did you mean --config.batch_size?')
        assert out.returncode == 1
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ config (row 2)

def rows():
    return [r for r, spec in tables.ROW_IDS.items() if spec.provided]


def test_good_configs_pass():
    for config in [default.get_config(), quickstart.get_config(), tiny_config()]:
        validate.check_config(config)
    assert len(rows()) >= 20
    for row in rows():
        validate.check_config(paper.get_config(row))


def test_every_default_field_has_a_rule_or_a_reason():
    assert sorted(validate.FIELDS) == sorted(default.get_config().keys())


BAD = [  # field, value (on the quick-start recipe), what the message says is allowed
    ('batch_size', 0, 'an integer ≥ 1'),
    ('image_size', 0, 'an integer ≥ 1'),
    ('eval_image_size', -224, 'None or an integer ≥ 1'),
    ('learning_rate', 0.0, 'a finite number > 0'),
    ('learning_rate', math.nan, 'a finite number > 0'),
    ('learning_rate', math.inf, 'a finite number > 0'),
    ('num_epochs', -1.0, 'a finite number ≥ 0'),
    ('eval_every_epochs', 0.0, 'a finite number > 0'),
    ('checkpoint_every_steps', 0, 'an integer ≥ 1'),
    ('log_every_steps', -5, 'an integer ≥ 1'),
    ('keep_checkpoints', 0, 'an integer ≥ 1'),
    ('weight_decay', -1e-4, 'a finite number ≥ 0 and < 1'),
    ('momentum', 1.0, 'a finite number ≥ 0 and < 1'),
    ('label_smoothing', 1.5, 'a finite number ≥ 0 and < 1'),
    ('bn_group_size', -1, 'an integer ≥ 0'),
    ('warmup_epochs', -1.0, 'a finite number ≥ 0'),
    ('color_jitter', -0.4, 'a finite number ≥ 0 and ≤ 1'),
    ('pca_lighting', -0.1, 'a finite number ≥ 0'),
    ('dtype', 'bf16', "one of ('float32', 'bfloat16', 'float16')"),
    ('form', 'groupd', "one of ('auto', 'paths', 'concat', 'grouped', 'blockdiag', 'sliced')"),
    ('schedule', 'linear', "one of ('step', 'cosine')"),
    ('augment', 'sideways', "one of ('imagenet', 'cifar', 'none')"),
    ('lr_boundaries_epochs', (60, 30), 'increasing'),
    ('lr_boundaries_epochs', ('abc',), 'a finite number ≥ 0'),
    ('lr_decay_factor', 0.0, 'a finite number > 0 and ≤ 1'),
    ('lr_base_batch_size', 0, 'an integer ≥ 1'),
    ('shuffle_buffer', 0, 'an integer ≥ 1'),
    ('seed', 2**64, 'an integer ≥ -9223372036854775808 and < 9223372036854775808'),
    ('mean', (120.0, 110.0), 'a tuple of 3 values'),
    ('std', (60.0, 0.0, 60.0), 'each a finite number > 0'),
    ('crop_padding', -4, 'None or an integer ≥ 0'),
    ('fsdp_min_size', -1, 'an integer ≥ 0'),
    ('dataset', '', 'a non-empty string'),
    ('data_dir', '', 'None or a non-empty string'),
    ('profile_steps', '3:2', "'A:B' with 0 < A < B"),
    ('profile_steps', '5', "'A:B' with 0 < A < B"),
]


@pytest.mark.parametrize('field,value,allowed', BAD, ids=[f'{f}={v!r}' for f, v, _ in BAD])
def test_bad_value_is_one_line_naming_field_value_range_and_flag(field, value, allowed):
    config = quickstart.get_config()
    config[field] = value
    with pytest.raises(ValueError) as e:
        validate.check_config(config)
    message = str(e.value)
    assert message.startswith(f'{field} {value!r} is not ') and allowed in message, message
    assert message.endswith(f': fix --config.{field}') and '\n' not in message


@pytest.mark.parametrize('overrides,expected', [
    ({'num_epochs': 0.0}, "num_epochs 0.0 is not > 0 and num_train_steps -1 is not > 0: fix "
                          '--config.num_epochs'),
    ({'batch_size': 64, 'bn_group_size': 24}, 'bn_group_size 24 does not divide batch_size 64: '
                                              'fix --config.bn_group_size'),
    ({'augment': 'imagenet', 'eval_image_size': 320, 'eval_resize': 256},
     'eval_resize 256 is smaller than the eval crop 320: fix --config.eval_resize'),
    ({'model': 'resnext51_32x4d'}, "unknown model 'resnext51_32x4d'; use one of list_models()"),
    ({'model_options': {'stage_size': (1, 1)}}, "model_options key 'stage_size' is not one of "),
    ({'model_options': {'stage_sizes': (1, 0)}}, 'model_options.stage_sizes (1, 0) is not a tuple '
                                                 'of any number of values, each an integer ≥ 1: '
                                                 'fix --config.model_options.stage_sizes'),
    ({'model_options': {'dtype': 'bfloat16'}}, "model_options sets 'dtype', which has its own "
                                               'field: use --config.dtype'),
    ({'batchsize': 32}, "config field 'batchsize' is unknown: did you mean 'batch_size'? "),
])
def test_bad_combination_is_one_line(overrides, expected):
    config = quickstart.get_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError) as e:
        validate.check_config(config)
    assert str(e.value).startswith(expected) and '\n' not in str(e.value), str(e.value)
    assert '--config.' in str(e.value) or 'configs/default.py' in str(e.value)


def test_image_size_rule_is_what_the_networks_accept(caplog):
    """Measured: every size ≥ 1 gives both stems a ≥ 1×1 map at every stage and logits; 0
    gives empty maps. So 0 is refused and small sizes (below the total stride) only warn."""
    for name, stages in (('resnext29_2x4d', (1, 1, 1)), ('resnext50_2x4d', (1, 1, 1, 1))):
        model = create_model(name, num_classes=10, **{**TINY, 'stage_sizes': stages})
        for size in (0, 1, 3):
            x = jnp.zeros((2, size, size, 3))
            variables = jax.eval_shape(model.init, jax.random.key(0), x)
            maps = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True),
                                  variables, x)
            sides = [m.shape[1] for m in maps.values()]
            assert min(sides) >= 1 if size else max(sides) == 0, (name, size, sides)
    config = quickstart.get_config()
    config.image_size = 0
    with pytest.raises(ValueError, match='^image_size 0 is not an integer ≥ 1'):
        validate.check_config(config)
    config.image_size, config.model, config.model_options = 1, 'resnext50_32x4d', {}
    with caplog.at_level(logging.WARNING):
        validate.check_config(config)
    assert "image size 1 is below the network's total stride 32" in caplog.text


def test_cli_bad_dtype_is_one_line_before_anything_is_written(tmp_path):
    out = run_cli(f'--workdir={tmp_path / "run"}', '--config.dtype=bf16')
    assert_one_error_line(out, "error: dtype 'bf16' is not one of ('float32', 'bfloat16', "
                               "'float16'): fix --config.dtype")
    assert not os.path.exists(tmp_path / 'run')


# ------------------------------------------------------------------------------ workdir (row 3)

def test_workdir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path):
    (tmp_path / 'file').write_text('precious')
    with pytest.raises(ValueError, match=rf'^--workdir {tmp_path}/file is a file, not a '
                                         r'directory: choose another --workdir$'):
        validate.check_workdir(tmp_path / 'file')
    assert (tmp_path / 'file').read_text() == 'precious'


def test_workdir_under_a_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match=r'^--workdir .*file/run cannot be written \(Not a '
                                         r'directory\): choose a writable --workdir$'):
        validate.check_workdir(tmp_path / 'file' / 'run')


@pytest.mark.skipif(not os.path.isdir('/sys/kernel'), reason='no sysfs')
def test_workdir_where_the_kernel_refuses_mkdir_sysfs_is_one_line():
    with pytest.raises(ValueError, match=r'^--workdir /sys/kernel/resnext_run cannot be written '
                                         r'\(.*\): choose a writable --workdir$'):
        validate.check_workdir('/sys/kernel/resnext_run')


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a mode-0o500 directory')
def test_workdir_in_a_read_only_directory_is_one_line(tmp_path):
    (tmp_path / 'ro').mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r'cannot be written \(Permission denied\)'):
        validate.check_workdir(tmp_path / 'ro' / 'run')


# ------------------------------------------------------------------------------ metrics (row 4)

def lines(workdir):
    return (workdir / 'metrics.jsonl').read_text().splitlines()


def test_metrics_half_written_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    good = [json.dumps({'step': s, 'split': 'train', 'loss': 1.0}) for s in (1, 2)]
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(good) + '\n{"step": 3, "split": "tr')
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(tmp_path, resume_step=10)
    assert f'{tmp_path}/metrics.jsonl: dropping its unreadable last line 3' in caplog.text
    assert lines(tmp_path) == good
    writer.write(3, 'train', loss=0.5)
    assert [json.loads(l)['step'] for l in lines(tmp_path)] == [1, 2, 3]


def test_metrics_broken_line_inside_is_one_line_error(tmp_path):
    text = '{"step": 1, "split": "train"}\n{"step": 2, "spl\n{"step": 3, "split": "train"}\n'
    (tmp_path / 'metrics.jsonl').write_text(text)
    with pytest.raises(ValueError, match=rf'^{tmp_path}/metrics.jsonl line 2 is not a metrics '
                                         r'record \(.*\); delete or repair that line'):
        MetricsWriter(tmp_path)
    assert (tmp_path / 'metrics.jsonl').read_text() == text   # left as it was


def test_metrics_record_replaces_the_same_step_and_split(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(5, 'train', loss=1.0)
    writer.write(5, 'eval', top1=0.5, num_examples=360)
    writer.write(5, 'eval', top1=0.7, num_examples=360)   # re-evaluated, e.g. at 320×320
    writer.write(6, 'train', loss=0.9)
    expected = [(5, 'train', None), (5, 'eval', 0.7), (6, 'train', None)]
    got = [(r['step'], r['split'], r.get('top1')) for r in map(json.loads, lines(tmp_path))]
    assert got == expected == [(r['step'], r['split'], r.get('top1'))
                               for r in writer.records()]
    # A resumed writer drops the steps after the checkpoint and keeps one line per key.
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines(tmp_path) + lines(tmp_path)) + '\n')
    MetricsWriter(tmp_path, resume_step=5)
    assert [(r['step'], r['split']) for r in map(json.loads, lines(tmp_path))] == [
        (5, 'train'), (5, 'eval')]
    assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tensorboard']  # no .tmp left


def test_metrics_on_an_object_store_rewrite_the_whole_file(tmp_path):
    writer = MetricsWriter(tmp_path)

    class Bucket(type(writer.path)):   # a gs:// name for a local file: the object-store branch
        def as_posix(self):
            return 'gs://bucket' + super().as_posix()

        def open(self, mode='r', *args, **kwargs):
            assert 'a' not in mode, 'object stores cannot append'
            return super().open(mode, *args, **kwargs)

    writer.path = Bucket(writer.path)
    writer.write(1, 'train', loss=1.0)
    writer.write(1, 'eval', top1=0.25)
    writer.write(1, 'eval', top1=0.5)
    assert [json.loads(l).get('top1') for l in lines(tmp_path)] == [None, 0.5]


# ------------------------------------------------------------------------------ images (rows 5, 6)

def png(image_id, size=4):
    """A PNG whose pixel (0, 0) holds `image_id` (< 256): decode_ids reads it back."""
    x = np.zeros((size, size, 1), np.uint8)
    x[0, 0, 0] = image_id
    return tf.io.encode_png(x).numpy()


def image_folder(root, counts, bad=()):
    """root/<split>/<class>/NN.png numbered in file order; `bad` files are broken instead:
    text named .png, or a truncated PNG."""
    ids = {}
    for split, classes in counts.items():
        n = 0
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                path = root / split / name / f'{k:02d}.png'
                path.write_bytes(png(n))
                ids[f'{split}/{name}/{k:02d}.png'] = n
                n += 1
    for i, rel in enumerate(bad):
        path = root / rel
        path.write_bytes(b'not an image' if i % 2 == 0 else path.read_bytes()[:30])
    return ids


def decode_ids(batch):
    return np.round(batch['image'][:, 0, 0, 0]).astype(int)


def folder_config(root, **kw):
    return make_config(**{'dataset': f'folder:{root}', 'eval_split': 'val', 'image_size': 4,
                          'augment': 'none', 'mean': (0.,) * 3, 'std': (1.,) * 3, **kw})


def test_missing_split_folder_names_the_field_that_chooses_it(tmp_path):
    image_folder(tmp_path, {'train': {'a': 2, 'b': 2}}, bad=())
    for field, value in (('eval_split', 'test'), ('train_split', 'training')):
        config = folder_config(tmp_path, **{field: value})
        with pytest.raises(ValueError, match=rf'{tmp_path}/{value} does not exist: .*, or fix '
                                             rf'--config\.{field}$'):
            sources.make_source(config)
        assert field in default.get_config()   # the message names a field that exists


BAD_TRAIN = ('train/a/03.png', 'train/b/05.png', 'train/b/06.png')   # ids 3, 17, 18


def test_unreadable_image_stops_with_one_line_naming_it(tmp_path):
    image_folder(tmp_path, {'train': {'a': 12, 'b': 12}, 'val': {'a': 3, 'b': 3}},
                 bad=('train/b/05.png', 'val/b/01.png'))
    for augment in ('none', 'imagenet', 'cifar'):   # each decodes its own way
        config = folder_config(tmp_path, augment=augment)
        config.image_size = 8
        source = sources.make_source(config)
        with pytest.raises(ValueError, match=(
                rf'^cannot decode train image {tmp_path}/train/b/05.png \(.+\): replace or remove '
                r'it, or set --config.skip_corrupt_images=True to skip unreadable images$')):
            take(data.train_batches(config, 6, source=source), 4)   # one epoch
        with pytest.raises(ValueError, match=rf'^cannot decode eval image {tmp_path}/val/b/01.png '
                                             r'\(.+\): replace or remove it'):
            list(data.eval_batches(config, 4, source=source))


def test_unreadable_encoded_bytes_are_named_by_position():
    images = np.array([png(i) for i in range(8)] + [b'garbage'], dtype=object)
    source = sources.EncodedSource('bytes', images, np.zeros(9), images[:2], [0, 0], 1)
    config = make_config(image_size=4, augment='none', mean=(0.,) * 3, std=(1.,) * 3)
    with pytest.raises(ValueError, match=r'^cannot decode train image #8 \(Unknown image file'):
        take(data.train_batches(config, 9, source=source), 1)
    config.skip_corrupt_images = True
    batch, = take(data.train_batches(config, 9, source=source), 1)
    assert list(source.unreadable['train']) == [8] and not source.unreadable['eval']
    assert sorted(decode_ids(batch)) == [0, 0, 1, 2, 3, 4, 5, 6, 7]   # #8 → #0, the next one


def test_skipped_images_give_the_same_stream_for_any_process_count_and_on_resume(
        tmp_path, caplog):
    ids = image_folder(tmp_path, {'train': {'a': 12, 'b': 12}, 'val': {'a': 5, 'b': 5}},
                       bad=BAD_TRAIN + ('val/a/02.png',))
    config = folder_config(tmp_path, skip_corrupt_images=True)
    with caplog.at_level(logging.WARNING):
        stream = take(data.train_batches(config, 6, source=sources.make_source(config)), 12)
    for k, rel in enumerate(BAD_TRAIN, 1):
        assert f'skipping unreadable train image {tmp_path}/{rel} (' in caplog.text
        assert f'{k} skipped so far' in caplog.text
    # The stream of the same images decoded in memory, each unreadable one replaced by the
    # next readable one (3 → 4, 17 and 18 → 19): the skipped images never appear.
    replaced = np.array([4 if i == 3 else 19 if i in (17, 18) else i for i in range(24)])
    pixels = np.zeros((24, 4, 4, 1), np.float32)
    pixels[:, 0, 0, 0] = replaced
    in_memory = sources.ArraySource(pixels, replaced // 12, pixels[:2], [0, 1], 2)
    expected = take(data.train_batches(config, 6, source=in_memory), 12)   # 3 epochs
    for got, want in zip(stream, expected):
        np.testing.assert_array_equal(decode_ids(got), decode_ids(want))
        np.testing.assert_array_equal(got['label'], want['label'])
    assert not {3, 17, 18} & set(np.concatenate([decode_ids(b) for b in stream]))
    halves = [take(data.train_batches(config, 3, process_index=i, process_count=2,
                                      source=sources.make_source(config)), 12) for i in range(2)]
    resumed = take(data.train_batches(config, 6, start_step=7, source=sources.make_source(config)),
                   5)
    for t in range(12):
        np.testing.assert_array_equal(
            np.concatenate([decode_ids(halves[0][t]), decode_ids(halves[1][t])]),
            decode_ids(stream[t]))
    for got, want in zip(resumed, stream[7:]):
        np.testing.assert_array_equal(decode_ids(got), decode_ids(want))
    # Evaluation masks the unreadable image out: every other example counted once.
    batches = list(data.eval_batches(config, 4, source=sources.make_source(config)))
    seen = np.concatenate([decode_ids(b)[b['mask'] == 1] for b in batches])
    assert sorted(seen) == [i for i in range(10) if i != ids['val/a/02.png']]


def test_empty_class_folder(tmp_path, caplog):
    image_folder(tmp_path, {'train': {'a': 2, 'b': 2}, 'val': {'a': 1, 'b': 1}})
    (tmp_path / 'val' / 'c').mkdir()
    (tmp_path / 'train' / 'c').mkdir()
    (tmp_path / 'train' / 'c' / 'notes.txt').write_text('no images here')
    with pytest.raises(ValueError, match=rf'^class folder {tmp_path}/train/c has no '
                                         r'.jpg/.jpeg/.png images: add its images or remove'):
        sources.make_source(folder_config(tmp_path))
    (tmp_path / 'train' / 'c' / '00.png').write_bytes(png(0))
    with caplog.at_level(logging.WARNING):   # an eval split without a class: just not scored
        source = sources.make_source(folder_config(tmp_path))
    assert (source.num_classes, source.num_eval) == (3, 2)
    assert f'class folder {tmp_path}/val/c has no images' in caplog.text


def test_cli_unreadable_image_mid_training_is_one_line(tmp_path):
    # 8 train images, batch 8: the first batch holds the unreadable one.
    image_folder(tmp_path / 'data', {'train': {'a': 4, 'b': 4}, 'val': {'a': 2, 'b': 2}},
                 bad=('train/b/02.png',))
    config_file = tmp_path / 'folder.py'
    config_file.write_text(
        'import sys\n'
        f'sys.path.insert(0, {os.path.dirname(__file__)!r})\n'
        'from helpers import tiny_config\n'
        'def get_config():\n'
        f'    return tiny_config(dataset="folder:{tmp_path / "data"}", eval_split="val", '
        'batch_size=8, num_train_steps=3, augment="none")\n')
    out = run_cli(f'--config={config_file}', f'--workdir={tmp_path / "run"}')
    assert_one_error_line(out, f'error: cannot decode train image {tmp_path}/data/train/b/02.png'
                               ' (')


# ------------------------------------------------------------------------------ arrays (row 7)

@pytest.mark.parametrize('part', ['train', 'eval'])
def test_non_finite_pixels_are_refused_at_construction(part):
    images = np.full((6, 4, 4, 3), 100.0)
    broken = images.copy()
    broken[1, 0, 0, 0], broken[4, 2, 1, 2], broken[4, 0, 0, 0] = np.nan, np.inf, -np.inf
    arrays = {'train': images, 'eval': images, part: broken}
    with pytest.raises(ValueError, match=rf'^{part} images: 2 of 6 have NaN or infinite pixels '
                                         r'\(the first is image 1\); replace those pixels'):
        sources.ArraySource(arrays['train'], np.zeros(6), arrays['eval'], np.zeros(6), 1)
    too_big = images.copy()
    too_big[5, 0, 0, 0] = 1e300   # finite in float64, infinite as the float32 it becomes
    with pytest.raises(ValueError, match='1 of 6 have NaN or infinite'):
        sources.ArraySource(too_big, np.zeros(6), images, np.zeros(6), 1)
