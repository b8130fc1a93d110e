"""Published ImageNet weights of these networks, by name, in one call.

    model, variables, meta = resnext_jax.load_pretrained('resnext50_32x4d.tv2_in1k')   # Linen
    model, meta = resnext_jax.nnx.load_pretrained('resnext50_32x4d.tv2_in1k')        # NNX

`WEIGHTS` is the registry: every ImageNet-1k classifier that timm hosts on the Hugging Face Hub
(`timm/<arch>.<tag>`, file `model.safetensors`, torchvision's own among them) whose network is
one of ours exactly: the 7×7 stem, bottleneck blocks with the stride in the 3×3 (grouped)
convolution, 1×1 projection shortcuts, ReLU and batch norm. The facts of each entry (its
preprocessing, parameter count, published top-1 / top-5 at its test size, licence) are timm's
(`timm/models/resnet.py` `default_cfgs`; `results/results-imagenet.csv`, commit 4e5207c7) and
are checked against the installed timm by the tests; `EXCLUDED` says which of timm's
ResNet-family weights are not these networks and why. `python -m resnext_jax.summary
--pretrained` prints the table.

A name's file is downloaded once per host through `huggingface_hub` (its cache, file locks,
resumed downloads, `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`), its sha256 checked against
the Hub's, and converted to Flax's layout (`convert.torch_to_flax`; no torch anywhere). The
Flax form is cached (`flax_cache_dir()`, a safetensors file named by the download's sha256) so
the next load only reads it. Every failure is one `PretrainedError` line that says what, where
the cache is and what to do; a failed download leaves nothing half-written in the cache.
"""
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re

from resnext_jax.image_settings import IMAGENET_MEAN, IMAGENET_STD

FILENAME = 'model.safetensors'   # timm's weights file in each Hub repository
FACTS = ("timm's resnet.py default_cfgs and results/results-imagenet.csv "
         '(huggingface/pytorch-image-models 4e5207c7)')
# timm's architecture → (our network, other create_model fields). Wide ResNet-50-2 / 101-2
# double the bottleneck width: one group of 128 channels in stage 1, i.e. ResNeXt C=1, d=128.
ARCHS = {
    'resnet26': ('resnet26', {}),
    'resnet50': ('resnet50', {}), 'resnet101': ('resnet101', {}), 'resnet152': ('resnet152', {}),
    'wide_resnet50_2': ('resnext50_1x128d', {}), 'wide_resnet101_2': ('resnext101_1x128d', {}),
    'resnext50_32x4d': ('resnext50_32x4d', {}), 'resnext101_32x4d': ('resnext101_32x4d', {}),
    'resnext101_32x8d': ('resnext101_32x8d', {}), 'resnext101_32x16d': ('resnext101_32x16d', {}),
    'resnext101_32x32d': ('resnext101_32x32d', {}),
    'resnext101_32x48d': ('resnext101_32x48d', {}),
    'resnext101_64x4d': ('resnext101_64x4d', {}),
}
# name, parameters (millions, timm's param_count), top-1, top-5 (%, at the test size), train
# size, train crop fraction, test size, test crop fraction. Mean and std are ImageNet's for all.
_TABLE = (
    ('resnet26.bt_in1k', 16.0, 76.384, 93.178, 224, 0.875, 288, 0.95),
    ('resnet50.a1_in1k', 25.56, 81.24, 95.112, 224, 0.95, 288, 1.0),
    ('resnet50.a1h_in1k', 25.56, 80.654, 95.312, 176, 0.9, 224, 1.0),
    ('resnet50.a2_in1k', 25.56, 80.774, 94.978, 224, 0.95, 288, 1.0),
    ('resnet50.a3_in1k', 25.56, 78.052, 93.78, 160, 0.95, 224, 0.95),
    ('resnet50.b1k_in1k', 25.56, 80.708, 95.43, 224, 0.95, 288, 1.0),
    ('resnet50.b2k_in1k', 25.56, 80.466, 95.306, 224, 0.95, 288, 1.0),
    ('resnet50.c1_in1k', 25.56, 80.928, 95.554, 224, 0.95, 288, 1.0),
    ('resnet50.c2_in1k', 25.56, 80.862, 95.53, 224, 0.95, 288, 1.0),
    ('resnet50.d_in1k', 25.56, 81.012, 95.456, 224, 0.95, 288, 1.0),
    ('resnet50.ram_in1k', 25.56, 79.982, 95.038, 224, 0.875, 288, 0.95),
    ('resnet50.am_in1k', 25.56, 79.004, 94.392, 224, 0.875, 224, 0.875),
    ('resnet50.ra_in1k', 25.56, 79.864, 94.97, 224, 0.875, 288, 0.95),
    ('resnet50.bt_in1k', 25.56, 79.652, 94.908, 224, 0.875, 288, 0.95),
    ('resnet50.tv_in1k', 25.56, 76.156, 92.866, 224, 0.875, 224, 0.875),
    ('resnet50.tv2_in1k', 25.56, 80.846, 95.43, 176, 0.875, 224, 0.965),
    ('resnet50.gluon_in1k', 25.56, 77.58, 93.704, 224, 0.875, 224, 0.875),
    ('resnet50.fb_ssl_yfcc100m_ft_in1k', 25.56, 79.252, 94.826, 224, 0.875, 224, 0.875),
    ('resnet50.fb_swsl_ig1b_ft_in1k', 25.56, 81.146, 95.98, 224, 0.875, 224, 0.875),
    ('resnet101.a1h_in1k', 44.55, 82.796, 96.324, 224, 0.95, 288, 1.0),
    ('resnet101.a1_in1k', 44.55, 82.326, 95.63, 224, 0.95, 288, 1.0),
    ('resnet101.a2_in1k', 44.55, 82.218, 95.74, 224, 0.95, 288, 1.0),
    ('resnet101.a3_in1k', 44.55, 79.836, 94.608, 160, 0.95, 224, 0.95),
    ('resnet101.tv_in1k', 44.55, 77.404, 93.552, 224, 0.875, 224, 0.875),
    ('resnet101.tv2_in1k', 44.55, 81.906, 95.768, 176, 0.875, 224, 0.965),
    ('resnet101.gluon_in1k', 44.55, 79.306, 94.538, 224, 0.875, 224, 0.875),
    ('resnet152.a1h_in1k', 60.19, 83.494, 96.522, 224, 0.95, 288, 1.0),
    ('resnet152.a1_in1k', 60.19, 82.742, 95.734, 224, 0.95, 288, 1.0),
    ('resnet152.a2_in1k', 60.19, 82.614, 95.748, 224, 0.95, 288, 1.0),
    ('resnet152.a3_in1k', 60.19, 80.548, 95.004, 160, 0.95, 224, 0.95),
    ('resnet152.tv_in1k', 60.19, 78.33, 94.046, 224, 0.875, 224, 0.875),
    ('resnet152.tv2_in1k', 60.19, 82.294, 96.0, 176, 0.875, 224, 0.965),
    ('resnet152.gluon_in1k', 60.19, 79.712, 94.72, 224, 0.875, 224, 0.875),
    ('wide_resnet50_2.racm_in1k', 68.88, 82.26, 96.062, 224, 0.875, 288, 0.95),
    ('wide_resnet50_2.tv_in1k', 68.88, 78.486, 94.084, 224, 0.875, 224, 0.875),
    ('wide_resnet50_2.tv2_in1k', 68.88, 81.612, 95.766, 176, 0.875, 224, 0.965),
    ('wide_resnet101_2.tv_in1k', 126.89, 78.862, 94.312, 224, 0.875, 224, 0.875),
    ('wide_resnet101_2.tv2_in1k', 126.89, 82.514, 96.012, 176, 0.875, 224, 0.965),
    ('resnext50_32x4d.a1h_in1k', 25.03, 82.016, 95.934, 224, 0.95, 288, 1.0),
    ('resnext50_32x4d.a1_in1k', 25.03, 81.48, 95.152, 224, 0.95, 288, 1.0),
    ('resnext50_32x4d.a2_in1k', 25.03, 81.304, 95.114, 224, 0.95, 288, 1.0),
    ('resnext50_32x4d.a3_in1k', 25.03, 79.258, 94.308, 160, 0.95, 224, 0.95),
    ('resnext50_32x4d.ra_in1k', 25.03, 80.72, 95.344, 224, 0.875, 288, 0.95),
    ('resnext50_32x4d.tv_in1k', 25.03, 77.632, 93.674, 224, 0.875, 224, 0.875),
    ('resnext50_32x4d.tv2_in1k', 25.03, 81.19, 95.344, 176, 0.875, 224, 0.965),
    ('resnext50_32x4d.gluon_in1k', 25.03, 79.354, 94.424, 224, 0.875, 224, 0.875),
    ('resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k', 25.03, 80.316, 95.386, 224, 0.875, 224, 0.875),
    ('resnext50_32x4d.fb_swsl_ig1b_ft_in1k', 25.03, 82.162, 96.224, 224, 0.875, 224, 0.875),
    ('resnext101_32x4d.gluon_in1k', 44.18, 80.336, 94.908, 224, 0.875, 224, 0.875),
    ('resnext101_32x4d.fb_ssl_yfcc100m_ft_in1k', 44.18, 80.936, 95.732, 224, 0.875, 224, 0.875),
    ('resnext101_32x4d.fb_swsl_ig1b_ft_in1k', 44.18, 83.268, 96.76, 224, 0.875, 224, 0.875),
    ('resnext101_32x8d.tv_in1k', 88.79, 79.308, 94.53, 224, 0.875, 224, 0.875),
    ('resnext101_32x8d.tv2_in1k', 88.79, 82.832, 96.234, 176, 0.875, 224, 0.965),
    ('resnext101_32x8d.fb_wsl_ig1b_ft_in1k', 88.79, 82.72, 96.624, 224, 0.875, 224, 0.875),
    ('resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k', 88.79, 81.62, 96.036, 224, 0.875, 224, 0.875),
    ('resnext101_32x8d.fb_swsl_ig1b_ft_in1k', 88.79, 84.276, 97.188, 224, 0.875, 224, 0.875),
    ('resnext101_32x16d.fb_wsl_ig1b_ft_in1k', 194.03, 84.166, 97.192, 224, 0.875, 224, 0.875),
    ('resnext101_32x16d.fb_ssl_yfcc100m_ft_in1k', 194.03, 81.856, 96.084, 224, 0.875, 224,
     0.875),
    ('resnext101_32x16d.fb_swsl_ig1b_ft_in1k', 194.03, 83.34, 96.844, 224, 0.875, 224, 0.875),
    ('resnext101_32x32d.fb_wsl_ig1b_ft_in1k', 468.53, 85.09, 97.442, 224, 0.875, 224, 0.875),
    # timm's default_cfgs lists it, but timm 1.0.31 builds no resnext101_32x48d and its results
    # file has no row: the parameter count is the network's (828,411,176), no accuracy is given.
    ('resnext101_32x48d.fb_wsl_ig1b_ft_in1k', 828.41, None, None, 224, 0.875, 224, 0.875),
    ('resnext101_64x4d.c1_in1k', 83.46, 83.158, 96.37, 224, 0.95, 288, 1.0),
    ('resnext101_64x4d.tv_in1k', 83.46, 82.978, 96.252, 224, 0.875, 224, 0.875),
    ('resnext101_64x4d.gluon_in1k', 83.46, 80.64, 95.0, 224, 0.875, 224, 0.875),
)
# timm's ResNet-family ImageNet weights that are not these networks (resnet.py default_cfgs).
EXCLUDED = {
    'BasicBlock (two 3×3 convolutions, no bottleneck)': (
        'resnet18', 'resnet34', 'resnet18d', 'resnet34d', 'resnet10t'),
    'deep stem (three 3×3 convolutions) and average-pool shortcut ("d", "t")': (
        'resnet14t', 'resnet26d', 'resnet26t', 'resnet50d', 'resnet101d', 'resnet152d',
        'resnet200d', 'resnext50d_32x4d'),
    'deep stem ("c", "s": Gluon)': (
        'resnet50c', 'resnet101c', 'resnet152c', 'resnet50s', 'resnet101s', 'resnet152s'),
    'squeeze-excitation or ECA attention': (
        'seresnet50', 'seresnext50_32x4d', 'seresnext101_32x4d', 'seresnext101_64x4d',
        'seresnext101_32x8d', 'seresnext101d_32x8d', 'seresnext26d_32x4d',
        'seresnext26t_32x4d', 'seresnet152d', 'senet154', 'ecaresnet*', 'resnetrs*'),
    'anti-aliased downsampling (blur or average pool)': (
        'resnetblur50', 'resnetaa50', 'resnetaa50d', 'resnetaa101d', 'seresnextaa*'),
    'group norm instead of batch norm': ('resnet50_gn',),
}


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weight: timm's `name` (arch.tag), our network and its preprocessing."""
    name: str
    params_m: float                 # timm's param_count, millions
    top1: float | None              # published ImageNet top-1 / top-5 (%) at `test_size`
    top5: float | None
    train_size: int
    train_crop: float
    test_size: int
    test_crop: float

    @property
    def arch(self):
        return self.name.split('.')[0]

    @property
    def tag(self):
        return self.name.split('.', 1)[1]

    @property
    def model(self):
        return ARCHS[self.arch][0]

    @property
    def options(self):
        return dict(ARCHS[self.arch][1])

    @property
    def repo(self):
        return f'timm/{self.name}'

    @property
    def licence(self):   # timm's license field: torchvision's BSD, Facebook's SSL/WSL CC-BY-NC
        return ('bsd-3-clause' if self.tag.startswith(('tv_', 'tv2_')) else
                'cc-by-nc-4.0' if self.tag.startswith('fb_') else 'apache-2.0')

    @property
    def interpolation(self):   # torchvision and Facebook weights: bilinear; timm's: bicubic
        return 'bilinear' if self.tag.startswith(('tv_', 'tv2_', 'fb_')) else 'bicubic'

    @property
    def eval_resize(self):
        """The shorter side before the centre crop: timm's floor(test size / crop fraction)."""
        return math.floor(self.test_size / self.test_crop)

    def preprocessing(self):
        """What a checkpoint records of its evaluation (`image_settings.EVAL_FIELDS`)."""
        return {'dataset': 'imagenet2012', 'image_size': self.train_size,
                'eval_image_size': self.test_size, 'eval_resize': self.eval_resize,
                'interpolation': self.interpolation, 'augment': 'imagenet',
                'mean': IMAGENET_MEAN, 'std': IMAGENET_STD}

    def meta(self):
        """The metadata of a checkpoint of these weights (as `convert.FILE_META` has it), with
        where they came from."""
        return {'model': self.model, 'model_options': json.loads(json.dumps(self.options)),
                'num_classes': 1000, 'class_names': imagenet_class_names(),
                **self.preprocessing(), 'pretrained': self.name,
                'source': f'{self.repo}/{FILENAME}', 'licence': self.licence,
                'published_top1': self.top1, 'published_top5': self.top5}

    def describe(self):
        """One line: the weights, their published accuracy and licence."""
        accuracy = (f'published ImageNet top-1 {self.top1:.2f}%, top-5 {self.top5:.2f}% at '
                    f'{self.test_size}×{self.test_size}' if self.top1 is not None
                    else 'no published accuracy')
        return f'{self.name} ({self.repo}; {accuracy}; licence {self.licence})'


WEIGHTS = {row[0]: Weights(*row) for row in _TABLE}


class PretrainedError(ValueError):
    """A registry name that cannot be loaded: one line saying what and what to do."""


def is_name(text):
    """Whether `text` is meant as a registry name: not an existing path (which wins), and
    `<arch>.<tag>` with one of timm's architectures here (`get` then says whether the tag
    exists)."""
    return (isinstance(text, str) and '.' in text and text.split('.')[0] in ARCHS
            and os.sep not in text and not os.path.exists(text))


def get(name):
    """The registry entry `name`, or a `PretrainedError` naming the closest ones."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    same_arch = sorted(w for w in WEIGHTS if w.split('.')[0] == name)
    close = same_arch or difflib.get_close_matches(name, list(WEIGHTS), n=3, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise PretrainedError(f'unknown pretrained weights {name!r}: {hint}python -m '
                          'resnext_jax.summary --pretrained lists them')


def imagenet_class_names():
    """The 1000 ImageNet class names in label order: tensorflow_datasets' own list (SI-Score's
    labels module, read as text without importing TensorFlow); None if it is not there."""
    import ast   # noqa: PLC0415
    import importlib.util   # noqa: PLC0415
    spec = importlib.util.find_spec('tensorflow_datasets')
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), 'datasets', 'siscore', 'labels.py')
    with contextlib.suppress(OSError, SyntaxError, ValueError):
        with open(path) as f:
            for node in ast.parse(f.read()).body:
                if (isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') ==
                        'IMAGENET_LABELS_LIST'):
                    names = ast.literal_eval(node.value)
                    return list(names) if len(names) == 1000 else None
    return None


# ------------------------------------------------------------------------------ the download

def _hub_settings():
    """(endpoint, hub cache directory, offline) as huggingface_hub reads them, taken from the
    environment at each call (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants   # noqa: PLC0415
    endpoint = os.environ.get('HF_ENDPOINT') or constants.ENDPOINT
    cache = os.environ.get('HF_HUB_CACHE') or constants.HF_HUB_CACHE
    offline = os.environ.get('HF_HUB_OFFLINE', '').upper() in {'1', 'ON', 'YES', 'TRUE'} or (
        constants.is_offline_mode())
    return endpoint.rstrip('/'), cache, offline


def _by_hand(weights, cache):
    return (f'on a machine with internet run "hf download {weights.repo} {FILENAME} '
            f'--cache-dir {cache}" and copy that directory here (or set HF_HUB_CACHE to it), '
            'then set HF_HUB_OFFLINE=1')


def download(weights):
    """The local path of `weights`' Hub file: from huggingface_hub's cache, else downloaded into
    it (one process per host downloads, the others wait on its file lock). `PretrainedError`
    in one line when it cannot be had; nothing half-written is left in the cache."""
    import huggingface_hub   # noqa: PLC0415
    from huggingface_hub import errors   # noqa: PLC0415
    endpoint, cache, offline = _hub_settings()
    cached = huggingface_hub.try_to_load_from_cache(weights.repo, FILENAME, cache_dir=cache)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached   # no request at all: the Hub's weights files do not change
    if offline:
        raise PretrainedError(f'{weights.name} is not in the cache {cache} and HF_HUB_OFFLINE '
                              f'is set: {_by_hand(weights, cache)}')
    hub_log = logging.getLogger('huggingface_hub')   # its retries: one line here, not twelve
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return huggingface_hub.hf_hub_download(weights.repo, FILENAME, cache_dir=cache,
                                               endpoint=endpoint)
    except errors.LocalEntryNotFoundError:   # the endpoint did not answer (an EntryNotFound)
        problem = f'cannot reach {endpoint} to download {weights.repo}/{FILENAME}'
        hint = 'check the network and HF_ENDPOINT, or ' + _by_hand(weights, cache)
    except (errors.RepositoryNotFoundError, errors.EntryNotFoundError,
            errors.RevisionNotFoundError):
        problem = f'{endpoint} has no {weights.repo}/{FILENAME}'
        hint = 'check HF_ENDPOINT, or place the file by hand: ' + _by_hand(weights, cache)
    except Exception as e:   # noqa: BLE001 (the HTTP client's own errors too: a cut transfer)
        problem = (f'the download of {weights.repo}/{FILENAME} from {endpoint} failed '
                   f'({_first_line(e)})')
        hint = 'run the same command again, or ' + _by_hand(weights, cache)
    finally:
        hub_log.setLevel(level)
    raise PretrainedError(f'{problem} (cache {cache}): {hint}')


def verified(path, weights):
    """The sha256 of the downloaded file at `path`, checked against the Hub's (the name of
    huggingface_hub's blob is the file's sha256 for the Hub's large files). A file that fails
    is removed from the cache, with a `PretrainedError` that says so."""
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    digest = hashlib.sha256()
    with open(blob, 'rb') as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    actual = digest.hexdigest()
    if re.fullmatch(r'[0-9a-f]{64}', expected) and actual != expected:
        for stale in (path, blob):
            with contextlib.suppress(OSError):
                os.remove(stale)
        raise PretrainedError(
            f'the downloaded {weights.repo}/{FILENAME} failed its sha256 check (got '
            f'{actual[:12]}…, the Hub says {expected[:12]}…) and was removed from the cache '
            f'{_hub_settings()[1]}: run the same command again to download it again')
    return actual


# ------------------------------------------------------------------------------ the Flax form

def flax_cache_dir():
    """Where converted weights are kept: $RESNEXT_JAX_CACHE, else $XDG_CACHE_HOME/resnext_jax,
    else ~/.cache/resnext_jax."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.environ.get('RESNEXT_JAX_CACHE') or os.path.join(root, 'resnext_jax')


def load_variables(name):
    """({'params', 'batch_stats'} as numpy arrays in Flax's layout, meta) of registry weights
    `name`: the cached Flax form, else the Hub file (downloaded once, its sha256 checked),
    converted and cached. Safe for many processes at once: a file lock per weights file."""
    import filelock   # noqa: PLC0415 (huggingface_hub's own dependency)
    from flax.traverse_util import flatten_dict, unflatten_dict   # noqa: PLC0415
    from safetensors.numpy import load_file, save_file   # noqa: PLC0415
    weights = get(name)
    meta = weights.meta()
    directory = os.path.join(flax_cache_dir(), 'flax')
    path = download(weights)
    sha = os.path.basename(os.path.realpath(path))[:16]   # the Hub file's (its blob name)
    flax_file = os.path.join(directory, f'{weights.name}-{sha}.safetensors')
    try:
        os.makedirs(directory, exist_ok=True)
        lock = filelock.FileLock(flax_file + '.lock')
    except OSError as e:
        raise PretrainedError(f'cannot write the cache {directory} ({e.strerror or e}): set '
                              'RESNEXT_JAX_CACHE to a writable directory') from None
    with lock:
        if os.path.isfile(flax_file):
            with contextlib.suppress(Exception):   # unreadable: converted again below
                return unflatten_dict(load_file(flax_file, backend='pread'), sep='/'), meta
        from resnext_jax import convert   # noqa: PLC0415
        from resnext_jax.models import create_model   # noqa: PLC0415
        verified(path, weights)
        model = create_model(weights.model, **weights.options)
        try:
            variables = convert.torch_to_flax(convert.read_state_dict(path), model,
                                              consume=True)
        except ValueError as e:
            raise PretrainedError(f'{weights.repo}/{FILENAME} is not {weights.model}: '
                                  f'{_first_line(e)}') from None
        flat = flatten_dict(variables, sep='/')
        with contextlib.suppress(OSError):   # a read-only cache: it still loads, only slower
            temporary = f'{flax_file}.{os.getpid()}.tmp'
            try:
                save_file(flat, temporary, metadata={'pretrained': weights.name})
                os.replace(temporary, flax_file)
            finally:
                with contextlib.suppress(OSError):
                    os.remove(temporary)
    return variables, meta


def load_pretrained(name, **overrides):
    """(Linen model, variables, meta) of registry weights `name`, e.g.
    `load_pretrained('resnext50_32x4d.tv2_in1k')`. `overrides` set `create_model` options that keep the
    parameters (`dtype`, `form`, ...); `meta` is what a checkpoint of them records: network,
    options, ImageNet's 1000 class names, the evaluation preprocessing (sizes, resize, crop,
    interpolation, mean, std) and the published accuracy."""
    from resnext_jax.models import create_model   # noqa: PLC0415
    weights = get(name)
    variables, meta = load_variables(name)
    return create_model(weights.model, **{**weights.options, **overrides}), variables, meta


def configure(config):
    """`config` with what published weights decide when `init_from` names them (a new
    ConfigDict; `config` itself when it does not): the network where `model` is '' (its
    options added to `model_options`), their interpolation where `interpolation` is '', and
    where `image_size` is 0 their training size and their test crop and resize (where the
    config leaves those unset). ValueError in one line for '' or 0 without such weights, or
    a `model` that is not theirs."""
    name = config.get('init_from', '')
    if not is_name(name):
        for field, value in (('model', ''), ('image_size', 0), ('interpolation', '')):
            if config.get(field) == value:
                raise ValueError(f'{field} {value!r} takes the {field} of the published weights '
                                 'that init_from names: set --config.init_from to one of python '
                                 f'-m resnext_jax.summary --pretrained, or set --config.{field}')
        return config
    weights = get(name)
    if config.model and config.model != weights.model:
        raise ValueError(f'init_from {name} is a {weights.model}, not --config.model '
                         f"{config.model}: leave --config.model empty ('') or choose weights of "
                         f'{config.model}')
    config = config.copy_and_resolve_references()
    config.model = weights.model
    config.model_options = {**weights.options, **config.model_options}
    if config.image_size == 0:
        config.image_size = weights.train_size
        if config.eval_image_size is None:
            config.eval_image_size = weights.test_size
        if config.eval_resize is None:
            config.eval_resize = weights.eval_resize
    if not config.get('interpolation'):
        config.interpolation = weights.interpolation
    return config


def table():
    """The registry as rows of dicts (`summary --pretrained`)."""
    return [{'name': w.name, 'model': w.model, 'options': w.options, 'repo': w.repo,
             'file': FILENAME, 'params_m': w.params_m, 'top1': w.top1, 'top5': w.top5,
             'train_size': w.train_size, 'test_size': w.test_size, 'crop': w.test_crop,
             'resize': w.eval_resize, 'interpolation': w.interpolation,
             'licence': w.licence} for w in WEIGHTS.values()]


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
