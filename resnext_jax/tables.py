"""The paper's tables, regenerated from the modules, and our results beside the paper's.

    python -m resnext_jax.tables [--json]                 # Tables 1, 2, 7 and complexities
    python -m resnext_jax.tables --results runs/*         # accuracy tables from workdirs
    python -m resnext_jax.tables --rows table3            # recipe ids of a table's rows

Architecture figures come from building each registered network with `jax.eval_shape` (no real
initialisation). Multiply-adds are counted as the paper's "FLOPs" (Sec. 3.1): one per weight
use in every convolution and the classifier, from the traced computation of the grouped form;
batch norm, ReLU, pooling and additions are not counted. The paper prints 3 significant digits
(e.g. 25.5×10⁶); a figure agrees when it is within one unit of the last printed digit.

Accuracy rows: every row of Tables 3, 4, 5 and 7 and the Fig. 7 CIFAR series is a recipe,
`python train.py --config=configs/paper.py:ROW`, whose config `name` is the row id; `--results`
matches workdirs to rows by the `name` in their `config.json`. A run fills its row only if it
trained the row's recipe: the same network, dataset and splits, image and evaluation sizes,
augmentation family and schedule (`COMPARED`); otherwise its line says what differs
(`not comparable: dataset folder:…, image_size 64`). The modern recipes
(`MODERN_ROWS`, `configs/modern.py:ROW`) are reported the same way beside their published
top-1 and top-5 (torchvision's weight metadata, timm's results-imagenet.csv); rows whose recipe
keeps an EMA report the EMA weights, as the published ones are.
"""
import dataclasses
import json
import math
import sys

from etils import epath

from resnext_jax import cli
from resnext_jax import metrics as metrics_lib
from resnext_jax.summary import summarize


@dataclasses.dataclass(frozen=True)
class Row:
    """One accuracy row of the paper: error in % (None: not printed), on the eval split."""
    id: str
    table: str
    model: str
    dataset: str
    label: str
    top1_err: float | None = None
    top5_err: float | None = None
    eval_size: int | None = None   # test crop when not the training size
    provided: bool = True          # False: a network this project does not implement
    ema: bool = False              # ours: the EMA weights' accuracy (the recipe keeps an EMA)


def _imagenet(table, model, label, top1, top5=None, **kw):
    return Row(f'{table}_{model}' + (f'_{kw["eval_size"]}' if 'eval_size' in kw else ''),
               table, model, 'imagenet2012', label, top1, top5, **kw)


ROWS = [
    # Table 3: ablation at preserved complexity (top-1 error, 224 single crop).
    _imagenet('table3', 'resnet50', 'ResNet-50 1×64d', 23.9),
    _imagenet('table3', 'resnext50_2x40d', 'ResNeXt-50 2×40d', 23.0),
    _imagenet('table3', 'resnext50_4x24d', 'ResNeXt-50 4×24d', 22.6),
    _imagenet('table3', 'resnext50_8x14d', 'ResNeXt-50 8×14d', 22.3),
    _imagenet('table3', 'resnext50_32x4d', 'ResNeXt-50 32×4d', 22.2),
    _imagenet('table3', 'resnet101', 'ResNet-101 1×64d', 22.0),
    _imagenet('table3', 'resnext101_2x40d', 'ResNeXt-101 2×40d', 21.7),
    _imagenet('table3', 'resnext101_4x24d', 'ResNeXt-101 4×24d', 21.4),
    _imagenet('table3', 'resnext101_8x14d', 'ResNeXt-101 8×14d', 21.3),
    _imagenet('table3', 'resnext101_32x4d', 'ResNeXt-101 32×4d', 21.2),
    # Table 4: 2× the complexity of ResNet-101 (its 1× references are the Table 3 rows).
    _imagenet('table4', 'resnet200', 'ResNet-200 1×64d', 21.7, 5.8),
    _imagenet('table4', 'resnet101_1x100d', 'ResNet-101, wider 1×100d', 21.3, 5.7),
    _imagenet('table4', 'resnext101_2x64d', 'ResNeXt-101 2×64d', 20.7, 5.5),
    _imagenet('table4', 'resnext101_64x4d', 'ResNeXt-101 64×4d', 20.4, 5.3),
    # Table 5: the 64×4d network tested on a 320×320 crop (trained at 224 as in Table 4).
    _imagenet('table5', 'resnext101_64x4d', 'ResNeXt-101 64×4d, 320×320 test', 19.1, 4.4,
              eval_size=320),
    # Table 7: CIFAR test error.
    Row('table7_cifar_wide_resnet', 'table7', 'wide_resnet_28_10', 'cifar10/100',
        'Wide ResNet (36.5M)', None, None, provided=False),
]
for _ds, _errs in (('cifar10', (3.65, 3.58)), ('cifar100', (17.77, 17.31))):
    for _c, _err in zip((8, 16), _errs):
        ROWS.append(Row(f'table7_{_ds}_resnext29_{_c}x64d', 'table7', f'resnext29_{_c}x64d',
                        _ds, f'ResNeXt-29 {_c}×64d, {_ds.upper()}', _err))
# Fig. 7: CIFAR-10 error against cardinality at d = 64 (plotted only: no printed numbers).
for _c in (1, 2, 4, 8, 16):
    ROWS.append(Row(f'fig7_cifar10_resnext29_{_c}x64d', 'fig7', f'resnext29_{_c}x64d', 'cifar10',
                    f'ResNeXt-29 {_c}×64d, CIFAR-10'))
ROW_IDS = {r.id: r for r in ROWS}
# Modern recipes (configs/modern.py), published error = 100 − published top-1 / top-5:
# torchvision: the weights' metadata in torchvision/models/resnet.py (ResNeXt-101 64×4d's
# IMAGENET1K_V1 was trained with the V2 recipe, pytorch/vision PR 5935); RSB (timm "ResNet
# strikes back", arXiv 2110.00476): timm's results/results-imagenet.csv, `resnext50_32x4d.aN_in1k`
# at 224 (crop 0.95, the recipe's own test) and, for A1 and A2, at 288 (crop 1.0, timm's
# test_input_size).
MODERN_ROWS = [
    Row('torchvision_v2_resnext50_32x4d', 'torchvision', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, torchvision V2', 18.802, 4.660, ema=True),
    Row('torchvision_v2_resnext101_32x8d', 'torchvision', 'resnext101_32x8d', 'imagenet2012',
        'ResNeXt-101 32×8d, torchvision V2', 17.166, 3.772, ema=True),
    Row('torchvision_v2_resnext101_64x4d', 'torchvision', 'resnext101_64x4d', 'imagenet2012',
        'ResNeXt-101 64×4d, torchvision V2', 16.754, 3.546, ema=True),
    Row('rsb_a1_resnext50_32x4d', 'rsb', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, RSB A1', 19.474, 5.542),
    Row('rsb_a1_resnext50_32x4d_288', 'rsb', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, RSB A1, 288 test', 18.520, 4.848, eval_size=288),
    Row('rsb_a2_resnext50_32x4d', 'rsb', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, RSB A2', 19.556, 5.370),
    Row('rsb_a2_resnext50_32x4d_288', 'rsb', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, RSB A2, 288 test', 18.696, 4.886, eval_size=288),
    Row('rsb_a3_resnext50_32x4d', 'rsb', 'resnext50_32x4d', 'imagenet2012',
        'ResNeXt-50 32×4d, RSB A3', 20.742, 5.692),
]
MODERN_ROW_IDS = {r.id: r for r in MODERN_ROWS}
# Rows that are the same run as another: Fig. 7's 8× and 16×64d points are Table 7's runs.
ALIASES = {'fig7_cifar10_resnext29_8x64d': 'table7_cifar10_resnext29_8x64d',
           'fig7_cifar10_resnext29_16x64d': 'table7_cifar10_resnext29_16x64d'}

# Complexity as printed: (#params, multiply-adds), in units of the last printed digit.
PRINTED = {
    'resnet50': (25.5e6, 4.1e9), 'resnext50_32x4d': (25.0e6, 4.2e9),           # Table 1
    'resnext29_8x64d': (34.4e6, None), 'resnext29_16x64d': (68.1e6, None),     # Table 7
}
PRINTED_UNIT = {'params': 0.1e6, 'macs': 0.1e9}
# Table 3/4 captions: preserved complexity ~4.1 (50-layer), ~7.8 (101-layer) billion FLOPs;
# Table 4: about 2× ResNet-101's.
TABLE_COMPLEXITY = {'table3_50': 4.1e9, 'table3_101': 7.8e9, 'table4': 2 * 7.8e9}
TABLE2 = [(1, 64), (2, 40), (4, 24), (8, 14), (32, 4)]   # (C, d) at ~70k block parameters
TABLE2_WIDTHS = [64, 80, 96, 112, 128]                    # as printed


def _agrees(ours, printed, unit):
    """Within one unit of the last printed digit (the paper both rounds and truncates)."""
    return abs(ours - printed) < unit + 1e-9 * printed


def eq4(c, d, features=256):
    """Parameters of a conv2-stage block by Eq. 4: C·(256·d + 3·3·d·d + d·256)."""
    return c * (features * d + 9 * d * d + d * features)


def architecture():
    """Tables 1, 2, 7 (#params) and the complexity of the Table 3–5 networks, from the code."""
    cache = {}

    def s(name):
        if name not in cache:
            cache[name] = summarize(name)
        return cache[name]

    def compare(name):
        out = dict(model=name, params=s(name)['params'], macs=s(name)['macs'])
        printed = PRINTED.get(name)
        if printed:
            for key, value in zip(('params', 'macs'), printed):
                if value is not None:
                    out[f'paper_{key}'] = value
                    out[f'{key}_diff'] = out[key] - value
                    out[f'{key}_agrees'] = _agrees(out[key], value, PRINTED_UNIT[key])
        return out

    table1 = []
    for name in ('resnet50', 'resnext50_32x4d'):
        row = compare(name)
        row['stages'] = [dict(layer=r['layer'], output=r['output'], blocks=r['blocks'],
                              block=r['block'], params=r['params'], macs=r['macs'])
                         for r in s(name)['rows']]
        table1.append(row)

    from resnext_jax.models import create_model  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    table2 = []
    for (c, d), printed_width in zip(TABLE2, TABLE2_WIDTHS):
        model = create_model(f'resnext50_{c}x{d}d' if c > 1 else 'resnet50')
        shapes = jax.eval_shape(model.init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
        block = shapes['params']['stage1']['block2']['aggregated']
        convs = sum(math.prod(block[k]['kernel'].shape) for k in ('conv1', 'conv2', 'conv3'))
        table2.append(dict(cardinality=c, bottleneck_width=d, group_conv_width=c * d,
                           paper_group_conv_width=printed_width, block_params=convs,
                           eq4_params=eq4(c, d)))

    complexity = []
    for r in ROWS:
        if r.table not in ('table3', 'table4'):  # Table 5 is Table 4's network; CIFAR above
            continue
        row = compare(r.model) | {'row': r.id}
        ref = TABLE_COMPLEXITY['table4' if r.table == 'table4' else
                               'table3_50' if r.model.split('_')[0].endswith('50') else
                               'table3_101']
        row['paper_complexity_class'] = ref
        row['macs_over_class'] = row['macs'] / ref
        complexity.append(row)
    return dict(table1=table1, table2=table2, table7=[compare('resnext29_8x64d'),
                                                       compare('resnext29_16x64d')],
                complexity=complexity,
                flops_counting='multiply-adds of every convolution and the classifier, one '
                               'per weight use, grouped form; BN, ReLU, pooling, additions '
                               'not counted (paper Sec. 3.1)')


def _m(x):
    return f'{x / 1e6:.2f}M'


def _g(x):
    return f'{x / 1e9:.2f}G'


def format_architecture(a):
    out = ['Table 1. ResNet-50 vs ResNeXt-50 (32×4d), 224×224 input']
    names = [r['model'] for r in a['table1']]
    out.append(f"{'stage':8} {'output':>12}  {names[0]:34} {names[1]}")
    for s0, s1 in zip(a['table1'][0]['stages'], a['table1'][1]['stages']):
        def spec(st):
            b = st['block']
            if not b:
                return {'stem': '7×7, 64, /2; 3×3 max pool, /2',
                        'head': 'global avg pool, 1000-d fc'}.get(st['layer'], '')
            c = f", C={b['cardinality']}" if b['cardinality'] > 1 else ''
            return f"[1×1, {b['width']}; 3×3, {b['width']}{c}; 1×1, {b['features']}] ×{st['blocks']}"
        out.append(f"{s0['layer']:8} {'×'.join(map(str, s0['output'])):>12}  {spec(s0):34} "
                   f"{spec(s1)}")
    for key, fmt in (('params', _m), ('macs', _g)):
        cells = [f"{fmt(r[key])} (paper {fmt(r['paper_' + key])}, "
                 f"{'agrees' if r[key + '_agrees'] else 'DIFFERS'})" for r in a['table1']]
        out.append(f"{'# ' + key:8} {'':>12}  {cells[0]:34} {cells[1]}")
    out += ['', 'Table 2. Cardinality vs width at preserved complexity (conv2 block)',
            f"{'C':>3} {'d':>4} {'group width':>12} {'paper':>6} {'block params':>13} {'Eq. 4':>8}"]
    for r in a['table2']:
        out.append(f"{r['cardinality']:>3} {r['bottleneck_width']:>4} "
                   f"{r['group_conv_width']:>12} {r['paper_group_conv_width']:>6} "
                   f"{r['block_params']:>13,} {r['eq4_params']:>8,}")
    out += ['', 'Table 7. CIFAR networks, #params']
    for r in a['table7']:
        out.append(f"{r['model']:18} {r['params']:>12,}  {_m(r['params'])} (paper "
                   f"{_m(r['paper_params'])}, {'agrees' if r['params_agrees'] else 'DIFFERS'})"
                   f"   {_g(r['macs'])} multiply-adds")
    out += ['', 'Complexity of the Table 3-5 networks (224×224; Table 5 is the Table 4 64×4d)',
            f"{'row':34} {'params':>12} {'mult-adds':>16}  paper"]
    for r in a['complexity']:
        ref = f"~{_g(r['paper_complexity_class'])} class ({r['macs_over_class']:.2f}×)"
        out.append(f"{r['row']:34} {r['params']:>12,} {r['macs']:>16,}  {ref}")
    out += ['', f"FLOPs: {a['flops_counting']}."]
    return '\n'.join(out)


# --------------------------------------------------------------------------- results report

# What a run must share with its row's recipe to count as a reproduction of it.
COMPARED = ('model', 'model_options', 'dataset', 'train_split', 'eval_split', 'image_size',
            'eval_image_size', 'eval_resize', 'augment', 'schedule', 'num_epochs',
            'num_train_steps')


def recipe(row_id):
    """The config of a row's recipe (configs/paper.py or configs/modern.py), as JSON; None where
    the configs/ folder is not importable (run the tool from the repository)."""
    try:
        from configs import modern, paper   # noqa: PLC0415 (they import this module)
    except ImportError:
        return None
    config = (modern if row_id in MODERN_ROW_IDS else paper).get_config(row_id)
    return json.loads(config.to_json_best_effort())


def differences(config, row_id):
    """['FIELD value', ...]: where a run's config (config.json) differs from its row's recipe in
    `COMPARED`; ['recipe unknown …'] where configs/ cannot be read."""
    expected = recipe(row_id)
    if expected is None:
        return ['recipe unknown (run from the repository, where configs/ is)']
    return [f'{k} {config.get(k)}' for k in COMPARED if config.get(k) != expected.get(k)]


def read_run(workdir):
    """{'name', 'workdir', 'config', 'top1', 'top5', 'step', 'num_steps', 'finished'}: the run's
    config.json and its last eval."""
    workdir = epath.Path(workdir)
    config = json.loads((workdir / 'config.json').read_text())
    evals = []
    metrics = workdir / 'metrics.jsonl'
    if metrics.exists():
        evals = [r for r, _ in metrics_lib.read_lines(metrics.read_text(), metrics)
                 if r['split'] == 'eval']
    last = evals[-1] if evals else {}
    return dict(name=config.get('name', ''), workdir=str(workdir), config=config,
                top1=last.get('top1'),
                top5=last.get('top5'), ema_top1=last.get('ema_top1'),
                ema_top5=last.get('ema_top5'), step=last.get('step'),
                num_steps=last.get('num_steps'),
                finished=bool(last) and last['step'] >= last['num_steps'])


def results(workdirs):
    runs = {}
    for w in workdirs:
        try:
            run = read_run(w)
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ValueError(f'{w} is not a training workdir ({e}); pass directories that '
                             'train.py wrote') from None
        if run['name'] not in ROW_IDS and run['name'] not in MODERN_ROW_IDS:
            raise ValueError(
                f"{w} is not a run of a paper row or modern recipe (its recipe name is "
                f"{run['name']!r}); pass workdirs trained with --config=configs/paper.py:ROW "
                'or configs/modern.py:ROW (python -m resnext_jax.tables --rows lists them)')
        runs[run['name']] = run
    rows = []
    for r in ROWS + MODERN_ROWS:
        run = runs.get(r.id) or runs.get(ALIASES.get(r.id, ''))
        ours = {}
        prefix = 'ema_' if r.ema else ''
        differs = differences(run['config'], r.id) if run else []
        if differs:   # another dataset, size or schedule: no reproduction of the row
            ours = dict(status=f"not comparable: {', '.join(differs)}", differs=differs,
                        workdir=run['workdir'])
        elif run and run[prefix + 'top1'] is not None:
            ours = dict(top1_err=round(100 * (1 - run[prefix + 'top1']), 2),
                        top5_err=round(100 * (1 - run[prefix + 'top5']), 2),
                        status='done' if run['finished'] else
                        f"running (step {run['step']}/{run['num_steps']})",
                        workdir=run['workdir'])
        status = ('not provided' if not r.provided else ours.get('status', 'not run'))
        if r.ema and ours and not differs:
            status += ', EMA weights'
        rows.append(dict(row=r.id, table=r.table, label=r.label, dataset=r.dataset,
                         paper_top1_err=r.top1_err, paper_top5_err=r.top5_err,
                         **{k: v for k, v in ours.items() if k != 'status'}, status=status))
    return rows


def format_results(rows):
    def f(v):
        return '—' if v is None else f'{v:.2f}'
    out = [f"{'table':11} {'network':38} {'top-1 err':>19} {'top-5 err':>19}  status",
           f"{'':11} {'':38} {'published':>9} {'ours':>9} {'published':>9} {'ours':>9}"]
    for r in rows:
        out.append(f"{r['table']:11} {r['label']:38} {f(r['paper_top1_err']):>9} "
                   f"{f(r.get('top1_err')):>9} {f(r['paper_top5_err']):>9} "
                   f"{f(r.get('top5_err')):>9}  {r['status']}")
    return '\n'.join(out)


def main(argv=None):
    p = cli.ArgumentParser(prog='python -m resnext_jax.tables',
                           description=__doc__.split('\n\n')[0])
    p.add_argument('--json', action='store_true', help='print JSON instead of the tables')
    p.add_argument('--results', nargs='+', metavar='RUN_DIR',
                   help='workdirs of paper runs: print the accuracy tables with our results')
    p.add_argument('--rows', nargs='*', metavar='TABLE',
                   help='print the ids of the recipes (configs/paper.py:ID, '
                        'configs/modern.py:ID) of these tables (table3, table4, table5, table7, '
                        'fig7, torchvision, rsb; default: all), one per line')
    args = p.parse_args(argv)
    if args.rows is not None:
        unknown = sorted(set(args.rows) - {r.table for r in ROWS + MODERN_ROWS})
        if unknown:
            p.exit(1, f'error: --rows: unknown table {unknown[0]!r}; use table3, table4, table5, '
                      'table7, fig7, torchvision or rsb\n')
        print('\n'.join(r.id for r in ROWS + MODERN_ROWS if r.provided and r.id not in ALIASES
                        and (not args.rows or r.table in args.rows)))
        return
    if args.results:
        for w in args.results:
            path = epath.Path(w)
            if '://' not in w and not path.is_dir():
                what = 'is a file, not a directory' if path.exists() else 'does not exist'
                sys.exit(f'error: --results {w} {what}: pass the workdirs that train.py wrote')
        try:
            rows = results(args.results)
        except ValueError as e:
            sys.exit(f'error: {e}')
        print(json.dumps(rows, indent=1) if args.json else format_results(rows))
        return
    a = architecture()
    print(json.dumps(a, indent=1) if args.json else format_architecture(a))


if __name__ == '__main__':
    main()
