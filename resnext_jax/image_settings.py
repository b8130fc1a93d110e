"""What a config says about the images a network sees, readable without TensorFlow: the
normalisation statistics, the evaluation sizes, the settings that travel with the weights
(`eval_settings`, `as_trained`), where the per-pixel training augmentation runs (`augment_on`)
and the type of the pixels that cross from the host to the accelerators (`feed_dtype`).

The host's TensorFlow pipeline (`resnext_jax.preprocess`), the device's augmentation
(`resnext_jax.augment`), the jitted steps (`resnext_jax.step`) and the tools all read them here.
"""
from absl import logging

AUGMENTS = ('imagenet', 'cifar', 'none')
# Where the per-pixel training augmentation runs (`augment_on`): in the jitted step on the
# accelerators (`resnext_jax.augment`), per image in the host's input pipeline, or 'auto'
# (`augment_place`).
AUGMENT_ON = ('auto', 'device', 'host')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')   # what `preprocess` decodes from files
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
NORMALISATION = {  # 0..255 units; the ImageNet statistics for every other dataset.
    'cifar10': ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'cifar100': ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    'mnist': ((33.3,) * 3, (78.6,) * 3),
    'digits': ((77.8,) * 3, (95.9,) * 3),  # measured on all 1797 images scaled to 0..255
}
# The config fields evaluation preprocessing reads (what a checkpoint's metadata records).
EVAL_FIELDS = ('dataset', 'image_size', 'eval_image_size', 'eval_resize', 'interpolation',
               'augment', 'mean', 'std')
INTERPOLATIONS = ('bilinear', 'bicubic')   # of the input pipeline's resizes
# PCA of ImageNet RGB pixels (0..1 units), for the official code's lighting noise.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


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
            'interpolation': config.get('interpolation') or 'bilinear',
            'augment': config.augment, 'mean': mean, 'std': std}


def eval_config(meta):
    """The config fields evaluation preprocessing reads (`EVAL_FIELDS`), from a checkpoint's
    or an exported file's metadata; what it lacks (converted weights record only the model) is
    ImageNet's, as configs/default.py has it (eval size and statistics then follow from the
    dataset and image size)."""
    import ml_collections   # noqa: PLC0415
    imagenet = {'dataset': 'imagenet2012', 'image_size': 224, 'augment': 'imagenet',
                'interpolation': 'bilinear'}
    return ml_collections.ConfigDict({k: meta.get(k) or imagenet.get(k) for k in EVAL_FIELDS})


def as_trained(config, meta, weights):
    """`config` with the augment, interpolation and normalisation that checkpoint metadata
    `meta` records (how the weights in `weights` learned to see images), for evaluating them
    (`eval_only`); the eval crop stays the config's, a test-time choice (e.g. the paper's
    320 × 320 test)."""
    ours = dict(zip(('augment', 'interpolation', 'mean', 'std'),
                    (config.augment, config.get('interpolation') or 'bilinear',
                     *normalisation(config))))
    trained = {k: tuple(meta[k]) if k in ('mean', 'std') else meta[k] for k in ours
               if meta.get(k)}
    changed = {k: v for k, v in trained.items() if v != ours[k]}
    if not changed:
        return config
    logging.warning('evaluating %s as it was trained, with %s (the config says %s)', weights,
                    ', '.join(f'{k} {v}' for k, v in changed.items()),
                    ', '.join(f'{k} {ours[k]}' for k in changed))
    config = config.copy_and_resolve_references()
    config.update(changed)
    return config


def per_pixel(config):
    """Whether `config` trains with per-pixel augmentation after the crop and flip: colour
    jitter, PCA lighting, `auto_augment` or random erasing."""
    return bool(config.get('color_jitter', 0.0) or config.get('pca_lighting', 0.0)
                or config.get('auto_augment', '') or config.get('random_erase', 0.0))


def augment_place(config, backend=None):
    """'device' or 'host': where the per-pixel training augmentation of `config` runs, as its
    `augment_on` says. 'auto' (the default) is 'device', except on TPUs for a recipe with
    `auto_augment`: there its per-image table look-ups and affine warps are gathers, which
    the TPU compiler prices at tens of times the rest of the step's memory traffic (docs/pods.md),
    so they stay on the host (a TPU host has 28 or more cores per chip). `backend`: the
    platform the step runs on (default: JAX's default backend, asked only then)."""
    where = config.get('augment_on', 'auto')
    if where != 'auto':
        return where
    if not config.get('auto_augment', ''):
        return 'device'
    if backend is None:
        import jax   # noqa: PLC0415 (the backend, only when 'auto' needs it)
        backend = jax.default_backend()
    return 'host' if backend == 'tpu' else 'device'


def on_device(config, backend=None):
    """Whether the per-pixel training augmentation of `config` (if any) runs on the
    accelerators, in the jitted step, rather than on the host (`augment_place`)."""
    return augment_place(config, backend) == 'device'


def feed_dtype(config, train):
    """The type of the unnormalised pixels the input pipeline sends: uint8, or, when the host
    augments per pixel (`augment_on='host'`), bfloat16 for training with colour jitter or PCA
    lighting, whose pixels may leave 0..255 (the official code does not clip them), or random
    erasing, whose fill (mean + std·N(0, 1)) leaves it. bfloat16's 8 significant bits hold
    0..255 to half a grey level as rounding to uint8 does (one level from 256 to 512), at half
    of float32's bytes. With device augmentation the host sends the flipped crop, uint8."""
    if not train or on_device(config):   # evaluation configs hold only EVAL_FIELDS
        return 'uint8'
    leaves = config.color_jitter or config.pca_lighting or config.get('random_erase', 0.0)
    return 'bfloat16' if leaves else 'uint8'
