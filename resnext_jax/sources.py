"""Where examples come from: a dataset name in a config → a source with its sizes, classes and
a way to read examples.

Random-access sources hold or index every example and read a batch of example indices at once
(`reader(part) -> (fetch, parse)`): scikit-learn digits and `ArraySource` (pixels in memory),
image folders and TFDS splits of ≤ 200,000 examples (`EncodedSource`: paths or encoded bytes
in memory, decoded as they are read), and TFDS datasets prepared as ArrayRecord files
(`RecordSource`, read by index with `tfds.data_source`, only what a process trains on).
Larger TFDS datasets in TFRecord files (`TfdsSource`) can only be read in order. `data` turns
either kind into per-process batches.
"""
import dataclasses
import math
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from resnext_jax.image_settings import IMAGE_EXTENSIONS

MAX_IN_MEMORY = 200_000
ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


def deterministic():
    """tf.data options of every pipeline here: the same elements in the same order each run."""
    options = tf.data.Options()
    options.deterministic = True
    return options


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train: int  # examples in the train split
    num_eval: int  # examples in the eval split
    image_size: int  # side of the square images the model sees (config.image_size)
    class_names: tuple | None = None   # label i's name, where the dataset has names


class ArraySource:
    """Random-access examples in memory: pixels (N, H, W, C) in 0..255, C ∈ {1, 3}.

    Subclasses keep encoded images instead (`encoding` 'file': paths, 'bytes': PNG/JPEG bytes).
    `class_names`: label i's name, or None (set it on a source of your own to have checkpoints
    record them).
    """
    encoding = None
    class_names = None

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
            if images.size and (images.min() < 0 or images.max() > 255):
                raise ValueError(f'{part} images have pixels in [{images.min():g}, '
                                 f'{images.max():g}]; pass pixels in 0..255 (the input pipeline '
                                 'feeds them to the devices as uint8): rescale them')
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
        read_config = tfds.ReadConfig(shuffle_seed=seed, options=deterministic())
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
    splits = [config.train_split, config.eval_split]
    if not set(splits) <= set(parts):
        raise ValueError(f"digits has splits 'train' and 'test', not {splits}: fix "
                         '--config.train_split / --config.eval_split')
    (tr, ev) = (parts[s] for s in splits)
    source = ArraySource(images[tr], digits.target[tr], images[ev], digits.target[ev], 10)
    source.class_names = tuple(str(d) for d in range(10))
    return source


def _folder(root, config):
    """root/<split>/<class>/*.jpg|jpeg|png; classes = sorted subfolders of the train split."""
    splits = [config.train_split, config.eval_split]
    if not tf.io.gfile.isdir(root):
        raise ValueError(f'image folder {root} does not exist: fix --config.dataset '
                         "('folder:/path/to/root' with root/<split>/<class>/*.jpg)")
    classes, parts = None, []
    for field, split in zip(('train_split', 'eval_split'), splits):
        path = os.path.join(root, split)
        if not tf.io.gfile.isdir(path):
            raise ValueError(f'image folder {path} does not exist: expected '
                             f'{root}/<split>/<class>/*.jpg, or fix --config.{field}')
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
    source = EncodedSource('file', *parts, len(classes))
    source.class_names = tuple(classes)   # the class folders' names
    return source


def _tfds(config):
    source = _tfds_source(config)
    names = source_names = None
    try:
        source_names = tfds.builder(config.dataset, data_dir=config.data_dir).info.features[
            'label'].names
    except Exception:   # noqa: BLE001 (no names in this dataset's metadata)
        pass
    if source_names and not all(re.fullmatch(r'n\d{8}', n) for n in source_names):
        names = tuple(source_names)   # WordNet ids (imagenet2012) are no names: predict's own
    source.class_names = names
    return source


def _tfds_source(config):
    name, data_dir = config.dataset, config.data_dir
    splits = [config.train_split, config.eval_split]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown dataset '{name}': use 'digits', 'folder:/path' or a TFDS "
                         'name (fix --config.dataset)') from None
    try:
        counts = [_count(builder, split) for split in splits]
    except Exception:  # TFDS raises assorted errors when the files are not there.
        raise ValueError(f"dataset '{name}' is not prepared in {data_dir or builder.data_dir}: "
                         f'{preparation(name, data_dir, builder)}, or set --config.data_dir to '
                         'where it is') from None
    formats = {builder.info.file_format, *builder.info.alternative_file_formats}
    records = RecordSource(builder, *splits) if ARRAY_RECORD in formats else None
    in_memory = config.in_memory
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


def preparation(name, data_dir, builder):
    """How to prepare TFDS dataset `name` in `data_dir`, as one clause: `tfds build` (TFDS
    downloads it), after a manual download for the datasets that need one (imagenet2012)."""
    where = f' --data_dir={data_dir}' if data_dir else ''
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
        manual = (f'{data_dir}/downloads/manual' if data_dir
                  else '~/tensorflow_datasets/downloads/manual')
        return (f'download its archives by hand as TFDS says (for imagenet2012: '
                f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org) into '
                f'{manual}, then run `tfds build {name}{where}`')
    return f'run `tfds build {name}{where}` (TFDS downloads it)'


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
    return DatasetInfo(source.num_classes, source.num_train, source.num_eval, config.image_size,
                       getattr(source, 'class_names', None))

