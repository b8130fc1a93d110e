"""A run's inputs checked before anything starts: `check_config(config)`, `check_workdir(path)`.

Each raises `ValueError` with one line naming the field, the bad value, what is allowed and the
flag to fix, e.g. `batch_size 0 is not an integer ≥ 1: fix --config.batch_size`. `FIELDS` has
one entry for every field of configs/default.py (tests/test_bad_input.py keeps them in step):
its rule, or why it is checked elsewhere. A field that is not in `FIELDS` is refused, so a typo
in a recipe file (`c.batchsize = 32`) stops the run instead of being ignored.
"""
import difflib
import math
import tempfile

from absl import logging
from etils import epath

from resnext_jax import image_settings, policies
from resnext_jax.aggregated import FORMS
from resnext_jax.models import STEMS, model_spec

DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('step', 'cosine')
OPTIMIZERS = ('sgd', 'adamw', 'lamb')   # step.create_optimizer
LOSSES = ('ce', 'bce')                  # step.training_loss


# ---- rules: (test, what is allowed) ----

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low, high=None):
    text = f'an integer ≥ {low}' + (f' and < {high}' if high is not None else '')
    return lambda v: _is_int(v) and v >= low and (high is None or v < high), text


def number(low, high=None, *, above=False, below=False):
    """A finite number in [low, high]; `above` / `below` exclude the ends."""
    text = f'a finite number {">" if above else "≥"} {low}' + (
        f' and {"<" if below else "≤"} {high}' if high is not None else '')
    return lambda v: (_is_number(v) and (v > low if above else v >= low) and
                      (high is None or (v < high if below else v <= high))), text


def one_of(*values):
    return lambda v: v in values, f'one of {values}'


def optional(rule):
    test, text = rule
    return lambda v: v is None or test(v), f'None or {text}'


def boolean():
    return lambda v: isinstance(v, bool), 'True or False'


def string(non_empty=False):
    return (lambda v: isinstance(v, str) and bool(v or not non_empty),
            'a non-empty string' if non_empty else 'a string')


def sequence(rule, length=None, increasing=False):
    test, text = rule

    def ok(v):
        return (isinstance(v, (tuple, list)) and all(test(x) for x in v)
                and (length is None or len(v) == length)
                and (not increasing or all(a < b for a, b in zip(v, v[1:]))))
    return ok, (f'a tuple of {length or "any number of"} values, each {text}' +
                (', increasing' if increasing else ''))


def profile_steps():
    def ok(v):
        if not isinstance(v, str):
            return False
        if not v:
            return True
        first, _, last = v.partition(':')
        return first.isdigit() and last.isdigit() and 0 < int(first) < int(last)
    return ok, "'' (no trace) or 'A:B' with 0 < A < B: the steps A to B - 1 are traced"


def augment_policy():
    def ok(v):
        if v == '':
            return True
        try:
            policies.parse(v)
        except (TypeError, ValueError):
            return False
        return True
    return ok, ("'' (none), 'ta_wide' (TrivialAugment-Wide) or a RandAugment spec in timm's "
                "notation, e.g. 'rand-m9-n2-mstd0.5'")


OTHER = None   # checked by `check_config` itself (`_check_model`)

# Every field of configs/default.py: its rule. A comment says what is checked later, where the
# field is used, because it needs the data, the devices or the file system.
FIELDS = {
    'name': string(),                           # free-form recipe id
    'model': OTHER,                             # model_spec(); with model_options
    'model_options': OTHER,                     # MODEL_OPTIONS
    'form': one_of(*FORMS),
    'dtype': one_of(*DTYPES),
    'zero_init_last_bn': boolean(),
    'bn_group_size': integer(0),                # and divides batch_size
    'drop_path_rate': number(0, 1, below=True),
    'dropout': number(0, 1, below=True),
    'init_from': string(),                      # existence: checkpoint.init_from, when read
    'init_from_ema': boolean(),                 # whether it has an EMA: checkpoint.init_from
    'dataset': string(non_empty=True),          # name, folder, splits: sources.make_source
    'train_split': string(non_empty=True),
    'eval_split': string(non_empty=True),
    'data_dir': optional(string(non_empty=True)),  # whether it holds the data: sources.make_source
    'in_memory': optional(boolean()),
    'image_size': integer(1),                   # see _check_image_size
    'eval_image_size': optional(integer(1)),
    'eval_resize': optional(integer(1)),        # ≥ the eval crop with augment 'imagenet'
    'augment': one_of(*image_settings.AUGMENTS),
    'interpolation': one_of(*image_settings.INTERPOLATIONS),
    'augment_on': one_of(*image_settings.AUGMENT_ON),
    'color_jitter': number(0, 1),               # factors 1 ± color_jitter stay ≥ 0
    'pca_lighting': number(0),
    'mean': optional(sequence(number(0, 255), 3)),
    'std': optional(sequence(number(0, above=True), 3)),
    'auto_augment': augment_policy(),
    'random_erase': number(0, 1),
    'repeated_augments': integer(1),
    'crop_padding': optional(integer(0)),
    'shuffle_buffer': integer(1),
    'seed': integer(-2**63, 2**63),             # 64-bit: TensorFlow's stateless seeds
    'skip_corrupt_images': boolean(),
    'optimizer': one_of(*OPTIMIZERS),
    'batch_size': integer(1),                   # divisibility by devices: train, at start
    'learning_rate': number(0, above=True),
    'lr_base_batch_size': integer(1),
    'momentum': number(0, 1, below=True),
    'nesterov': boolean(),
    'weight_decay': number(0, 1, below=True),
    'decay_bn_and_bias': boolean(),
    'schedule': one_of(*SCHEDULES),
    'lr_boundaries_epochs': sequence(number(0), increasing=True),
    'lr_decay_factor': number(0, 1, above=True),
    'warmup_epochs': number(0),
    'loss': one_of(*LOSSES),
    'label_smoothing': number(0, 1, below=True),
    'bce_target_thresh': optional(number(0, 1, below=True)),
    'mixup_alpha': number(0),
    'cutmix_alpha': number(0),
    'mixup_prob': number(0, 1),
    'mixup_switch_prob': number(0, 1),
    'clip_grad_norm': number(0),
    'ema_decay': number(0, 1, below=True),
    'ema_every_steps': integer(1),
    'num_epochs': number(0),                    # > 0 unless num_train_steps > 0
    'num_train_steps': integer(-2**63),         # ≤ 0: num_epochs decides
    'fsdp': boolean(),
    'fsdp_min_size': integer(0),
    'log_every_steps': integer(1),
    'eval_every_epochs': number(0, above=True),
    'checkpoint_every_steps': integer(1),
    'keep_checkpoints': integer(1),
    'async_checkpoints': boolean(),
    'eval_only': boolean(),
    'profile_steps': profile_steps(),
}

# ResNeXt fields a recipe may set in model_options (the others come from their own field).
MODEL_OPTIONS = {
    'stage_sizes': sequence(integer(1)),
    'cardinality': integer(1),
    'bottleneck_width': integer(1),
    'stem': one_of(*STEMS),
    'stem_width': integer(1),
    'base_features': integer(1),
    'bn_momentum': number(0, 1),
    'bn_epsilon': number(0, above=True),
    'param_dtype': one_of(*DTYPES),
}
FROM_OWN_FIELD = ('num_classes', 'form', 'dtype', 'zero_init_last_bn', 'bn_group_size',
                  'drop_path_rate', 'dropout')


def _error(field, value, allowed):
    return ValueError(f'{field} {value!r} is not {allowed}: fix --config.{field}')


def check_config(config):
    """Raises ValueError (one line) for the first field of `config` that cannot work."""
    for field in config.keys():
        if field not in FIELDS:
            close = difflib.get_close_matches(field, FIELDS, n=1)
            hint = f'did you mean {close[0]!r}? ' if close else ''
            raise ValueError(f'config field {field!r} is unknown: {hint}configs/default.py '
                             'declares every field')
    for field, rule in FIELDS.items():
        if rule is not OTHER:
            test, allowed = rule
            value = config.get(field, None)
            if not test(value):
                raise _error(field, value, allowed)
    model = _check_model(config)
    if not (config.num_epochs > 0 or config.num_train_steps > 0):
        raise ValueError(f'num_epochs {config.num_epochs!r} is not > 0 and num_train_steps '
                         f'{config.num_train_steps!r} is not > 0: fix --config.num_epochs')
    if config.bn_group_size and config.batch_size % config.bn_group_size:
        raise ValueError(f'bn_group_size {config.bn_group_size} does not divide batch_size '
                         f'{config.batch_size}: fix --config.bn_group_size')
    eval_size = image_settings.eval_size(config)
    if config.augment == 'imagenet' and image_settings.eval_resize(config) < eval_size:
        raise ValueError(f'eval_resize {config.eval_resize} is smaller than the eval crop '
                         f'{eval_size}: fix --config.eval_resize (e.g. {round(eval_size * 8 / 7)})')
    _check_image_size(model, config.image_size, eval_size)


def _check_model(config):
    """The ResNeXt fields of `config.model` with its model_options."""
    try:
        spec = model_spec(config.model)
    except ValueError as e:
        raise ValueError(f'{e}: fix --config.model') from None
    options = dict(config.model_options)
    for key, value in options.items():
        if key in FROM_OWN_FIELD:
            raise ValueError(f'model_options sets {key!r}, which has its own field: use '
                             f'--config.{key}' if key != 'num_classes' else
                             "model_options sets 'num_classes', which comes from the dataset: "
                             'remove it from --config.model_options')
        if key not in MODEL_OPTIONS:
            raise ValueError(f'model_options key {key!r} is not one of {tuple(MODEL_OPTIONS)}: '
                             'fix --config.model_options')
        test, allowed = MODEL_OPTIONS[key]
        if not test(value):
            raise _error(f'model_options.{key}', value, allowed)
    return {**spec, **options}


def _check_image_size(model, *sizes):
    """Every size ≥ 1 runs (`jax.eval_shape` of either stem: the maps shrink to 1×1, never to
    0; tests/test_bad_input.py measures it), so sizes below the network's total stride are
    allowed, with a warning: their deepest stages see a 1×1 map that is mostly padding."""
    stride = (4 if model['stem'] == 'imagenet' else 1) * 2 ** (len(model['stage_sizes']) - 1)
    if min(sizes) < stride:
        logging.warning('image size %d is below the network\'s total stride %d: its deepest '
                        'stages see a 1×1 map', min(sizes), stride)


def check_workdir(workdir):
    """Creates `workdir` if needed and checks that a file can be written there. Object-store
    paths (gs://…) are left to their client."""
    path = epath.Path(workdir)
    if '://' in str(workdir):
        return
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f'--workdir {workdir} is a file, not a directory: choose another '
                             '--workdir')
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f'--workdir {workdir} cannot be written ({e.strerror or e}): choose a '
                         'writable --workdir') from None
