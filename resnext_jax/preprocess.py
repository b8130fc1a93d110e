"""One example → the normalised image a network sees: decoding, training augmentation (the
paper's scale and aspect crop, colour and lighting noise, CIFAR's pad-and-crop, flips, then
RandAugment / TrivialAugment-Wide and random erasing, `resnext_jax.autoaugment`) and
evaluation's resize and centre crop, all TensorFlow ops for tf.data. Pixels are float32 in
0..255 until normalised by (x - mean) / std. The input pipeline sends them to the devices
unnormalised in the smallest type that holds them to half a grey level (`feed_dtype`: uint8, a
quarter of float32's bytes, or bfloat16 where colour noise leaves 0..255) and the jitted steps
normalise them there (`resnext_jax.train.normalise`); `predict` normalises here. Importing this
module keeps TensorFlow off the accelerators, which belong to JAX."""
import tensorflow as tf
from absl import logging

from resnext_jax import autoaugment

try:  # TensorFlow only feeds the host; the accelerators belong to JAX.
    tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
    pass

AUGMENTS = ('imagenet', 'cifar', 'none')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')   # what `_decode` reads from files
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
NORMALISATION = {  # 0..255 units; the ImageNet statistics for every other dataset.
    'cifar10': ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'cifar100': ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    'mnist': ((33.3,) * 3, (78.6,) * 3),
    'digits': ((77.8,) * 3, (95.9,) * 3),  # measured on all 1797 images scaled to 0..255
}
# The config fields evaluation preprocessing reads (what a checkpoint's metadata records).
EVAL_FIELDS = ('dataset', 'image_size', 'eval_image_size', 'eval_resize', 'augment', 'mean',
               'std')
# PCA of ImageNet RGB pixels (0..1 units), for the official code's lighting noise.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


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
    return tuple(config.mean or mean), tuple(config.std or std)


def eval_size(config):
    """The side of the evaluation crop: `eval_image_size`, else `image_size`."""
    return config.eval_image_size or config.image_size


def eval_resize(config):
    """The shorter side that evaluation resizes to before its centre crop ('imagenet' augment):
    `eval_resize`, else the crop × 256/224 (the paper's 256 → 224), so changing the crop keeps
    the ratio."""
    return config.eval_resize or round(eval_size(config) * 256 / 224)


def eval_settings(config):
    """{field: value} of `EVAL_FIELDS`, resolved (what a checkpoint's metadata records)."""
    mean, std = normalisation(config)
    return {'dataset': config.dataset, 'image_size': config.image_size,
            'eval_image_size': eval_size(config), 'eval_resize': eval_resize(config),
            'augment': config.augment, 'mean': mean, 'std': std}


def as_trained(config, meta, weights):
    """`config` with the augment and normalisation that checkpoint metadata `meta` records (how
    the weights in `weights` learned to see images), for evaluating them (`eval_only`); the eval
    crop stays the config's, a test-time choice (e.g. the paper's 320 × 320 test)."""
    ours = dict(zip(('augment', 'mean', 'std'), (config.augment, *normalisation(config))))
    trained = {k: tuple(meta[k]) if k != 'augment' else meta[k] for k in ours if meta.get(k)}
    changed = {k: v for k, v in trained.items() if v != ours[k]}
    if not changed:
        return config
    logging.warning('evaluating %s as it was trained, with %s (the config says %s)', weights,
                    ', '.join(f'{k} {v}' for k, v in changed.items()),
                    ', '.join(f'{k} {ours[k]}' for k in changed))
    config = config.copy_and_resolve_references()
    config.update(changed)
    return config


def feed_dtype(config, train):
    """The type of the unnormalised pixels the input pipeline sends: uint8, or bfloat16 for
    training with colour jitter or PCA lighting, whose pixels may leave 0..255 (the official
    code does not clip them), or random erasing, whose fill (mean + std·N(0, 1)) leaves it.
    bfloat16's 8 significant bits hold 0..255 to half a grey level as rounding to uint8 does
    (one level from 256 to 512), at half of float32's bytes."""
    if not train:   # evaluation configs hold only EVAL_FIELDS (predict builds them)
        return 'uint8'
    leaves = config.color_jitter or config.pca_lighting or config.get('random_erase', 0.0)
    return 'bfloat16' if leaves else 'uint8'


def preprocess_fn(config, train, encoding, normalise=True):
    """f(data, seed) -> normalised float32 (S, S, 3), as the config's training (`train`) or
    evaluation preprocesses an example; seed is a stateless [2] seed (unused by evaluation).
    `normalise=False` returns the pixels before normalisation as the input pipeline feeds the
    devices, in `feed_dtype`: uint8 rounded to the nearest integer, or bfloat16.
    `encoding`: None for pixel arrays, 'file' for paths, 'bytes' for PNG/JPEG bytes. Evaluation
    reads only `EVAL_FIELDS`: `predict` builds them from a checkpoint's metadata, so images are
    fed to the weights as in training. Training then applies `auto_augment` to the whole-number
    pixels after the flip and, last, random erasing (`random_erase`), as timm orders them."""
    augment = config.augment
    if augment not in AUGMENTS:
        raise ValueError(f"augment '{augment}' is not one of {AUGMENTS}: fix --config.augment")
    size = config.image_size if train else eval_size(config)
    mean, std = (tf.constant(v, tf.float32) for v in normalisation(config))
    jitter, lighting, pad = ((config.color_jitter, config.pca_lighting, config.crop_padding)
                             if train else (0.0, 0.0, 0))
    pad = size // 8 if pad is None else pad
    resize = eval_resize(config) if augment == 'imagenet' and not train else None
    feed = feed_dtype(config, train)
    try:
        policy = autoaugment.parse(config.get('auto_augment', '')) if train else None
    except ValueError as e:
        raise ValueError(f'{e}: fix --config.auto_augment') from None
    erase = config.get('random_erase', 0.0) if train else 0.0
    fill = normalisation(config)[0]

    def preprocess(data, seed):
        crop_seed, flip_seed, colour_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3))
        if augment == 'imagenet' and train:
            image = tf.image.resize(_inception_crop(data, encoding, crop_seed), [size, size])
        elif augment == 'imagenet':
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
        image = tf.reshape(image, [size, size, 3])
        # Their seeds are folded in from `seed`, which nothing else uses but the split above.
        if policy is not None:
            image = autoaugment.augment(
                policy, image, tf.random.experimental.stateless_fold_in(seed, 1), fill)
        if erase:
            erase_seed = tf.random.experimental.stateless_fold_in(seed, 2)
        if normalise:
            image = (image - mean) / std
            return autoaugment.random_erase(image, erase_seed, erase) if erase else image
        if erase:  # in 0..255 units: normalised, the fill is N(0, 1) as timm's
            image = autoaugment.random_erase(image, erase_seed, erase, mean, std)
        if feed == 'bfloat16':
            return tf.cast(image, tf.bfloat16)
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)

    return preprocess
