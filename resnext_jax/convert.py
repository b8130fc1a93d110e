"""Pretrained weights in and out: torchvision / timm ResNet and ResNeXt state dicts ↔ Flax.

torchvision's `ResNet` and timm's `resnet.py` use the same state-dict keys; they map onto our
variables like this (`torch_name` is that one mapping, used in both directions):

    conv1 / bn1                      stem/conv / stem/bn
    layer{s}.{b}.conv{k} / .bn{k}    stage{s}/block{b+1}/aggregated/conv{k} / bn{k}
    layer{s}.{b}.downsample.0 / .1   stage{s}/block{b+1}/proj_conv / proj_bn
    fc                               head
    conv .weight  (O, I/C, kh, kw)   .../kernel  (kh, kw, I/C, O)   HWIO; grouped conv2 too
    fc .weight    (classes, in)      head/kernel (in, classes)
    bn .weight / .bias               params .../scale / .../bias
    bn .running_mean / _var          batch_stats .../mean / .../var
    bn .num_batches_tracked          dropped on the way in, written as int64 zeros on the way out

The expected keys and shapes come from the abstract variable tree of the model
(`jax.eval_shape(model.init, ...)`), so every network and any C×d converts; a state dict that
does not fit raises a one-line ValueError naming the key and both shapes.

    python -m resnext_jax.convert --model resnext50_32x4d resnext50_32x4d.pth ckpt/
    python -m resnext_jax.convert ckpt/ resnext50_32x4d.safetensors

A file (.pth/.pt via `torch.load(weights_only=True)`, .safetensors, .npz) becomes an orbax
checkpoint directory laid out like a training workdir (`ckpt/checkpoints/0`, read by
`resnext_jax.checkpoint.load_checkpoint` and `--config.init_from`); a checkpoint directory or a
training workdir becomes a file that torchvision's `ResNet.load_state_dict(strict=True)` takes.

Exported .safetensors and .npz files also record what the checkpoint knew (`FILE_META`: model
name and options, classes, preprocessing) as one JSON string: the safetensors metadata entry
'resnext_jax', or the .npz entry 'resnext_jax' (a 0-d string array; no pickles). Reading such a
file restores it (`--model` and `--model-options` then default to the recorded ones); files
without it still load. Files are written atomically (a temporary file renamed), honouring the
umask.
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import pickle
import re
import secrets
import sys
import zipfile

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax import checkpoint, cli, pretrained
from resnext_jax.image_settings import EVAL_FIELDS
from resnext_jax.models import create_model

STATE_DICT_FILES = ('.pth', '.pt', '.safetensors', '.npz')
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
_MODULES = {'stem/conv': 'conv1', 'stem/bn': 'bn1', 'head': 'fc', 'proj_conv': 'downsample.0',
            'proj_bn': 'downsample.1'}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}   # HWIO → OIHW, (in, out) → (out, in)
META_KEY = 'resnext_jax'   # the metadata entry of exported .safetensors and .npz files
# What an exported file records: the model, its classes and its evaluation preprocessing.
FILE_META = ('model', 'model_options', 'num_classes', 'class_names', *EVAL_FIELDS)


# ------------------------------------------------------------------------------ the mapping

def torch_name(path):
    """The torch key of a Flax variable path, e.g. 'stage2/block1/aggregated/conv2/kernel' →
    'layer2.0.conv2.weight' (params and batch_stats alike)."""
    module, leaf = path.rsplit('/', 1)
    block = re.fullmatch(r'stage(\d+)/block(\d+)/(?:aggregated/)?(\w+)', module)
    if block:
        stage, index, name = block.groups()
        module = f'layer{stage}.{int(index) - 1}.{_MODULES.get(name, name)}'
    else:
        module = _MODULES.get(module)
    if module is None or leaf not in _LEAVES:
        raise ValueError(f'no torchvision name for the Flax variable {path!r}')
    return f'{module}.{_LEAVES[leaf]}'


def to_torch_layout(x):
    return np.transpose(x, _TO_TORCH[np.ndim(x)])


def to_flax_layout(x):
    return np.transpose(x, np.argsort(_TO_TORCH[np.ndim(x)]))


def variable_table(variables):
    """{torch key: (collection, Flax path)} for the params and batch_stats of `variables`
    (arrays or an abstract tree)."""
    table = {}
    for collection in ('params', 'batch_stats'):
        flat = flax.traverse_util.flatten_dict(dict(variables.get(collection, {})), sep='/')
        for path in flat:
            table[torch_name(path)] = (collection, path)
    return table


def abstract_variables(model):
    """The model's variables as shapes and dtypes, without computing anything."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def _leaf(variables, collection, path):
    return functools.reduce(lambda tree, key: tree[key], path.split('/'),
                            variables[collection])


def torch_shapes(variables):
    """{torch key: torch-layout shape} of `variables` (arrays or an abstract tree)."""
    def torch_shape(shape):
        return tuple(shape[i] for i in _TO_TORCH[len(shape)])
    return {key: torch_shape(_leaf(variables, *where).shape)
            for key, where in variable_table(variables).items()}


def check_shapes(got, expected):
    """Raises one line naming the first key whose shape differs or that is missing / unexpected
    (and how many more there are) when {key: shape} `got` does not fit `expected`."""
    problems = []
    for key, shape in expected.items():
        if key not in got:
            problems.append(f'missing key {key!r} (the model expects shape {shape})')
        elif tuple(got[key]) != tuple(shape):
            problems.append(f'key {key!r} has shape {tuple(got[key])} in the weights but the '
                            f'model expects {tuple(shape)}')
    problems += [f'unexpected key {key!r} with shape {tuple(shape)} (not a parameter of the '
                 'model)' for key, shape in got.items() if key not in expected]
    if problems:
        more = f'; {len(problems) - 1} more mismatched key(s)' if len(problems) > 1 else ''
        raise ValueError(problems[0] + more)


# ------------------------------------------------------------------------------ both directions

def _numpy(value):
    """A numpy array from a numpy array or a torch tensor (bfloat16 becomes float32)."""
    if hasattr(value, 'detach'):
        value = value.detach().cpu()
        if str(value.dtype) == 'torch.bfloat16':
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def torch_to_flax(state_dict, model, consume=False):
    """Flax variables {'params', 'batch_stats'} of `model` from a torchvision/timm state dict
    (name → numpy array or torch tensor). `consume`: take each array out of `state_dict` as it
    is converted, so that converting holds about one copy of the weights, not two."""
    abstract = abstract_variables(model)
    check_shapes({key: tuple(np.shape(value)) for key, value in state_dict.items()
                  if not key.endswith('.num_batches_tracked')}, torch_shapes(abstract))
    flat = {}
    for key, (collection, path) in variable_table(abstract).items():
        dtype = _leaf(abstract, collection, path).dtype
        value = _numpy(state_dict.pop(key) if consume else state_dict[key])
        flat[(collection, *path.split('/'))] = np.ascontiguousarray(to_flax_layout(value), dtype)
        del value
    return flax.traverse_util.unflatten_dict(flat)


def flax_to_torch(variables, model=None):
    """A torchvision state dict (name → contiguous numpy array) of Flax `variables`, checked
    against `model` when given. `ResNet.load_state_dict({k: torch.from_numpy(v) ...},
    strict=True)` takes it: every BN also gets `num_batches_tracked` = 0 (int64)."""
    if model is not None:
        check_shapes(torch_shapes(variables), torch_shapes(abstract_variables(model)))
    state_dict = {}
    for key, (collection, path) in variable_table(variables).items():
        state_dict[key] = np.ascontiguousarray(
            to_torch_layout(np.asarray(_leaf(variables, collection, path))))
        if key.endswith('.running_var'):
            state_dict[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
    return state_dict


# ------------------------------------------------------------------------------ files

def weights_suffix(path):
    """The weights file type of `path` ('.pth', '.pt', '.safetensors' or '.npz')."""
    suffix = os.path.splitext(path)[1]
    if suffix not in STATE_DICT_FILES:
        raise ValueError(f'{path}: unknown weights file type {suffix!r}; use one of '
                         f'{", ".join(STATE_DICT_FILES)}')
    return suffix


def read_state_dict(path):
    """name → numpy array of a weights file (see `read_weights`)."""
    return read_weights(path)[0]


def read_weights(path):
    """(state dict, metadata) of a weights file: name → numpy array from .pth/.pt (plain
    tensors only: `weights_only=True`; a bare state dict or one under 'state_dict' / 'model'),
    .safetensors or .npz, with a DataParallel 'module.' prefix removed; and the `FILE_META`
    an exported .safetensors / .npz file records ({} for any other file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: pass a .pth, .pt, .safetensors or '
                                '.npz file')
    suffix = weights_suffix(path)
    if suffix == '.npz' and not zipfile.is_zipfile(path):
        raise ValueError(f'{path} is not an .npz file (not a zip archive): pass one written by '
                         'numpy.savez or by this converter')
    if suffix == '.safetensors':
        safetensors = _optional('safetensors', suffix)
    elif suffix != '.npz':
        torch = _optional('torch', suffix)
    text = None
    try:
        if suffix == '.safetensors':
            # pread: straight into the arrays, without the file's pages mapped beside them
            with safetensors.safe_open(path, 'np', backend='pread') as f:
                obj = {key: f.get_tensor(key) for key in f.keys()}
                text = (f.metadata() or {}).get(META_KEY)
        elif suffix == '.npz':
            with np.load(path, allow_pickle=False) as f:
                obj = dict(f)
            text = obj.pop(META_KEY, None)
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f'{path} is not a plain torch state dict (torch.load(weights_only=True) '
                         'refused it: a whole pickled model, or not a torch file): save '
                         'model.state_dict() instead') from None
    except Exception as e:  # noqa: BLE001 (each reader has its own errors for a broken file)
        if suffix == '.npz' and 'pickle' in str(e):
            raise ValueError(f'{path} holds object arrays, which are never unpickled: save '
                             'plain numeric arrays (numpy.savez(path, **state_dict))') from None
        raise ValueError(f'{path} is not a readable {suffix} file '
                         f'({checkpoint._first_line(e)}): check that it is complete and of '
                         'that type') from None
    for key in ('state_dict', 'model'):  # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict: save '
                         'model.state_dict()')
    state_dict = {key: _numpy(value) for key, value in obj.items()}
    if state_dict and all(key.startswith('module.') for key in state_dict):
        state_dict = {key[len('module.'):]: value for key, value in state_dict.items()}
    return state_dict, _file_meta(text, path)


def _file_meta(text, path):
    if text is None:
        return {}
    try:
        meta = json.loads(str(text))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its '{META_KEY}' entry is not a JSON object: remove it or "
                         'export the file again')
    return meta


def write_state_dict(state_dict, path, meta=None):
    """Writes name → numpy array as .pth/.pt (torch tensors), .safetensors or .npz, the last two
    with `meta` (a JSON-able dict) as their 'resnext_jax' entry. Atomic: written to a temporary
    file beside `path` and renamed over it once complete, so a failed write leaves nothing
    there; created as any file is (0666 less the umask); missing directories are made."""
    suffix = weights_suffix(path)
    text = json.dumps(meta, sort_keys=True) if meta else None
    if suffix == '.safetensors':
        save = _optional('safetensors.numpy', suffix).save

        def write(f):
            f.write(save(state_dict, metadata={META_KEY: text} if text else None))
    elif suffix == '.npz':
        def write(f):
            np.savez(f, **state_dict, **({META_KEY: np.array(text)} if text else {}))
    else:
        torch = _optional('torch', suffix)

        def write(f):
            torch.save({key: torch.from_numpy(np.array(value))
                        for key, value in state_dict.items()}, f)
    write_atomically(path, write)


def write_atomically(path, write):
    """`write(f)` into a temporary file beside `path` (a binary file object), then renamed over
    `path` once complete, so a failed write leaves nothing there; created as any file is (0666
    less the umask); missing directories are made. OSError in one line otherwise."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f'.{name}.{secrets.token_hex(4)}.tmp')
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, 'xb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        reason = 'a file is in the way of its directory' if isinstance(
            e, FileExistsError) else e.strerror or e
        raise OSError(f'cannot write {path} ({reason}): choose a file in a writable '
                      'directory') from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _optional(module, suffix):
    package = module.split('.')[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = '' if package == 'safetensors' else ' (or pip install "resnext_jax[torch]")'
        raise ValueError(f'{suffix} files need the {package} package: pip install '
                         f'{package}{extra}') from None


def _model_options(options):
    """ResNeXt fields from JSON (lists become tuples, as in `config.model_options`)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}


def from_weights(path, name=None, num_classes=None, options=None):
    """(model, variables, meta) of a weights file. The model name and options default to those
    the file records (an exported file does), the classes to the rows of `fc.weight`; `meta`
    is the `FILE_META` of the file and of the model built."""
    state_dict, recorded = read_weights(path)
    name = name or recorded.get('model')
    if not name:
        raise ValueError(f'{path} does not record its network: pass --model NAME')
    if options is None and name == recorded.get('model'):
        options = recorded.get('model_options')
    options = _model_options(options)
    if num_classes is None and 'fc.weight' in state_dict:
        num_classes = int(np.shape(state_dict['fc.weight'])[0])
    model = create_model(name, num_classes=num_classes, **options)
    try:
        variables = torch_to_flax(state_dict, model)
    except ValueError as e:
        raise ValueError(f'{path} does not fit --model {name}: {e}') from None
    meta = {k: recorded[k] for k in FILE_META if k in recorded}
    meta.update(model=name, model_options=json.loads(json.dumps(options)),
                num_classes=model.num_classes)
    if len(meta.get('class_names') or []) != model.num_classes:
        meta.pop('class_names', None)   # another head: the names are not its classes
    meta.setdefault('image_size', 224 if model.stem == 'imagenet' else 32)
    return model, variables, meta


def load_model(path, name=None, options=None, ema=False):
    """(model, variables, meta) of a weights file (`from_weights`), of the newest checkpoint
    in a directory from `import_weights` or a training workdir (with `ema`, its EMA weights),
    or of published weights by registry name (`pretrained.load_pretrained`, e.g.
    'resnext50_32x4d.tv2_in1k'). The model name and options default to those recorded (a
    checkpoint's meta, else the workdir's config.json); the classes are the head's. `meta` is
    what is recorded, with the model name, options and classes used."""
    if pretrained.is_name(path):
        if ema:
            raise ValueError(f'{path} names published weights, which are one set: the EMA '
                             'option reads a training workdir')
        weights = pretrained.get(path)
        if (name or weights.model) != weights.model or (
                options is not None and _model_options(options) != weights.options):
            raise ValueError(f'{path} is {weights.model} {weights.options or ""}'.rstrip() +
                             ': leave out --model and --model-options')
        return pretrained.load_pretrained(path)
    if os.path.isfile(path):
        if ema:
            raise ValueError(f'{path} is a weights file, which holds one set of weights: the '
                             'EMA option reads a training workdir')
        return from_weights(path, name, options=options)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path} is not a checkpoint directory or weights file: pass a '
                                'training workdir, a directory that convert wrote or a '
                                '.safetensors / .npz / .pth file')
    try:
        state, meta = checkpoint.load_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'{e}: pass a training workdir or a directory that '
                                'python -m resnext_jax.convert wrote') from None
    config_file = os.path.join(path, 'config.json')
    config = {}
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
    name = name or meta.get('model') or config.get('model')
    if not name:
        raise ValueError(f'{path} does not record its model: pass --model NAME')
    if options is None:
        options = meta.get('model_options', config.get('model_options'))
    options = _model_options(options)
    variables = checkpoint.variables_of(state, path, ema)
    head = variables['params'].get('head')
    model = create_model(name, num_classes=head['kernel'].shape[-1] if head else 0, **options)
    try:
        check_shapes(torch_shapes(variables), torch_shapes(abstract_variables(model)))
    except ValueError as e:
        model_text = f'{name} {options}' if options else name
        raise ValueError(f'{path} does not hold model {model_text}: {e}') from None
    meta = {**meta, 'model': name, 'model_options': json.loads(json.dumps(options)),
            'num_classes': model.num_classes}
    return model, variables, meta


# ------------------------------------------------------------------------------ command line

def import_weights(src, dst, name=None, num_classes=None, options=None):
    """A torchvision/timm weights file → an orbax checkpoint directory for model `name` (default:
    the one the file records), with the file's metadata; or published weights by registry
    name → their checkpoint directory."""
    if not os.path.isfile(src) and not pretrained.is_name(src):
        raise FileNotFoundError(f'{src} does not exist: pass a .pth, .pt, .safetensors or '
                                '.npz file')
    if os.path.splitext(dst)[1] in STATE_DICT_FILES:
        raise ValueError(f'{dst}: a weights file is read into a checkpoint directory, not '
                         'another weights file')
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f'{dst} exists and is not an empty directory; choose a new one')
    if pretrained.is_name(src):
        _, variables, meta = load_model(src, name, options)
    else:
        _, variables, meta = from_weights(src, name, num_classes, options)
    try:
        checkpoint.save_variables(dst, variables, {**meta, 'source': os.path.basename(src)})
    except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
        raise OSError(f'cannot write the checkpoint {dst} ({checkpoint._first_line(e)}): '
                      'choose a writable destination') from None


def export_weights(src, dst, name=None, options=None, ema=False):
    """An orbax checkpoint directory or training workdir → a torchvision weights file (with the
    checkpoint's `FILE_META` in a .safetensors or .npz file); `ema`: its EMA weights."""
    weights_suffix(dst)   # before the slow part
    _, variables, meta = load_model(src, name, options, ema)
    write_state_dict(flax_to_torch(variables), dst,
                     {k: meta[k] for k in FILE_META if k in meta})


def json_object(text):
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r} is not a JSON object: write it as '
                                         '\'{"stage_sizes": [1, 1, 1, 1]}\'')
    return value


def main(argv=None):
    parser = cli.ArgumentParser(
        prog='python -m resnext_jax.convert', description=__doc__.split('\n\n')[0],
        epilog='SRC a weights file (.pth/.pt/.safetensors/.npz) → DST a checkpoint directory; '
               'SRC a checkpoint directory or training workdir → DST a weights file; SRC '
               'published weights by name (e.g. resnext50_32x4d.tv2_in1k; python -m '
               'resnext_jax.summary --pretrained lists them) → DST either.')
    parser.add_argument('src', metavar='SRC')
    parser.add_argument('dst', metavar='DST')
    parser.add_argument('--model', help='network name, e.g. resnext50_32x4d (default: the one '
                        'the checkpoint or an exported weights file records)')
    parser.add_argument('--num-classes', type=cli.integer(0),
                        help="classes of the head (default: the weights' fc.weight rows)")
    parser.add_argument('--model-options', type=json_object, metavar='JSON',
                        help='other ResNeXt fields, e.g. \'{"stage_sizes": [1, 1, 1, 1]}\'')
    parser.add_argument('--ema', action='store_true',
                        help='export the EMA weights of a workdir trained with '
                        '--config.ema_decay (default: the trained weights)')
    args = parser.parse_args(argv)
    try:
        to_file = os.path.splitext(args.dst)[1] in STATE_DICT_FILES
        if os.path.isdir(args.src) or (pretrained.is_name(args.src) and to_file):
            export_weights(args.src, args.dst, args.model, args.model_options, args.ema)
        elif args.ema:
            raise ValueError('--ema exports the EMA weights of a training workdir; SRC is a '
                             'weights file: leave out --ema')
        else:
            import_weights(args.src, args.dst, args.model, args.num_classes, args.model_options)
    except (ValueError, TypeError, OSError) as e:
        print(f'error: {e}'.splitlines()[0], file=sys.stderr)
        return 1
    print(f'wrote {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
