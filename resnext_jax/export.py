"""Serve what you trained: a workdir, checkpoint or weights file → a model file another runtime
runs, its preprocessing inside, its metadata beside it, checked against JAX in that runtime.

    python -m resnext_jax.export WORKDIR --format onnx --out model.onnx
    python -m resnext_jax.export WORKDIR --format stablehlo --out model.jax_exported [--batch 8]
    python -m resnext_jax.export weights.safetensors --format savedmodel --out model_dir [--raw]

SRC is what `predict` and `convert` read: a training workdir (`--ema`: its EMA weights), a
directory `convert` wrote, or a .safetensors / .npz / .pth weights file. The exported function
is the network in evaluation mode (batch norm with its running statistics), in float32:

    images  uint8 (N, S, S, 3), NHWC, RGB, already resized and centre-cropped to the evaluation
            size S as the metadata says; normalised inside ((x − mean) / std)
            (--raw: float32 images already normalised, the network alone)
    →       logits float32 (N, K) (--output probabilities: their softmax)

N is dynamic (shape-polymorphic) unless `--batch N` fixes it. Formats:

  stablehlo   `jax.export`: serialized StableHLO that JAX (`jax.export.deserialize`) or any
              XLA program loads without this package; the metadata in OUT.json beside it
  onnx        an ONNX graph written here from the parameters (opset 17): the aggregated 3×3 is
              one `Conv` with `group` = C, batch norm `BatchNormalization` (runtimes fold it);
              the metadata in the model's `metadata_props` ('resnext_jax': JSON). Needs the
              `serve` extra (onnx; onnxruntime to check it)
  savedmodel  `jax2tf` (native serialization) in a TensorFlow SavedModel directory: signature
              'serving_default' (input 'images', output 'logits' or 'probabilities'); the
              metadata in assets/resnext_jax.json

The metadata holds the network, its classes and their names, and how to feed it images: input
type, shape and layout, the resize and crop rule, mean and std (`predict`'s evaluation fields).
The XLA formats run the aggregated 3×3 as XLA's grouped convolution, whatever form trained it
(the parameters are the same in every form). After writing, the file is loaded in its runtime
and run on random images beside JAX (two batch sizes when the batch is dynamic): the command
prints the largest logit difference and whether every top-1 agrees (`--no-check` skips it).
OUT is written atomically and not replaced unless `--force`.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from resnext_jax import cli, convert

FORMATS = ('stablehlo', 'onnx', 'savedmodel')
OUTPUTS = ('logits', 'probabilities')
ONNX_OPSET = 17
META_KEY = convert.META_KEY    # 'resnext_jax', as in exported weights files
CHECK_BATCHES = (1, 3)         # the batch sizes a dynamic export is checked at


def _optional(module, fmt):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = "pip install -e '.[serve]'" if module.startswith('onnx') else (
            'pip install tensorflow-cpu')
        raise ValueError(f'--format {fmt} needs the {module} package: {extra}') from None


# ------------------------------------------------------------------------------ what is exported

def settings(meta, batch, raw, output):
    """The metadata that travels with an exported model (JSON-able): `meta`'s network, classes
    and evaluation fields, and the input and output of the exported function."""
    from resnext_jax import image_settings
    config = image_settings.eval_config(meta)
    size = image_settings.eval_size(config)
    mean, std = image_settings.normalisation(config)
    resize = image_settings.eval_resize(config) if config.augment == 'imagenet' else None
    interpolation = config.interpolation
    names = meta.get('class_names')
    if not names and meta['num_classes'] == 1000 and config.dataset == 'imagenet2012':
        from resnext_jax.pretrained import imagenet_class_names   # noqa: PLC0415
        names = imagenet_class_names()   # ImageNet weights: its names, as predict prints
    return {
        'producer': 'resnext_jax', 'model': meta['model'],
        'model_options': meta.get('model_options') or {}, 'num_classes': meta['num_classes'],
        **({'class_names': list(names)} if names else {}),
        **{k: (list(v) if isinstance(v, tuple) else v)
           for k, v in image_settings.eval_settings(config).items()},
        'input': {'name': 'images', 'dtype': 'float32' if raw else 'uint8',
                  'shape': [batch, size, size, 3], 'layout': 'NHWC', 'channels': 'RGB',
                  'normalised_inside': not raw},
        'preprocessing': {
            'resize_shorter_side_to': resize, 'resize': interpolation, 'centre_crop': size,
            'mean': list(mean), 'std': list(std),
            'rule': (f'resize the shorter side to {resize} ({interpolation}), crop the centre '
                     f'{size}×{size}' if resize else f'resize to {size}×{size} ({interpolation})')
            + (', then (x − mean) / std: done by the caller (--raw)' if raw else
               ', then feed the uint8 pixels: (x − mean) / std is inside')},
        'output': {'name': output, 'dtype': 'float32', 'shape': [batch, meta['num_classes']]},
    }


def serving_function(model, variables, meta, raw=False, output='logits'):
    """f(images) → logits or probabilities: the exported computation, in JAX."""
    import jax
    import jax.numpy as jnp
    from resnext_jax import image_settings
    mean, std = (jnp.asarray(v, jnp.float32) for v in image_settings.normalisation(
        image_settings.eval_config(meta)))

    def f(images):
        x = images.astype(jnp.float32)
        if not raw:
            x = (x - mean) / std
        logits = model.apply(variables, x, train=False)
        return jax.nn.softmax(logits, -1) if output == 'probabilities' else logits
    return f


def input_spec(meta, batch, raw):
    """The ShapeDtypeStruct of the exported function's input; a symbolic batch when `batch` is
    None."""
    import jax
    import jax.numpy as jnp
    from resnext_jax import image_settings
    size = image_settings.eval_size(image_settings.eval_config(meta))
    n = jax.export.symbolic_shape('batch')[0] if batch is None else batch
    return jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32 if raw else jnp.uint8)


def load(src, model=None, model_options=None, ema=False):
    """(model in the 'grouped' form, float32; variables; metadata) of what SRC holds."""
    from resnext_jax.models import create_model
    net, variables, meta = convert.load_model(src, model, model_options, ema=ema)
    options = {k: v for k, v in convert._model_options(meta.get('model_options')).items()
               if k not in ('form', 'dtype')}
    net = create_model(meta['model'], num_classes=net.num_classes, form='grouped', **options)
    return net, variables, meta


# ------------------------------------------------------------------------------ the formats

def to_stablehlo(f, spec):
    """Serialized `jax.export` of `f` at `spec`."""
    import jax
    return jax.export.export(jax.jit(f))(spec).serialize()


def to_savedmodel(f, spec, metadata, directory):
    """A SavedModel of `f` (jax2tf, native serialization) in `directory`."""
    tf = _optional('tensorflow', 'savedmodel')
    from jax.experimental import jax2tf
    batch = spec.shape[0] if isinstance(spec.shape[0], int) else None
    converted = jax2tf.convert(
        f, with_gradient=False,
        polymorphic_shapes=None if batch else [f'(batch, {", ".join(map(str, spec.shape[1:]))})'])
    module = tf.Module()
    dtype = tf.uint8 if spec.dtype == np.uint8 else tf.float32
    name = metadata['output']['name']
    module.serve = tf.function(lambda images: {name: converted(images)}, autograph=False,
                               input_signature=[tf.TensorSpec([batch, *spec.shape[1:]], dtype,
                                                              name='images')])
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, f'{META_KEY}.json')
        with open(path, 'w') as file:
            json.dump(metadata, file, indent=1)
        module.metadata = tf.saved_model.Asset(path)
        absl = logging.getLogger('absl')
        level = absl.level   # tf.saved_model.save sets it to WARNING: a caller's logs would go
        try:
            tf.saved_model.save(module, directory, signatures={'serving_default': module.serve})
        finally:
            absl.setLevel(level)


def to_onnx(model, variables, metadata, batch, raw, output):
    """The ONNX ModelProto of the network, written node by node from its parameters."""
    onnx = _optional('onnx', 'onnx')
    from onnx import TensorProto, helper, numpy_helper
    params, stats = variables['params'], variables.get('batch_stats', {})
    nodes, initializers, names = [], [], {}

    def fresh(stem):
        names[stem] = names.get(stem, 0) + 1
        return f'{stem}_{names[stem]}'

    def node(op, inputs, **attributes):
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(x, kernel, name, strides=1, groups=1):
        k = np.asarray(kernel, np.float32).transpose(3, 2, 0, 1)   # HWIO → OIHW
        pad = k.shape[-1] // 2
        return node('Conv', [x, constant(f'{name}.weight', k)], strides=[strides] * 2,
                    pads=[pad] * 4, kernel_shape=list(k.shape[2:]), group=groups)

    def bn(x, p, s, name):
        return node('BatchNormalization', [
            x, constant(f'{name}.scale', p['scale']), constant(f'{name}.bias', p['bias']),
            constant(f'{name}.mean', s['mean']), constant(f'{name}.var', s['var'])],
            epsilon=float(model.bn_epsilon))

    def relu(x):
        return node('Relu', [x])

    size = metadata['input']['shape'][1]
    shape = [batch if batch else 'batch', size, size, 3]
    images = helper.make_tensor_value_info(
        'images', TensorProto.FLOAT if raw else TensorProto.UINT8, shape)
    x = 'images'
    if not raw:
        prep = metadata['preprocessing']
        x = node('Cast', [x], to=TensorProto.FLOAT)
        x = node('Sub', [x, constant('mean', np.reshape(prep['mean'], (1, 1, 1, 3)))])
        x = node('Div', [x, constant('std', np.reshape(prep['std'], (1, 1, 1, 3)))])
    x = node('Transpose', [x], perm=[0, 3, 1, 2])                    # NHWC → NCHW
    stem = model.stem == 'imagenet'
    x = relu(bn(conv(x, params['stem']['conv']['kernel'], 'stem.conv', 2 if stem else 1),
                params['stem']['bn'], stats['stem']['bn'], 'stem.bn'))
    if stem:
        x = node('MaxPool', [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for s, blocks in enumerate(model.stage_sizes):
        for b in range(blocks):
            name = f'stage{s + 1}/block{b + 1}'
            p = params[f'stage{s + 1}'][f'block{b + 1}']
            st = stats[f'stage{s + 1}'][f'block{b + 1}']
            strides = 2 if s and not b else 1
            shortcut = x
            if 'proj_conv' in p:
                shortcut = bn(conv(x, p['proj_conv']['kernel'], f'{name}/proj_conv', strides),
                              p['proj_bn'], st['proj_bn'], f'{name}/proj_bn')
            a, sa = p['aggregated'], st['aggregated']
            h = relu(bn(conv(x, a['conv1']['kernel'], f'{name}/conv1'), a['bn1'], sa['bn1'],
                        f'{name}/bn1'))
            h = relu(bn(conv(h, a['conv2']['kernel'], f'{name}/conv2', strides,
                             model.cardinality), a['bn2'], sa['bn2'], f'{name}/bn2'))
            h = bn(conv(h, a['conv3']['kernel'], f'{name}/conv3'), a['bn3'], sa['bn3'],
                   f'{name}/bn3')
            x = relu(node('Add', [shortcut, h]))
    x = node('Flatten', [node('GlobalAveragePool', [x])])
    if model.num_classes:
        x = node('Gemm', [x, constant('head.kernel', params['head']['kernel']),
                          constant('head.bias', params['head']['bias'])])
        if metadata['output']['name'] == 'probabilities':
            x = node('Softmax', [x], axis=-1)
    nodes.append(helper.make_node('Identity', [x], [metadata['output']['name']]))
    out = helper.make_tensor_value_info(metadata['output']['name'], TensorProto.FLOAT,
                                        [shape[0], model.num_classes or None])
    graph = helper.make_graph(nodes, metadata['model'], [images], [out], initializers)
    proto = helper.make_model(graph, producer_name='resnext_jax',
                              opset_imports=[helper.make_opsetid('', ONNX_OPSET)])
    proto.ir_version = 8   # what opset 17 needs; onnxruntime reads it
    helper.set_model_props(proto, {META_KEY: json.dumps(metadata)})
    onnx.checker.check_model(proto)
    return proto


# ------------------------------------------------------------------------------ loading them back

def runner(fmt, path):
    """f(images: numpy) → numpy outputs, running the file `path` in its own runtime:
    `jax.export.deserialize`, onnxruntime (CPU), `tf.saved_model.load`."""
    if fmt == 'stablehlo':
        import jax
        with open(path, 'rb') as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        return lambda x: np.asarray(exported.call(x))
    if fmt == 'onnx':
        ort = _optional('onnxruntime', 'onnx')
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        return lambda x: session.run(None, {'images': x})[0]
    tf = _optional('tensorflow', 'savedmodel')
    serve = tf.saved_model.load(path).signatures['serving_default']
    return lambda x: next(iter(serve(images=tf.constant(x)).values())).numpy()


def exported_format(path):
    """The format of a model this module wrote at `path` (a SavedModel directory, an .onnx file,
    a StableHLO file with its .json beside it), or None for anything else."""
    if os.path.isdir(path):
        return 'savedmodel' if os.path.isfile(os.path.join(path, 'saved_model.pb')) else None
    if path.endswith('.onnx') and os.path.isfile(path):
        return 'onnx'
    try:
        with open(f'{path}.json') as f:
            return 'stablehlo' if json.load(f).get('producer') == 'resnext_jax' else None
    except (OSError, ValueError, AttributeError):
        return None


def read_metadata(fmt, path):
    """The metadata an exported model carries, as `settings` wrote it."""
    if fmt == 'stablehlo':
        with open(f'{path}.json') as f:
            return json.load(f)
    if fmt == 'onnx':
        onnx = _optional('onnx', 'onnx')
        props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        return json.loads(props[META_KEY])
    with open(os.path.join(path, 'assets', f'{META_KEY}.json')) as f:
        return json.load(f)


def check(fmt, path, f, spec, seed=0):
    """Runs the exported file in its runtime and `f` in JAX on the same random images, at
    CHECK_BATCHES when the batch is dynamic: {batch: (largest |difference|, top-1 agree)}."""
    import jax
    run = runner(fmt, path)
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    rng = np.random.default_rng(seed)
    result = {}
    for n in ([fixed] if fixed else CHECK_BATCHES):
        shape = (n, *spec.shape[1:])
        x = (rng.normal(size=shape).astype(np.float32) if spec.dtype == np.float32
             else rng.integers(0, 256, shape).astype(np.uint8))
        ours, theirs = np.asarray(jax.jit(f)(x)), run(x)
        result[n] = (float(np.abs(ours - theirs).max()),
                     bool((ours.argmax(-1) == theirs.argmax(-1)).all()))
    return result


# ------------------------------------------------------------------------------ the command

def export(src, fmt, out, *, batch=None, raw=False, output='logits', ema=False, force=False,
           model=None, model_options=None, verify=True):
    """Writes SRC's network as `fmt` to `out` (see the module doc); returns a report dict:
    'seconds' (export), 'bytes', and 'check' ({batch: (max |diff|, top-1 agree)}) if verified."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}: use one of {", ".join(FORMATS)}')
    if output not in OUTPUTS:
        raise ValueError(f'unknown output {output!r}: use one of {", ".join(OUTPUTS)}')
    if os.path.lexists(out) and not force:
        raise ValueError(f'{out} exists: pass --force to replace it, or choose another --out')
    if fmt == 'onnx':
        _optional('onnx', fmt)
    net, variables, meta = load(src, model, model_options, ema)
    if fmt == 'onnx' and not net.num_classes:
        raise ValueError(f'{src} has no classifier head (num_classes 0): export a network with '
                         'one')
    metadata = settings(meta, batch, raw, output if net.num_classes else 'features')
    f = serving_function(net, variables, meta, raw, output)
    spec = input_spec(meta, batch, raw)
    t = time.perf_counter()
    if fmt == 'stablehlo':
        data = to_stablehlo(f, spec)
        convert.write_atomically(out, lambda file: file.write(data))
        convert.write_atomically(f'{out}.json', lambda file: file.write(
            json.dumps(metadata, indent=1).encode()))
    elif fmt == 'onnx':
        data = to_onnx(net, variables, metadata, batch, raw, output).SerializeToString()
        convert.write_atomically(out, lambda file: file.write(data))
    else:
        _write_directory(out, lambda directory: to_savedmodel(f, spec, metadata, directory))
    seconds = time.perf_counter() - t
    report = {'format': fmt, 'out': out, 'seconds': seconds, 'bytes': _size(out),
              'metadata': metadata}
    if verify:
        report['check'] = check(fmt, out, f, spec)
    return report


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(path) for name in files)


def _write_directory(out, write):
    """`write(directory)` into a temporary directory beside `out`, renamed to `out` once
    complete (an existing `out` replaced only then); OSError in one line otherwise."""
    parent = os.path.dirname(os.path.abspath(out)) or '.'
    try:
        os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', dir=parent)
    except OSError as e:
        raise OSError(f'cannot write {out} ({e.strerror or e}): choose a writable --out') from None
    try:
        write(os.path.join(scratch, 'model'))
        if os.path.lexists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(os.path.join(scratch, 'model'), out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def batch_size(text):
    """--batch: 'dynamic' (None) or an integer ≥ 1."""
    return None if text == 'dynamic' else cli.integer(1)(text)


def main(argv=None):
    parser = cli.ArgumentParser(prog='python -m resnext_jax.export',
                                description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
    parser.add_argument('src', metavar='SRC',
                        help='a training workdir, a checkpoint directory or a weights file')
    parser.add_argument('--format', required=True, metavar='FORMAT',
                        help=f'one of {", ".join(FORMATS)}')
    parser.add_argument('--out', required=True, help='the file (directory for savedmodel)')
    parser.add_argument('--batch', type=batch_size, default=None, metavar='N',
                        help="images per call: 'dynamic' (default) or a fixed N")
    parser.add_argument('--output', default='logits', metavar='WHAT',
                        help='logits (default) or probabilities')
    parser.add_argument('--raw', action='store_true',
                        help='the network alone, on normalised float32 images')
    parser.add_argument('--ema', action='store_true',
                        help='the EMA weights of a workdir trained with --config.ema_decay')
    parser.add_argument('--force', action='store_true', help='replace an existing --out')
    parser.add_argument('--model', help="network name (default: the one SRC records)")
    parser.add_argument('--model-options', type=convert.json_object, metavar='JSON',
                        help="other ResNeXt fields (default: SRC's)")
    parser.add_argument('--no-check', action='store_true',
                        help='do not load the file back in its runtime and compare with JAX')
    args = parser.parse_args(argv)
    try:
        report = export(args.src, args.format, args.out, batch=args.batch, raw=args.raw,
                        output=args.output, ema=args.ema, force=args.force, model=args.model,
                        model_options=args.model_options, verify=not args.no_check)
    except (ValueError, TypeError, OSError) as e:
        print(f'error: {e}'.splitlines()[0], file=sys.stderr)
        return 1
    meta = report['metadata']
    shape = ['N' if d is None else d for d in meta['input']['shape']]
    print(f"wrote {args.out}: {meta['model']}, {meta['input']['dtype']} "
          f"{'×'.join(map(str, shape))} → {meta['output']['name']}; "
          f"{report['bytes'] / 1e6:.1f} MB in {report['seconds']:.1f} s")
    for n, (diff, same) in report.get('check', {}).items():
        print(f"  checked in its runtime at batch {n}: max |difference| from JAX {diff:.2e}, "
              f"top-1 {'the same' if same else 'DIFFERENT'}")
    return 0 if all(same for _, same in report.get('check', {}).values()) else 1


if __name__ == '__main__':
    from resnext_jax import runtime
    runtime.prepare_process()
    sys.exit(main())
