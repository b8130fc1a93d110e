"""One example → the normalised image a network sees: decoding, training augmentation (the
paper's scale and aspect crop, colour and lighting noise, CIFAR's pad-and-crop, flips, then
RandAugment / TrivialAugment-Wide and random erasing, `resnext_jax.autoaugment`) and
evaluation's resize and centre crop, all TensorFlow ops for tf.data. Pixels are float32 in
0..255 until normalised by (x - mean) / std.

Where the per-pixel augmentation runs in the step (`image_settings.augment_place`: the
default 'auto' except for auto-augment on TPUs) training stops after the crop, resize and
flip: the rest (colour and lighting noise, RandAugment / TrivialAugment-Wide, random erasing)
runs on the accelerators (`resnext_jax.augment`), which doubles the images a host core feeds.
The input pipeline sends the pixels unnormalised in the smallest type that holds them to half a
grey level (`image_settings.feed_dtype`: uint8, a quarter of float32's bytes, or bfloat16
where the host's colour noise or erasing leaves 0..255) and the jitted steps normalise them
there (`resnext_jax.step.normalise`); `predict` normalises here. Importing this module keeps
TensorFlow off the accelerators, which belong to JAX."""
import tensorflow as tf

from resnext_jax import autoaugment, policies
from resnext_jax.image_settings import (AUGMENTS, PCA_EIGVAL, PCA_EIGVEC, eval_resize, eval_size,
                                        feed_dtype, normalisation, on_device)

try:  # TensorFlow only feeds the host; the accelerators belong to JAX.
    tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):
    pass


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


def _resize(image, size, method='bilinear'):
    """Resize to size × size (`method`: 'bilinear' or 'bicubic') unless the image already has
    that side."""
    if image.shape[0] is not None and image.shape[:2] == (size, size):
        return tf.cast(image, tf.float32)
    same = tf.reduce_all(tf.shape(image)[:2] == size)
    image = tf.cond(same, lambda: tf.cast(image, tf.float32),
                    lambda: tf.image.resize(image, [size, size], method))
    return tf.reshape(image, [size, size, 3])


def _centre_crop(image, size, resize, method='bilinear'):
    """Resize the shorter side to `resize` keeping the aspect (`method`: 'bilinear' or
    'bicubic'), then crop size × size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.cast(tf.round(shape * resize / tf.reduce_min(shape)), tf.int32)
    image = tf.image.resize(image, new, method)
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


def preprocess_fn(config, train, encoding, normalise=True):
    """f(data, seed) -> normalised float32 (S, S, 3), as the config's training (`train`) or
    evaluation preprocesses an example on the host; seed is a stateless [2] seed (unused by
    evaluation). `normalise=False` returns the pixels before normalisation as the input
    pipeline feeds the devices, in `feed_dtype`: uint8 rounded to the nearest integer, or
    bfloat16. Training a config that augments on the device (`image_settings.on_device`) stops
    after the crop, resize and flip: the rest is the step's (`resnext_jax.augment`).
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
    host = train and not on_device(config)   # the per-pixel training augmentation here
    if not host:
        jitter = lighting = 0.0
    pad = size // 8 if pad is None else pad
    resize = eval_resize(config) if augment == 'imagenet' and not train else None
    feed = feed_dtype(config, train)
    method = config.get('interpolation') or 'bilinear'   # of every resize
    try:
        policy = policies.parse(config.get('auto_augment', '')) if train else None
    except ValueError as e:
        raise ValueError(f'{e}: fix --config.auto_augment') from None
    erase = config.get('random_erase', 0.0) if host else 0.0
    policy = policy if host else None
    fill = normalisation(config)[0]

    def preprocess(data, seed):
        crop_seed, flip_seed, colour_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3))
        if augment == 'imagenet' and train:
            image = tf.image.resize(_inception_crop(data, encoding, crop_seed), [size, size],
                                    method)
        elif augment == 'imagenet':
            image = _centre_crop(_decode(data, encoding), size, resize, method)
        else:
            image = _resize(_decode(data, encoding), size, method)
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
