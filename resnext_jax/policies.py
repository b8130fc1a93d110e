"""The automatic-augmentation policies a config names (`auto_augment`), as data: timm's
RandAugment (`rand-m9-n2-mstd0.5`, timm/data/auto_augment.py) and torchvision's
TrivialAugment-Wide ('ta_wide', torchvision/transforms/autoaugment.py), their op lists and
constants. Both implementations read them: the host's TensorFlow ops (`resnext_jax.autoaugment`)
and the device's JAX ops (`resnext_jax.augment`). No TensorFlow here, so a config is checked
without it.

Where `parse` differs from timm: timm reads `inc0` as increasing (it tests `bool('0')`) and
ignores sections without a number; `parse` reads `inc0` as off and refuses such sections, and
the transform-set key `t` (weighted sets) is not supported.
"""
import dataclasses
import math
import re

LEVEL_DENOM = 10.0          # timm `_LEVEL_DENOM`: magnitude M maps to level M / 10
TIMM_FILL = (128, 128, 128)  # timm `_FILL`, the fill without `img_mean`
# timm `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (`inc1`), in timm's order.
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel')
RAND_INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                       'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                       'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
# torchvision `TrivialAugmentWide._augmentation_space`, in its order (no Invert).
TA_WIDE_OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate',
               'Brightness', 'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize',
               'AutoContrast', 'Equalize')
TA_WIDE_BINS = 31           # torchvision's default num_magnitude_bins


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with
    probability `prob`, at `magnitude` (0..`magnitude_max`) plus N(0, magnitude_std) noise drawn
    per op (uniform in [0, magnitude] when magnitude_std is inf), clipped to [0, magnitude_max].
    Defaults are timm's `rand_augment_transform`: m10, n2, p0.5, mstd0, mmax10, inc0."""
    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: int = 10
    increasing: bool = False

    @property
    def ops(self):
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


@dataclasses.dataclass(frozen=True)
class TrivialAugmentWide:
    """torchvision's TrivialAugment-Wide: one op of TA_WIDE_OPS, uniformly, at one of 31
    magnitude bins, uniformly, with a random sign for signed ops; fill 0, nearest sampling
    (the class defaults)."""
    num_bins: int = TA_WIDE_BINS


# timm `rand_augment_transform`'s numeric keys and their types.
_RAND_KEYS = {'m': int, 'n': int, 'p': float, 'mstd': float, 'mmax': int, 'inc': int}


def parse(spec):
    """The policy that config field `auto_augment` names: None for '', TrivialAugmentWide for
    'ta_wide', RandAugment for 'rand-KEYVALUE-...' in timm's notation (keys m, n, p, mstd,
    mmax, inc; mstd > 100 means uniform, as in timm). TypeError if not a string, ValueError
    saying why for anything else."""
    if not isinstance(spec, str):
        raise TypeError(f'auto_augment {spec!r} is not a string')
    if spec == '':
        return None
    if spec == 'ta_wide':
        return TrivialAugmentWide()
    name, *sections = spec.split('-')
    if name != 'rand':
        raise ValueError(f"auto_augment {spec!r}: unknown policy {name!r}; expected '', "
                         "'ta_wide' or 'rand-...' (e.g. 'rand-m9-n2-mstd0.5')")
    values = {}
    for section in sections:
        match = re.fullmatch(r'([a-z]*)([0-9].*)', section)
        if not match:
            raise ValueError(f'auto_augment {spec!r}: section {section!r} is not a key and a '
                             f'number (keys {", ".join(_RAND_KEYS)}; e.g. m9)')
        key, text = match.groups()
        if key not in _RAND_KEYS:
            raise ValueError(f'auto_augment {spec!r}: unknown key {key!r} in {section!r} '
                             f'(keys {", ".join(_RAND_KEYS)})')
        if key in values:
            raise ValueError(f'auto_augment {spec!r}: key {key!r} is given twice')
        kind = _RAND_KEYS[key]
        try:
            values[key] = kind(text)
        except ValueError:
            raise ValueError(f'auto_augment {spec!r}: {text!r} in {section!r} is not '
                             f'{"an integer" if kind is int else "a number"}') from None
    m, n, p = values.get('m', 10), values.get('n', 2), values.get('p', 0.5)
    mstd, mmax, inc = values.get('mstd', 0.0), values.get('mmax', 10), values.get('inc', 0)
    if n < 1:
        raise ValueError(f'auto_augment {spec!r}: n{n} must be ≥ 1 (ops per image)')
    if not 0 <= p <= 1:
        raise ValueError(f'auto_augment {spec!r}: p{p} must be in [0, 1] (probability per op)')
    if not math.isfinite(mstd):
        raise ValueError(f'auto_augment {spec!r}: mstd{mstd} is not finite (> 100 is uniform)')
    if mmax < 1:
        raise ValueError(f'auto_augment {spec!r}: mmax{mmax} must be ≥ 1')
    if inc not in (0, 1):
        raise ValueError(f'auto_augment {spec!r}: inc{inc} must be 0 or 1')
    return RandAugment(magnitude=m, num_layers=n, prob=p,
                       magnitude_std=math.inf if mstd > 100 else mstd,  # timm: > 100: uniform
                       magnitude_max=mmax, increasing=bool(inc))
