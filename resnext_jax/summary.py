"""Parameter and multiply-add counts of a network, per stage, without running it.

    python -m resnext_jax.summary resnext50_32x4d [--image-size 224] [--json]
    python -m resnext_jax.summary --all
    python -m resnext_jax.summary --pretrained    # the published weights loadable by name

Multiply-adds are counted as in the paper (Sec. 3.1, "FLOPs, as multiply-adds"): every
convolution and the final fully-connected layer, one per weight use, read off the traced
computation (`jax.make_jaxpr`) with the grouped form. Batch norm, ReLU, pooling and the
residual additions are not counted. Nothing is computed: shapes come from `jax.eval_shape`.
"""
import json
import math
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from resnext_jax import cli
from resnext_jax.models import create_model, list_models, model_spec


def count_params(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _eqn_macs(eqn):
    if eqn.primitive.name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        out_dim = eqn.params['dimension_numbers'].rhs_spec[0]
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_dim]
    if eqn.primitive.name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
    return 0


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for q in (p if isinstance(p, (tuple, list)) else (p,)):
            if hasattr(q, 'eqns'):
                yield q
            elif hasattr(q, 'jaxpr') and hasattr(q.jaxpr, 'eqns'):
                yield q.jaxpr


def macs_by_scope(fn, *args, depth=1, **kwargs):
    """Multiply-adds of `fn(*args)` keyed by the first `depth` Flax module names of each op."""
    totals = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            n = _eqn_macs(eqn)
            if n:
                scope = '/'.join(str(eqn.source_info.name_stack).split('/')[1:1 + depth])
                totals[scope] = totals.get(scope, 0) + n
            for sub in _subjaxprs(eqn):
                walk(sub)

    walk(jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args).jaxpr)
    return totals


def summarize(name, image_size=None, **overrides):
    """Per-stage output shape, blocks, parameters and multiply-adds of a registered network."""
    model = create_model(name, form='grouped', **overrides)
    if image_size is None:
        image_size = 32 if model.stem == 'cifar' else 224
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and len(context.module.scope.path) == 1:
            shapes[context.module.name] = tuple(out.shape)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)
    macs = macs_by_scope(model.apply, variables, x)
    rows = []
    for layer, shape in shapes.items():
        m = re.fullmatch(r'stage(\d+)', layer)
        s = int(m.group(1)) - 1 if m else None
        rows.append(dict(
            layer=layer, output=list(shape[1:]), params=count_params(variables['params'][layer]),
            macs=macs.get(layer, 0),
            blocks=model.stage_sizes[s] if m else None,
            block=None if not m else dict(
                width=model.cardinality * model.bottleneck_width * 2**s,
                cardinality=model.cardinality, features=model.base_features * 2**s)))
    return dict(model=name, image_size=image_size, rows=rows,
                params=count_params(variables['params']), macs=sum(macs.values()))


def format_summary(s):
    lines = [f"{s['model']}  ({s['image_size']}×{s['image_size']} input)",
             f"{'layer':<8} {'output':>16} {'block [1×1; 3×3 grouped; 1×1] × n':<38}"
             f"{'params':>13} {'mult-adds':>15}"]
    for r in s['rows']:
        b = r['block']
        spec = (f"[{b['width']}; {b['width']}, C={b['cardinality']}; {b['features']}] × "
                f"{r['blocks']}") if b else ''
        lines.append(f"{r['layer']:<8} {'×'.join(map(str, r['output'])):>16} {spec:<38}"
                     f"{r['params']:>13,} {r['macs']:>15,}")
    lines.append(f"{'total':<8} {'':>16} {'':<38}{s['params']:>13,} {s['macs']:>15,}"
                 f"   ({s['params'] / 1e6:.1f}M params, {s['macs'] / 1e9:.2f} GFLOPs)")
    return '\n'.join(lines)


def format_pretrained(rows):
    """`pretrained.table()` as text: one line per published weight."""
    def pct(x):
        return f'{x:6.2f}' if x is not None else '     –'
    lines = [f"{'name':<42} {'network':<22} {'params':>8} {'top-1':>6} {'top-5':>6} "
             f"{'train':>5} {'test':>4} {'resize':>6} {'interp.':<8} licence"]
    for r in rows:
        options = ' ' + ','.join(f'{k}={v}' for k, v in r['options'].items()) * bool(r['options'])
        lines.append(f"{r['name']:<42} {(r['model'] + options):<22} {r['params_m']:>7.2f}M "
                     f"{pct(r['top1'])} {pct(r['top5'])} {r['train_size']:>5} "
                     f"{r['test_size']:>4} {r['resize']:>6} {r['interpolation']:<8} "
                     f"{r['licence']}")
    lines.append(f'{len(rows)} weights: timm/<name>/model.safetensors on the Hugging Face Hub; '
                 'top-1 / top-5 (%) at the test size, from timm\'s results-imagenet.csv')
    return '\n'.join(lines)


def main(argv=None):
    parser = cli.ArgumentParser(prog='python -m resnext_jax.summary',
                                description=__doc__.splitlines()[0])
    parser.add_argument('names', nargs='*', help='network names (see --list)')
    parser.add_argument('--all', action='store_true', help='every registered network')
    parser.add_argument('--list', action='store_true', help='print the registered names')
    parser.add_argument('--pretrained', action='store_true',
                        help='the published ImageNet weights loadable by name '
                        '(resnext_jax.load_pretrained, init_from, predict, export, convert)')
    parser.add_argument('--image-size', type=cli.integer(1),
                        help='input height and width; default: 224 ImageNet, 32 CIFAR')
    parser.add_argument('--num-classes', type=cli.integer(1),
                        help="classifier outputs; default: the network's (1000 or 10)")
    parser.add_argument('--json', action='store_true', help='one JSON object per network')
    args = parser.parse_args(argv)
    if args.list:
        print('\n'.join(list_models()))
        return
    if args.pretrained:
        from resnext_jax import pretrained   # noqa: PLC0415
        rows = pretrained.table()
        print('\n'.join(json.dumps(r) for r in rows) if args.json else format_pretrained(rows))
        return
    names = list_models() if args.all else args.names
    if not names:
        parser.error('name a network (e.g. resnext50_32x4d), or pass --all or --list')
    for name in names:
        try:
            model_spec(name)
        except ValueError as e:
            parser.exit(1, f'error: {e}\n')
    for name in names:
        s = summarize(name, args.image_size, num_classes=args.num_classes)
        print(json.dumps(s) if args.json else format_summary(s) + '\n')


if __name__ == '__main__':
    main()
