"""Prepared TFDS datasets at ImageNet scale, on small ones the test writes (offline): ArrayRecord
files are read by index through the global index stream (resume reads nothing to find its
place; the same batches for 1, 2 and 4 processes), TFRecord files stream and resume within an
epoch. Records read are counted, not timed."""
import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets import dataset_builders

from resnext_jax import data, sources
from test_data import assert_process_counts_give, decode_ids, make_config, take

NUM_TRAIN, NUM_EVAL, SIZE = 90, 17, 8


def id_image(k):
    """An 8×8 RGB image whose red pixels (0, 0) and (0, 1) hold k // 256 and k % 256 (as
    test_data.decode_ids reads them); the rest is noise."""
    image = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image[0, :2, 0] = k // 256, k % 256
    return image


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """{file format: data_dir} of the dataset 'ids' in ArrayRecord and in TFRecord files;
    train example k is id_image(k) with label k % 5, eval example k is id_image(1000 + k)."""
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
        'label': tfds.features.ClassLabel(num_classes=5)})
    splits = {'train': [(k, {'image': id_image(k), 'label': k % 5}) for k in range(NUM_TRAIN)],
              'test': [(k, {'image': id_image(1000 + k), 'label': (1000 + k) % 5})
                       for k in range(NUM_EVAL)]}
    dirs = {}
    for file_format in ('array_record', 'tfrecord'):
        dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
        dataset_builders.store_as_tfds_dataset(
            name='ids', version='1.0.0', features=features, split_datasets=splits,
            data_dir=dirs[file_format], file_format=file_format)
    return dirs


def config_for(data_dir, **kw):
    return make_config(**{**dict(dataset='ids', data_dir=data_dir, image_size=SIZE,
                                 augment='none', mean=(0.,) * 3, std=(1.,) * 3, in_memory=False),
                          **kw})


class CountingRecords:
    """A tfds data source that counts the records read through it."""

    def __init__(self, records):
        self.records, self.read = records, 0

    def __len__(self):
        return len(self.records)

    def __getitems__(self, indices):
        self.read += len(indices)
        return self.records.__getitems__(indices)


def count_tfrecord_reads(source):
    """Makes `source.read` count the records it yields; returns the counter ([n])."""
    read, real = [0], source.read

    def one(label):
        read[0] += 1
        return label

    def counted(split, seed=None):
        return real(split, seed).map(lambda ex: {**ex, 'label': tf.py_function(
            one, [ex['label']], ex['label'].dtype)})
    source.read = counted
    return read


def test_array_record_batches_are_the_index_stream_for_any_process_count(prepared):
    config = config_for(prepared['array_record'])
    source = sources.make_source(config)
    assert isinstance(source, sources.RecordSource)
    assert (source.num_train, source.num_eval, source.num_classes) == (NUM_TRAIN, NUM_EVAL, 5)
    start, steps, global_batch = 2, 4, 24   # 90 / 24 = 3.75: crosses an epoch boundary
    reference = take(data.train_batches(config, global_batch, start_step=start,
                                        source=source), steps)
    # The same stream as the examples held in memory (decoded from the same PNGs) give.
    in_memory = sources.make_source(config_for(prepared['array_record'], in_memory=True))
    assert isinstance(in_memory, sources.EncodedSource)
    for a, b in zip(reference, take(data.train_batches(config, global_batch, start_step=start,
                                                       source=in_memory), steps)):
        np.testing.assert_array_equal(a['image'], b['image'])
    ids = np.concatenate([decode_ids(b) for b in reference])
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in reference]), ids % 5)
    assert_process_counts_give(reference, config, source, start)


def test_array_record_resume_reads_only_the_batches_it_trains_on(prepared):
    config = config_for(prepared['array_record'], augment='cifar')
    source = sources.make_source(config)
    b = 8
    full = take(data.train_batches(config, b, source=source), 40)
    for start in (37, 30_000):   # 30,000 steps of 8 = 2,667 epochs of 90
        source.records['train'] = counting = CountingRecords(source.records['train'])
        resumed = take(data.train_batches(config, b, start_step=start, source=source), 3)
        # 3 batches and what tf.data prefetched: nothing read to get to the start
        assert 3 * b <= counting.read <= 20 * b, counting.read
        source.records['train'] = counting.records
        if start < len(full):
            for a, c in zip(resumed, full[start:]):
                np.testing.assert_array_equal(a['image'], c['image'])
                np.testing.assert_array_equal(a['label'], c['label'])


@pytest.mark.parametrize('count', [1, 3])
def test_array_record_eval_reads_every_example_once(prepared, count):
    config = config_for(prepared['array_record'])
    source = sources.make_source(config)
    ids = []
    for i in range(count):
        for batch in data.eval_batches(config, 4, process_index=i, process_count=count,
                                       source=source):
            ids += list(decode_ids(batch)[batch['mask'] == 1])
    assert sorted(ids) == list(range(1000, 1000 + NUM_EVAL))


def test_tfrecord_resume_reads_at_most_one_epoch(prepared, caplog):
    with caplog.at_level(logging.INFO):
        config = config_for(prepared['tfrecord'], shuffle_buffer=32)
        source = sources.make_source(config)
    assert isinstance(source, sources.TfdsSource)
    assert 'resumes at once' in caplog.text and '--out_file_format=array_record' in caplog.text
    b, late = 8, 200   # step 200 of 8 per process: epoch 17 (or 35 of 2 processes' 45)
    for process_count in (1, 2):
        part = -(-NUM_TRAIN // process_count)   # the larger part's examples per epoch
        for index in range(process_count):
            kw = dict(process_index=index, process_count=process_count, source=source)
            full = take(data.train_batches(config, b, **kw), late + 3)
            ids = np.concatenate([decode_ids(x) for x in full[:part * 2 // b]])
            epoch = sorted(ids[:len(ids) // 2])
            assert len(set(epoch)) == len(epoch)   # each example once per epoch
            read = count_tfrecord_reads(source)
            resumed = take(data.train_batches(config, b, start_step=late, **kw), 3)
            del source.read   # the class's own again
            assert read[0] <= part + 20 * b < late * b, read[0]
            for a, c in zip(resumed, full[late:]):
                np.testing.assert_array_equal(a['image'], c['image'])
                np.testing.assert_array_equal(a['label'], c['label'])


def test_tfrecord_repeated_augmentation_shows_every_example_k_times(prepared):
    """A streamed TFRecord split with `repeated_augments` 3: a round of 3 epochs shows every
    example 3 times, the copies of one example in one batch, in different thirds (devices),
    and a resumed stream continues it."""
    k, b = 3, 6
    config = config_for(prepared['tfrecord'], shuffle_buffer=32, repeated_augments=k)
    source = sources.make_source(config)
    assert isinstance(source, sources.TfdsSource)
    batches = take(data.train_batches(config, b, source=source), NUM_TRAIN * k // b + 2)
    ids = np.concatenate([decode_ids(x) for x in batches[:NUM_TRAIN * k // b]])
    np.testing.assert_array_equal(np.bincount(ids, minlength=NUM_TRAIN), np.full(NUM_TRAIN, k))
    for batch in ids.reshape(-1, b):
        thirds = batch.reshape(k, b // k)
        assert (thirds == thirds[0]).all()
    resumed = take(data.train_batches(config, b, start_step=7, source=source), 2)
    for a, c in zip(resumed, batches[7:]):
        np.testing.assert_array_equal(a['image'], c['image'])
