"""Input pipeline on tf.data: every JAX process gets numpy batches of its own rows only.

Random-access sources (scikit-learn digits, `ArraySource`, image folders, TFDS splits of
≤ 200,000 examples held in memory, and TFDS datasets prepared as ArrayRecord files, read by
index with `tfds.data_source`) define ONE global stream of example indices, independent of the
number of processes P: epoch e is `stateless_shuffle(range(N), seed=[seed, e])`, the epochs are
chained without a break (a global batch may cross an epoch boundary), the stream is cut into
global batches of b·P and process i takes rows [i·b, (i+1)·b), reading only those examples.
Augmentation is seeded by (seed, position in the stream), so the concatenation of the P local
batches is bitwise the P = 1 batch, and resuming at step k just skips k·b·P integers: no
record is read to get there. Large TFDS datasets in TFRecord files (sequential only) stream:
process i reads `even_splits(split, P)[i]` in a fixed file order, each epoch shuffled by a
buffer seeded by (seed, epoch); resuming at step k starts at its epoch and skips at most one
epoch of records; the order depends on P. Eval: process i takes examples i, i+P, i+2P, … then
mask-0 padding, so every process yields `num_eval_batches` batches. Pixels are in 0..255
until normalised by (x - mean) / std.

Encoded images (folders, TFDS sets of mixed sizes) are decoded as they are read, never all up
front. An unreadable one (not an image, truncated) stops the stream with a `ValueError` naming
it, or with `skip_corrupt_images` is skipped with a logged warning: in training its place in
the stream goes to the next readable example of the split (by index), so the stream stays the
same for any process count and on resume; in evaluation it is masked out like padding. It is
found when TensorFlow fails on a batch: that batch's examples (the index stream says which)
are decoded one by one, and the stream is rebuilt from that batch on (`_guarded`).
"""
import dataclasses
import math
import os
import re
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

try:  # TensorFlow only feeds the host; the accelerators belong to JAX.
    tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
    pass

AUGMENTS = ('imagenet', 'cifar', 'none')
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
NORMALISATION = {  # 0..255 units; the ImageNet statistics for every other dataset.
    'cifar10': ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'cifar100': ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    'mnist': ((33.3,) * 3, (78.6,) * 3),
    'digits': ((77.8,) * 3, (95.9,) * 3),  # measured on all 1797 images scaled to 0..255
}
# PCA of ImageNet RGB pixels (0..1 units), for the official code's lighting noise.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
MAX_IN_MEMORY = 200_000
ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train: int  # examples in the train split
    num_eval: int  # examples in the eval split
    image_size: int  # side of the square images the model sees (config.image_size)


class ArraySource:
    """Random-access examples in memory: pixels (N, H, W, C) in 0..255, C ∈ {1, 3}.

    Subclasses keep encoded images instead (`encoding` 'file': paths, 'bytes': PNG/JPEG bytes).
    """
    encoding = None

    def __init__(self, train_images, train_labels, eval_images, eval_labels, num_classes):
        self.num_classes = int(num_classes)
        self.train = self._check('train', train_images, train_labels)
        self.eval = self._check('eval', eval_images, eval_labels)
        self.num_train, self.num_eval = len(self.train[1]), len(self.eval[1])

    def _check(self, part, images, labels):
        """(images, labels) as arrays; float pixels must be finite."""
        images, labels = np.asarray(images), np.asarray(labels)
        if len(images) != len(labels) or labels.ndim != 1:
            raise ValueError(f'{part}: {len(images)} images but labels of shape {labels.shape}; '
                             'pass one integer label per image')
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f'{part} labels span [{labels.min()}, {labels.max()}], outside '
                             f'[0, {self.num_classes}): fix the labels or num_classes')
        if self.encoding is None and (images.ndim != 4 or images.shape[-1] not in (1, 3)):
            raise ValueError(f'{part} images have shape {images.shape}; expected (N, H, W, C) '
                             'with C = 1 or 3')
        if self.encoding is None and images.dtype != np.uint8:
            with np.errstate(over='ignore'):   # too large for float32: inf, refused below
                images = images.astype(np.float32)  # float images are taken to be in 0..255
            bad = ~np.isfinite(images).reshape(len(images), -1).all(1)
            if bad.any():
                raise ValueError(f'{part} images: {bad.sum()} of {len(images)} have NaN or '
                                 f'infinite pixels (the first is image {np.argmax(bad)}); '
                                 'replace those pixels or drop those images')
        return images, labels.astype(np.int32)

    def reader(self, part):
        """(fetch, parse) for `part` ('train' or 'eval'), TensorFlow functions: `fetch(indices)`
        the stored items of a batch of example indices, `parse(item)` one item's (image, label)."""
        images, labels = (tf.constant(a) for a in getattr(self, part))
        return (lambda i: (tf.gather(images, i), tf.gather(labels, i))), (lambda item: item)


class EncodedSource(ArraySource):
    """Images stored encoded (folder paths or bytes), decoded on the fly."""

    def __init__(self, encoding, *args):
        self.encoding = encoding
        super().__init__(*args)
        self.unreadable = {'train': {}, 'eval': {}}   # example index → why, once found

    def name(self, part, index):
        """A file's path, or for encoded bytes '#' and the example's position in its split."""
        return getattr(self, part)[0][index] if self.encoding == 'file' else f'#{index}'


class RecordSource:
    """A TFDS dataset prepared as ArrayRecord files, read by example index (`tfds.data_source`):
    only the examples a process trains on are read, and a resumed run reads nothing to find its
    place. Images stay encoded until preprocessing."""
    encoding = 'bytes'

    def __init__(self, builder, train_split, eval_split):
        self.features = builder.info.features
        self.num_classes = self.features['label'].num_classes
        self.splits = {'train': train_split, 'eval': eval_split}
        self.records = {part: builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
            for part, split in self.splits.items()}
        self.num_train, self.num_eval = (len(self.records[p]) for p in ('train', 'eval'))
        self.unreadable = {'train': {}, 'eval': {}}

    def name(self, part, index):
        return f'{self.splits[part]}[{index}]'

    def reader(self, part, decode_images=False):
        records = self.records[part]

        def read(indices):   # serialized tf.Examples, one per index
            return np.array(records.__getitems__(indices.tolist()), dtype=object)

        def fetch(indices):
            raw = tf.numpy_function(read, [indices], tf.string, stateful=False)
            return tf.reshape(raw, tf.shape(indices))

        def parse(raw):
            decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
            example = self.features.deserialize_example(raw, decoders=decoders)
            return example['image'], tf.cast(example['label'], tf.int32)

        return fetch, parse


class TfdsSource:
    """A TFDS dataset in TFRecord files, read as a stream of encoded records."""

    def __init__(self, builder, train_split, eval_split, num_train, num_eval):
        self.builder, self.train_split, self.eval_split = builder, train_split, eval_split
        self.num_classes = builder.info.features['label'].num_classes
        self.num_train, self.num_eval = num_train, num_eval

    def read(self, split, seed=None):
        """The split's examples, images encoded; with `seed` in a file order fixed by it."""
        read_config = tfds.ReadConfig(shuffle_seed=seed, options=_options())
        return self.builder.as_dataset(split=split, shuffle_files=seed is not None,
                                       read_config=read_config,
                                       decoders={'image': tfds.decode.SkipDecoding()})

    def count(self, split):
        return _count(self.builder, split)


def _digits(config):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))  # fixed held-out split
    num_eval = math.ceil(0.2 * len(images))
    parts = {'train': order[:-num_eval], 'test': order[-num_eval:]}
    splits = [config.get('train_split', 'train'), config.get('eval_split', 'test')]
    if not set(splits) <= set(parts):
        raise ValueError(f"digits has splits 'train' and 'test', not {splits}: fix "
                         '--config.train_split / --config.eval_split')
    (tr, ev) = (parts[s] for s in splits)
    return ArraySource(images[tr], digits.target[tr], images[ev], digits.target[ev], 10)


def _folder(root, config):
    """root/<split>/<class>/*.jpg|jpeg|png; classes = sorted subfolders of the train split."""
    splits = [config.get('train_split', 'train'), config.get('eval_split', 'test')]
    if not tf.io.gfile.isdir(root):
        raise ValueError(f'image folder {root} does not exist: fix --config.dataset '
                         "('folder:/path/to/root' with root/<split>/<class>/*.jpg)")
    classes, parts = None, []
    for split in splits:
        path = os.path.join(root, split)
        if not tf.io.gfile.isdir(path):
            raise ValueError(f'image folder {path} does not exist: expected '
                             f'{root}/<split>/<class>/*.jpg, or fix --config.{split}_split')
        found = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(path)
                       if tf.io.gfile.isdir(os.path.join(path, d)))
        classes = classes or found
        files, labels = [], []
        for name in found:
            if name not in classes:
                raise ValueError(f'class folder {path}/{name} is not among the train classes')
            names = sorted(f for f in tf.io.gfile.listdir(os.path.join(path, name))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not names and split == splits[0]:   # the train split's folders are the classes
                raise ValueError(f'class folder {path}/{name} has no {"/".join(IMAGE_EXTENSIONS)} '
                                 'images: add its images or remove the folder')
            if not names:   # the class exists (from the train split); it is just not evaluated
                logging.warning('class folder %s/%s has no images: the %s split has no '
                                'examples of class %s', path, name, split, name)
            files += [os.path.join(path, name, f) for f in names]
            labels += [classes.index(name)] * len(names)
        if not files:
            raise ValueError(f'no {"/".join(IMAGE_EXTENSIONS)} images in {path}/<class>/')
        parts += [np.array(files, dtype=object), np.array(labels)]
    return EncodedSource('file', *parts, len(classes))


def _tfds(config):
    name, data_dir = config.dataset, config.get('data_dir', None)
    splits = [config.get('train_split', 'train'), config.get('eval_split', 'test')]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown dataset '{name}': use 'digits', 'folder:/path' or a TFDS "
                         'name (fix --config.dataset)') from None
    try:
        counts = [_count(builder, split) for split in splits]
    except Exception:  # TFDS raises assorted errors when the files are not there.
        raise ValueError(f"dataset '{name}' is not prepared in {data_dir or builder.data_dir}: "
                         'download it manually as TFDS explains, or set --config.data_dir'
                         ) from None
    formats = {builder.info.file_format, *builder.info.alternative_file_formats}
    records = RecordSource(builder, *splits) if ARRAY_RECORD in formats else None
    in_memory = config.get('in_memory', None)
    if not (counts[0] <= MAX_IN_MEMORY if in_memory is None else in_memory):
        if records:
            return records
        logging.info('%s is stored as TFRecord files, which are read in order: a resumed run '
                     'reads up to one epoch to find its place, and the order depends on the '
                     'number of processes. Converted to ArrayRecord (`tfds convert_format '
                     '--dataset_version_dir=%s --out_file_format=array_record`) it resumes at '
                     'once, in one order for any number of processes.', name, builder.data_dir)
        return TfdsSource(builder, *splits, *counts)
    fixed = builder.info.features['image'].shape[0] is not None
    decoders = None if fixed else {'image': tfds.decode.SkipDecoding()}
    parts = []
    for part, split in zip(('train', 'eval'), splits):
        if records:   # ArrayRecord files have no tf.data reader: by index, in order
            fetch, parse = records.reader(part, decode_images=fixed)
            ds = tf.data.Dataset.range(len(records.records[part])).batch(4096).map(
                fetch).unbatch().map(parse)
        else:
            ds = builder.as_dataset(split=split, decoders=decoders).map(
                lambda ex: (ex['image'], ex['label']))
        chunks = list(tfds.as_numpy(ds.batch(4096)))
        parts += [np.concatenate([c[k] for c in chunks]) for k in (0, 1)]
    num_classes = builder.info.features['label'].num_classes
    return ArraySource(*parts, num_classes) if fixed else EncodedSource('bytes', *parts,
                                                                        num_classes)


def _count(builder, split):
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # no split metadata (e.g. under tfds.testing.mock_data)
        return int(builder.as_dataset(split=split).cardinality())


def make_source(config):
    """'digits', 'folder:/path/root' or a TFDS name (with optional ':version' / '/config')."""
    if config.dataset == 'digits':
        return _digits(config)
    if config.dataset.startswith('folder:'):
        return _folder(config.dataset[len('folder:'):], config)
    return _tfds(config)


def dataset_info(config, source=None) -> DatasetInfo:
    source = source or make_source(config)
    return DatasetInfo(source.num_classes, source.num_train, source.num_eval, config.image_size)


def num_eval_batches(info_or_num_eval, batch_size, process_count) -> int:
    n = getattr(info_or_num_eval, 'num_eval', info_or_num_eval)
    return math.ceil(math.ceil(n / process_count) / batch_size)


# ---- per-example preprocessing (float32 pixels in 0..255 until `normalise`) ----

def _decode(data, encoding):
    if encoding == 'file':
        data = tf.io.read_file(data)
    if encoding:
        return tf.io.decode_image(data, channels=3, expand_animations=False)
    return data if data.shape[-1] == 3 else tf.image.grayscale_to_rgb(data)


def _inception_crop(data, encoding, seed):
    """Random crop of 8%–100% of the area, aspect 3/4–4/3; JPEGs decode only the window."""
    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, tf.constant([[[0., 0., 1., 1.]]]), seed, min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        return begin, size

    def crop_decoded(image):
        return tf.slice(image, *window(tf.shape(image)))

    if not encoding:
        return crop_decoded(_decode(data, None))
    if encoding == 'file':
        data = tf.io.read_file(data)

    def jpeg():
        begin, size = window(tf.image.extract_jpeg_shape(data))
        return tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], size[0],
                                                             size[1]]), channels=3)

    return tf.cond(tf.io.is_jpeg(data), jpeg,
                   lambda: crop_decoded(_decode(data, 'bytes')))


def _resize(image, size):
    """Bilinear resize to size × size unless the image already has that side."""
    if image.shape[0] is not None and image.shape[:2] == (size, size):
        return tf.cast(image, tf.float32)
    same = tf.reduce_all(tf.shape(image)[:2] == size)
    image = tf.cond(same, lambda: tf.cast(image, tf.float32),
                    lambda: tf.image.resize(image, [size, size]))
    return tf.reshape(image, [size, size, 3])


def _centre_crop(image, size, resize):
    """Resize the shorter side to `resize` keeping the aspect, then crop size × size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(tf.round(shape * resize / tf.reduce_min(shape)), tf.int32)
    image = tf.image.resize(image, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return tf.reshape(image[top:top + size, left:left + size], [size, size, 3])


def _colour(image, seed, strength, lighting):
    """The official code's colour noise: brightness, contrast and saturation jitter of ±strength
    in random order, then PCA lighting with N(0, lighting) coefficients (0..255 pixels)."""
    order_seed, *seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    if strength:
        def blend(image, other, s):
            alpha = tf.random.stateless_uniform([], s, 1 - strength, 1 + strength)
            return image * alpha + other * (1 - alpha)

        def gray(image):
            return tf.reduce_sum(image * [0.299, 0.587, 0.114], -1, keepdims=True)

        ops = [lambda im: blend(im, tf.zeros_like(im), seeds[0]),            # brightness
               lambda im: blend(im, tf.reduce_mean(gray(im)), seeds[1]),     # contrast
               lambda im: blend(im, gray(im), seeds[2])]                     # saturation
        orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
        k = tf.random.stateless_uniform([], order_seed, 0, 6, tf.int32)

        def apply(order):
            def run():
                out = image
                for i in order:
                    out = ops[i](out)
                return out
            return run
        image = tf.switch_case(k, [apply(o) for o in orders])
    if lighting:
        alpha = tf.random.stateless_normal([3], seeds[3], stddev=lighting)
        rgb = tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))
        image = image + 255.0 * rgb
    return image


def normalisation(config):
    """(mean, std) per channel in 0..255 units: the config's `mean` / `std`, else the dataset's
    (NORMALISATION), else ImageNet's."""
    base = config.dataset.split(':')[0].split('/')[0]
    mean, std = NORMALISATION.get(base, (IMAGENET_MEAN, IMAGENET_STD))
    return (tuple(config.get('mean', None) or mean), tuple(config.get('std', None) or std))


def preprocess_fn(config, train, encoding):
    """f(data, seed) -> normalised float32 (S, S, 3), as the config's training (`train`) or
    evaluation preprocesses an example; seed is a stateless [2] seed (unused by evaluation).
    `encoding`: None for pixel arrays, 'file' for paths, 'bytes' for PNG/JPEG bytes. Any
    ConfigDict with the fields it reads works: `predict` builds one from a checkpoint's
    metadata, so images are fed to the weights as in training."""
    size, augment = config.image_size, config.get('augment', 'none')
    if not train:
        size = config.get('eval_image_size', None) or size
    jitter, lighting = config.get('color_jitter', 0.0), config.get('pca_lighting', 0.0)
    if augment not in AUGMENTS:
        raise ValueError(f"augment '{augment}' is not one of {AUGMENTS}: fix --config.augment")
    pad = config.get('crop_padding', None)
    pad = size // 8 if pad is None else pad
    mean, std = (tf.constant(v, tf.float32) for v in normalisation(config))

    def preprocess(data, seed):
        crop_seed, flip_seed, colour_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3))
        if augment == 'imagenet' and train:
            image = tf.image.resize(_inception_crop(data, encoding, crop_seed), [size, size])
        elif augment == 'imagenet':
            resize = config.get('eval_resize', None) or round(size * 256 / 224)
            image = _centre_crop(_decode(data, encoding), size, resize)
        else:
            image = _resize(_decode(data, encoding), size)
        if augment == 'cifar' and train:  # zero padding, as in fb.resnet.torch
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, [size, size, 3], crop_seed)
        if train and (jitter or lighting):
            image = _colour(image, colour_seed, jitter, lighting)
        if augment != 'none' and train:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return (tf.reshape(image, [size, size, 3]) - mean) / std

    return preprocess


def _options():
    options = tf.data.Options()
    options.deterministic = True
    return options


def _index_stream(n, seed, start):
    """(position, example index) from global position `start` on; epoch e = shuffle[seed, e]."""
    first, offset = divmod(start, n)

    def epoch(e):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
        skip = tf.where(e == first, tf.constant(offset, tf.int64), 0)
        return tf.data.Dataset.from_tensor_slices((e * n + tf.range(skip, n), perm[skip:]))

    return tf.data.Dataset.counter(first).flat_map(epoch)


def _check_process(process_index, process_count):
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} is not in [0, {process_count})')


def train_batches(config, batch_size, *, start_step=0, process_index=0, process_count=1,
                  source=None) -> Iterator[dict]:
    """Endless process-local batches {'image': f32 (b, S, S, 3), 'label': i32 (b,)}."""
    _check_process(process_index, process_count)
    source = source or make_source(config)
    if batch_size * process_count > source.num_train:
        raise ValueError(f'global batch {batch_size}×{process_count} exceeds the '
                         f'{source.num_train} train examples: lower --config.batch_size')
    preprocess = preprocess_fn(config, True, getattr(source, 'encoding', 'bytes'))
    seed, b, auto = config.seed, batch_size, tf.data.AUTOTUNE
    if isinstance(source, TfdsSource):  # streaming: deterministic for a fixed process count
        return _streamed(source, preprocess, seed, b, start_step, process_index, process_count,
                         config.get('shuffle_buffer', 10_000))
    fetch, parse = source.reader('train')
    seed64 = tf.constant(seed, tf.int64)
    lo = process_index * b

    def positions(step):   # (stream position, example index) of this process's batch `step`
        ds = _index_stream(source.num_train, seed, step * b * process_count)
        return ds.batch(b * process_count).map(lambda p, i: (p[lo:lo + b], i[lo:lo + b]))

    def example(p, item):
        image, label = parse(item)
        return {'image': preprocess(image, tf.stack([seed64, p])), 'label': label}

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
    """Process-local eval batches with 'mask'; every process yields `num_eval_batches`."""
    _check_process(process_index, process_count)
    source = source or make_source(config)
    preprocess = preprocess_fn(config, False, getattr(source, 'encoding', 'bytes'))
    no_seed = tf.zeros([2], tf.int64)
    size = config.get('eval_image_size', None) or config.image_size
    padding = {'image': tf.zeros([size, size, 3]), 'label': tf.constant(0),
               'mask': tf.constant(0.0)}
    num_batches = num_eval_batches(source.num_eval, batch_size, process_count)

    def finish(ds, first_batch=0):   # padded to num_batches full batches
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
        ds = ds.take((num_batches - first_batch) * batch_size)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())

    def example(image, label, readable=None):   # readable: a bool tensor, None for always
        if readable is None:
            return {'image': preprocess(image, no_seed), 'label': tf.cast(label, tf.int32),
                    'mask': tf.constant(1.0)}
        return {'image': tf.cond(readable, lambda: preprocess(image, no_seed),
                                 lambda: padding['image']),
                'label': tf.cast(label, tf.int32), 'mask': tf.cast(readable, tf.float32)}

    if isinstance(source, TfdsSource):
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
        return [(int(i), lambda i=i: preprocess(parse(_one(fetch, i))[0], no_seed))
                for i in local[k * batch_size:(k + 1) * batch_size] if i not in unreadable]

    if source.encoding is None:
        return batches(0, {})
    return _guarded(source, 'eval', config, batches, batch_examples, 0)


def _streamed(source, preprocess, seed, b, start_step, process_index, process_count, buffer):
    """Process `process_index`'s batches of a TFRecord dataset from `start_step` on.

    The process reads its `even_splits` part in one file order (fixed by `seed`); epoch e is
    that sequence through a shuffle buffer seeded by (seed, e), so a resumed run starts at its
    epoch and skips at most one epoch of records. Augmentation is seeded by the position in
    the process's stream."""
    split = tfds.even_splits(source.train_split, n=process_count,
                             drop_remainder=False)[process_index]
    n = source.count(split)   # examples per epoch of this process
    first, offset = divmod(start_step * b, n)
    records = source.read(split, seed)

    def epoch(e):
        shuffled = records.shuffle(buffer, seed=seed * 1_000_003 + e,
                                   reshuffle_each_iteration=False)
        return shuffled.enumerate(e * n)

    ds = tf.data.Dataset.counter(first).flat_map(epoch).skip(offset)
    ds = ds.map(lambda i, ex: {'image': preprocess(ex['image'], tf.stack(
        [tf.constant(seed, tf.int64), i * process_count + process_index])),
        'label': tf.cast(ex['label'], tf.int32)}, num_parallel_calls=tf.data.AUTOTUNE)
    return _batched(ds, b).as_numpy_iterator()


def _one(fetch, index):
    """The stored item of one example (`fetch` reads batches)."""
    items = fetch(tf.reshape(tf.cast(index, tf.int64), [1]))
    return tf.nest.map_structure(lambda x: x[0], items)


def _batched(ds, b):
    return ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())


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
    skip = config.get('skip_corrupt_images', False)
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
