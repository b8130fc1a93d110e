"""Top-5 classes of images under a checkpoint: python -m resnext_jax.predict.

    python -m resnext_jax.predict --checkpoint ckpt/ cat.jpg dog.png
    python -m resnext_jax.predict --checkpoint runs/r50 --model resnet50 photo.jpg

Each image is preprocessed as the checkpoint's evaluation was (`preprocess.preprocess_fn`, from
the image size, eval crop and resize, augment family and normalisation its metadata records): for
ImageNet weights and converted ones the shorter side resized to 256, the centre 224×224
cropped and the ImageNet mean and std; for a CIFAR or digits run its own size and statistics.
The checkpoint is a directory from `python -m resnext_jax.convert`, a training workdir or a
weights file (an exported .safetensors / .npz records the same metadata); the model name and
options default to the ones it records. Weights that record no preprocessing (converted
torchvision files) get ImageNet's, with a one-line warning; `--preprocessing NAME` (one of
`PREPROCESSING`) and `--image-size N` choose another. The recorded class names are printed, else
ImageNet's for a 1000-class head (shipped with tensorflow_datasets, read offline), else indices.
"""
import os
import sys

import jax
import numpy as np

from resnext_jax import cli, convert, export, runtime
from resnext_jax.pretrained import imagenet_class_names

import tensorflow as tf   # after cli: quiet (cli's doc)

from resnext_jax import image_settings, preprocess


# --preprocessing: how the recipes in configs/ evaluate (mean and std follow the dataset).
PREPROCESSING = {
    'imagenet': {'dataset': 'imagenet2012', 'image_size': 224, 'augment': 'imagenet'},
    'cifar10': {'dataset': 'cifar10', 'image_size': 32, 'augment': 'cifar'},
    'cifar100': {'dataset': 'cifar100', 'image_size': 32, 'augment': 'cifar'},
    'digits': {'dataset': 'digits', 'image_size': 16, 'augment': 'none'},   # the quick start
}
RECORDED = ('augment', 'mean', 'std')   # what metadata that records its preprocessing has


def with_preprocessing(meta, preprocessing=None, image_size=None):
    """`meta` with the evaluation fields of the `PREPROCESSING` preset named `preprocessing`
    instead of the recorded ones, and with crop side `image_size` (its resize following)."""
    meta = dict(meta)
    if preprocessing:
        if preprocessing not in PREPROCESSING:
            raise ValueError(f'unknown preprocessing {preprocessing!r}: use one of '
                             f'{", ".join(PREPROCESSING)}')
        meta = {k: v for k, v in meta.items() if k not in image_settings.EVAL_FIELDS}
        meta.update(PREPROCESSING[preprocessing])
    if image_size is not None:
        meta.update(image_size=image_size, eval_image_size=image_size, eval_resize=None)
    return meta


def load_image(path, meta=None, normalise=True):
    """An image file as the model's input, (S, S, 3) float32, preprocessed as the evaluation of
    the checkpoint whose metadata is `meta` was (default: ImageNet's); with `normalise=False`
    the uint8 pixels before normalisation (an exported model normalises inside)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: pass image files (JPEG, PNG, GIF, BMP)')
    transform = preprocess.preprocess_fn(image_settings.eval_config(meta or {}), train=False,
                                         encoding='file', normalise=normalise)
    try:
        with runtime.native_stderr_silenced():   # libjpeg's own line for a broken file
            return transform(tf.constant(path), tf.zeros([2], tf.int64)).numpy()
    except tf.errors.OpError:
        raise ValueError(f'{path} is not an image that TensorFlow can decode') from None


def predict(checkpoint, images, model=None, model_options=None, top=5, preprocessing=None,
            image_size=None, ema=False):
    """[(path, [(probability, label), ...]), ...] with the `top` most probable classes, the
    images preprocessed as recorded, or as `with_preprocessing` says. Weights that record no
    preprocessing and get no `preprocessing` get ImageNet's, with a warning on stderr.
    `ema`: the EMA weights of a workdir trained with `ema_decay`. `checkpoint` may also be a
    model `python -m resnext_jax.export` wrote, run in its own runtime and fed as its metadata
    says."""
    fmt = export.exported_format(checkpoint)
    if fmt:
        if model or model_options or preprocessing or image_size or ema:
            raise ValueError(f'{checkpoint} is an exported model: its network, weights and '
                             'preprocessing are fixed in it; leave out --model, '
                             '--model-options, --preprocessing, --image-size and --ema')
        return predict_exported(fmt, checkpoint, images, top)
    net, variables, meta = convert.load_model(checkpoint, model, model_options, ema)
    meta = with_preprocessing(meta, preprocessing, image_size)
    # Forward only: the grouped form runs as fast as any here and compiles fastest (ResNeXt-50
    # on CPU: 2 s, against 14 s for 'sliced', the training choice of form='auto').
    net, num_classes = net.clone(form='grouped'), net.num_classes
    batch = np.stack([load_image(path, meta) for path in images])
    if not preprocessing and not all(meta.get(k) for k in RECORDED):
        config = image_settings.eval_config(meta)
        size = image_settings.eval_size(config)
        print(f'warning: {checkpoint} records no preprocessing, so images get ImageNet\'s '
              f'(shorter side to {image_settings.eval_resize(config)}, centre {size}×{size} crop, '
              f'ImageNet mean and std): pass --preprocessing {"|".join(PREPROCESSING)} if it '
              'was trained otherwise', file=sys.stderr)
    probs = np.asarray(jax.nn.softmax(jax.jit(net.apply)(variables, batch)))
    names = meta.get('class_names')
    if not names or len(names) != num_classes:
        names = imagenet_class_names() if num_classes == 1000 else None
    results = []
    for path, p in zip(images, probs):
        best = np.argsort(-p)[:top]
        results.append((path, [(float(p[i]), names[i] if names else str(i)) for i in best]))
    return results


def predict_exported(fmt, path, images, top=5):
    """`predict` with a model `export` wrote, in its runtime (`export.runner`)."""
    meta = export.read_metadata(fmt, path)
    batch = np.stack([load_image(p, meta, normalise=not meta['input']['normalised_inside'])
                      for p in images])
    run, fixed = export.runner(fmt, path), meta['input']['shape'][0]
    step = fixed or len(batch)
    outputs = []
    for i in range(0, len(batch), step):   # a fixed batch: whole batches, the last padded
        part = batch[i:i + step]
        padded = np.concatenate([part, np.zeros((step - len(part), *part.shape[1:]),
                                                part.dtype)])
        outputs.append(run(padded)[:len(part)])
    outputs = np.concatenate(outputs)
    probs = (outputs if meta['output']['name'] == 'probabilities'
             else np.asarray(jax.nn.softmax(outputs, -1)))
    names = meta.get('class_names')
    if not names or len(names) != meta['num_classes']:
        names = imagenet_class_names() if meta['num_classes'] == 1000 else None
    return [(p, [(float(q[i]), names[i] if names else str(i)) for i in np.argsort(-q)[:top]])
            for p, q in zip(images, probs)]


def main(argv=None):
    parser = cli.ArgumentParser(prog='python -m resnext_jax.predict',
                                description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+', metavar='IMAGE')
    parser.add_argument('--checkpoint', required=True,
                        help='a converted checkpoint, a workdir, a weights file or a model '
                        'python -m resnext_jax.export wrote')
    parser.add_argument('--model', help="network name (default: the checkpoint's)")
    parser.add_argument('--model-options', type=convert.json_object, metavar='JSON',
                        help="other ResNeXt fields (default: the checkpoint's)")
    parser.add_argument('--preprocessing', choices=PREPROCESSING,
                        help="feed the images as this recipe's evaluation does (default: as "
                        "the checkpoint records; ImageNet's if it records none)")
    parser.add_argument('--image-size', type=cli.integer(1), metavar='N',
                        help="side of the image fed to the model (default: the checkpoint's "
                        "or the preprocessing's)")
    parser.add_argument('--ema', action='store_true',
                        help='use the EMA weights of a workdir trained with --config.ema_decay')
    args = parser.parse_args(argv)
    try:
        results = predict(args.checkpoint, args.images, args.model, args.model_options,
                          preprocessing=args.preprocessing, image_size=args.image_size,
                          ema=args.ema)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f'error: {e}'.splitlines()[0], file=sys.stderr)
        return 1
    for path, top in results:
        print(f'{path}:')
        for probability, label in top:
            print(f'  {probability:7.2%}  {label}')
    return 0


if __name__ == '__main__':
    runtime.prepare_process()
    sys.exit(main())
