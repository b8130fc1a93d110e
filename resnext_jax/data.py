"""Per-process batches: every JAX process gets numpy batches of its own rows only.

Random-access sources (`resnext_jax.sources`) define ONE global stream of example indices,
independent of the number of processes P: epoch e is `stateless_shuffle(range(N),
seed=[seed, e])`, the epochs are chained without a break (a global batch may cross an epoch
boundary), the stream is cut into global batches of b·P and process i takes rows
[i·b, (i+1)·b), reading only those examples. Augmentation (`resnext_jax.preprocess`) is seeded by
(seed, position in the stream), so the concatenation of the P local batches is bitwise the
P = 1 batch, and resuming at step k just skips k·b·P integers: no record is read to get
there. Repeated augmentation (`repeated_augments` k > 1) shuffles once per k epochs and repeats
each index k times in a row, each copy at its own position (so its own augmentation), the
copies dealt to different blocks of the global batch (`spread_repeats`).
TFRecord datasets (sequential only) stream: process i reads `even_splits(split, P)[i]` in a
fixed file order, each epoch shuffled by a buffer seeded by (seed, epoch); resuming at
step k starts at its epoch and skips at most one epoch of records; the order depends on P.
Eval: process i takes examples i, i+P, i+2P, … then mask-0 padding, so every process yields
`num_eval_batches` batches.

An unreadable encoded image (not an image, truncated) stops the stream with a `ValueError`
naming it, or with `skip_corrupt_images` is skipped with a logged warning: in training its
place in the stream goes to the next readable example of the split (by index), so the stream
stays the same for any process count and on resume; in evaluation it is masked out like
padding. It is found when TensorFlow fails on a batch: that batch's examples (the index
stream says which) are decoded one by one, and the stream is rebuilt from that batch on
(`_guarded`).
"""
import math
import re
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from resnext_jax import image_settings, preprocess, runtime, sources


def num_eval_batches(info_or_num_eval, batch_size, process_count) -> int:
    n = getattr(info_or_num_eval, 'num_eval', info_or_num_eval)
    return math.ceil(math.ceil(n / process_count) / batch_size)


def _index_stream(n, seed, start, repeats=1):
    """(position, example index) from global position `start` on; epoch e = shuffle[seed, e].
    With `repeats` k > 1, round r (k epochs, n·k positions) is shuffle[seed, r] with each index
    repeated k times in a row: every example k times per k epochs, each copy at its own
    position (so its own augmentation)."""
    k = repeats
    span = n * k
    first, offset = divmod(start, span)

    def rnd(r):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), r]))
        skip = tf.where(r == first, tf.constant(offset, tf.int64), 0)
        at = tf.range(skip, span, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((r * span + at, tf.gather(perm, at // k)))

    return tf.data.Dataset.counter(first).flat_map(rnd)


def spread_repeats(batch, repeats):
    """The order of a batch of `batch` stream positions that puts the k copies of an example
    (k consecutive positions) in k different blocks of about batch/k rows, so on different
    devices, as torchvision's and timm's samplers deal them to different GPUs: the positions
    ≡ 0 (mod k) first, then ≡ 1, …; with k | batch, row blk·(batch/k) + i takes i·k + blk."""
    return np.argsort(np.arange(batch) % repeats, kind='stable')


def _check_process(process_index, process_count):
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} is not in [0, {process_count})')


def train_batches(config, batch_size, *, start_step=0, process_index=0, process_count=1,
                  source=None) -> Iterator[dict]:
    """Endless process-local batches {'image': (b, S, S, 3), 'label': i32 (b,)}: pixels before
    normalisation, uint8 or bfloat16 (`image_settings.feed_dtype`), which the jitted step
    augments per pixel (`augment_on='device'`: `resnext_jax.augment`) and normalises."""
    _check_process(process_index, process_count)
    source = source or sources.make_source(config)
    if batch_size * process_count > source.num_train:
        raise ValueError(f'global batch {batch_size}×{process_count} exceeds the '
                         f'{source.num_train} train examples: lower --config.batch_size')
    repeats = config.get('repeated_augments', 1)
    transform = preprocess.preprocess_fn(config, True, getattr(source, 'encoding', 'bytes'),
                                         normalise=False)
    seed, b, auto = config.seed, batch_size, tf.data.AUTOTUNE
    if isinstance(source, sources.TfdsSource):  # streaming: deterministic for a fixed process count
        return _streamed(source, transform, seed, b, start_step, process_index, process_count,
                         config.shuffle_buffer, repeats)
    fetch, parse = source.reader('train')
    seed64 = tf.constant(seed, tf.int64)
    lo = process_index * b

    width = b * process_count
    rows = tf.constant(spread_repeats(width, repeats)[lo:lo + b])   # [lo, lo + b) unless k > 1

    def positions(step):   # (stream position, example index) of this process's batch `step`
        ds = _index_stream(source.num_train, seed, step * width, repeats).batch(width)
        return ds.map(lambda p, i: (tf.gather(p, rows), tf.gather(i, rows)))

    def example(p, item):
        image, label = parse(item)
        return {'image': transform(image, tf.stack([seed64, p])), 'label': label}

    def batches(step, unreadable):
        ds = positions(step)
        if unreadable:   # each unreadable example's place goes to the next readable one
            remap = tf.constant(_next_readable(source.num_train, unreadable))
            ds = ds.map(lambda p, i: (p, tf.gather(remap, i)))
        ds = ds.map(lambda p, i: (p, fetch(i)), num_parallel_calls=auto).unbatch()
        return _batched(ds.map(example, num_parallel_calls=auto), b).as_numpy_iterator()

    def batch_examples(step, unreadable):
        p, i = next(iter(positions(step)))
        if unreadable:
            i = _next_readable(source.num_train, unreadable)[i.numpy()]
        return [(int(k), lambda p=p_, k=k: example(p, _one(fetch, k))) for p_, k in zip(p, i)]

    if source.encoding is None:   # decoded pixels: nothing to fail on
        return batches(start_step, {})
    return _guarded(source, 'train', config, batches, batch_examples, start_step)


def eval_batches(config, batch_size, *, process_index=0, process_count=1,
                 source=None) -> Iterator[dict]:
    """Process-local eval batches with 'mask', uint8 images as `train_batches`'; every process
    yields `num_eval_batches`."""
    _check_process(process_index, process_count)
    source = source or sources.make_source(config)
    transform = preprocess.preprocess_fn(config, False, getattr(source, 'encoding', 'bytes'),
                                         normalise=False)
    no_seed = tf.zeros([2], tf.int64)
    size = image_settings.eval_size(config)
    padding = {'image': tf.zeros([size, size, 3], tf.uint8), 'label': tf.constant(0),
               'mask': tf.constant(0.0)}
    num_batches = num_eval_batches(source.num_eval, batch_size, process_count)

    def finish(ds, first_batch=0):   # padded to num_batches full batches
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
        ds = ds.take((num_batches - first_batch) * batch_size)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(sources.deterministic())

    def example(image, label, readable=None):   # readable: a bool tensor, None for always
        if readable is None:
            return {'image': transform(image, no_seed), 'label': tf.cast(label, tf.int32),
                    'mask': tf.constant(1.0)}
        return {'image': tf.cond(readable, lambda: transform(image, no_seed),
                                 lambda: padding['image']),
                'label': tf.cast(label, tf.int32), 'mask': tf.cast(readable, tf.float32)}

    if isinstance(source, sources.TfdsSource):
        split = tfds.even_splits(source.eval_split, n=process_count,
                                 drop_remainder=False)[process_index]
        ds = source.read(split).map(lambda ex: example(ex['image'], ex['label']),
                                    num_parallel_calls=tf.data.AUTOTUNE)
        return finish(ds).as_numpy_iterator()
    local = np.arange(process_index, source.num_eval, process_count, dtype=np.int64)
    fetch, parse = source.reader('eval')

    def batches(first, unreadable):
        readable = (tf.constant(~np.isin(np.arange(source.num_eval), list(unreadable)))
                    if unreadable else None)   # unreadable examples are masked out like padding
        ds = tf.data.Dataset.from_tensor_slices(local[first * batch_size:]).batch(batch_size)
        ds = ds.map(lambda i: (i, fetch(i)), num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.map(lambda i, item: example(*parse(item),
                                            None if readable is None else tf.gather(readable, i)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return finish(ds, first).as_numpy_iterator()

    def batch_examples(k, unreadable):
        return [(int(i), lambda i=i: transform(parse(_one(fetch, i))[0], no_seed))
                for i in local[k * batch_size:(k + 1) * batch_size] if i not in unreadable]

    if source.encoding is None:
        return batches(0, {})
    return _guarded(source, 'eval', config, batches, batch_examples, 0)


def _streamed(source, transform, seed, b, start_step, process_index, process_count, buffer,
              repeats=1):
    """Process `process_index`'s batches of a TFRecord dataset from `start_step` on.

    The process reads its `even_splits` part in one file order (fixed by `seed`); epoch e is
    that sequence through a shuffle buffer seeded by (seed, e), so a resumed run starts at its
    epoch and skips at most one epoch of records. Augmentation is seeded by the position in
    the process's stream. With `repeats` k > 1 a round of k epochs is one shuffled pass with
    each record k times in a row, the copies spread over the batch (`spread_repeats`)."""
    split = tfds.even_splits(source.train_split, n=process_count,
                             drop_remainder=False)[process_index]
    n = source.count(split)   # examples per epoch of this process
    first, offset = divmod(start_step * b, n * repeats)
    records = source.read(split, seed)

    def epoch(e):
        shuffled = records.shuffle(buffer, seed=seed * 1_000_003 + e,
                                   reshuffle_each_iteration=False)
        if repeats > 1:
            shuffled = shuffled.flat_map(
                lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats))
        return shuffled.enumerate(e * n * repeats)

    ds = tf.data.Dataset.counter(first).flat_map(epoch).skip(offset)
    ds = ds.map(lambda i, ex: {'image': transform(ex['image'], tf.stack(
        [tf.constant(seed, tf.int64), i * process_count + process_index])),
        'label': tf.cast(ex['label'], tf.int32)}, num_parallel_calls=tf.data.AUTOTUNE)
    order = spread_repeats(b, repeats) if repeats > 1 else None
    return _batched(ds, b, order).as_numpy_iterator()


def _one(fetch, index):
    """The stored item of one example (`fetch` reads batches)."""
    items = fetch(tf.reshape(tf.cast(index, tf.int64), [1]))
    return tf.nest.map_structure(lambda x: x[0], items)


def _batched(ds, b, order=None):
    """Batches of `b`, their rows reordered by `order` (`spread_repeats`) when given."""
    ds = ds.batch(b, drop_remainder=True)
    if order is not None:
        rows = tf.constant(order)
        ds = ds.map(lambda batch: tf.nest.map_structure(lambda x: tf.gather(x, rows), batch))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(sources.deterministic())


def _next_readable(n, unreadable):
    """Example index → itself, or for an unreadable one the next readable index (cyclically)."""
    readable = np.setdiff1d(np.arange(n), list(unreadable))
    return readable[np.searchsorted(readable, np.arange(n)) % len(readable)]


def _guarded(source, part, config, batches, batch_examples, first):
    """`batches(k, unreadable)`'s batches from batch k = `first` on. When TensorFlow fails on
    batch k, the examples of that batch (`batch_examples(k, unreadable)`: [(index, decode)])
    are decoded one at a time; the unreadable ones raise ValueError, or with
    `skip_corrupt_images` join `source.unreadable[part]` and the stream restarts at batch k."""
    unreadable = source.unreadable[part]
    skip = config.skip_corrupt_images
    k, iterator = first, batches(first, unreadable)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            found = {}
            for index, decode in batch_examples(k, unreadable):
                try:
                    with runtime.native_stderr_silenced():   # libjpeg's line, once more
                        decode()
                except tf.errors.OpError as why:
                    found[index] = _reason(why)
            if not found:
                raise ValueError(f'reading {part} batch {k} failed: {_reason(e)}; check the '
                                 'files of --config.dataset') from None
            index, why = next(iter(found.items()))
            if not skip:
                raise ValueError(
                    f'cannot decode {part} image {source.name(part, index)} ({why}): replace or '
                    'remove it, or set --config.skip_corrupt_images=True to skip unreadable '
                    'images') from None
            for index, why in found.items():
                unreadable[index] = why
                logging.warning('skipping unreadable %s image %s (%s): %d skipped so far',
                                part, source.name(part, index), why, len(unreadable))
            if len(unreadable) == (source.num_train if part == 'train' else source.num_eval):
                raise ValueError(f'no {part} image can be decoded (e.g. '
                                 f'{source.name(part, index)}: {why}); check --config.dataset')
            iterator = batches(k, unreadable)
            continue
        k += 1
        yield batch


def _reason(error):
    """TensorFlow's message without its op and function decorations, on one line."""
    text = re.sub(r'\{\{function_node [^}]*\}\}\s*|\s*(\[Op:|\[\[).*', '', error.message,
                  flags=re.S)
    return ' '.join(text.split()) or type(error).__name__
