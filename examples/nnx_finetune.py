"""Fine-tune a ResNeXt as a Flax NNX module, and time the training step beside the Linen one.

    python examples/nnx_finetune.py [--init_from WORKDIR] [--steps 200] [--time_steps 50] \
        [--time_batch 2]

The network is the quick start's (`configs/quickstart.py`: a small ResNeXt on scikit-learn's
8×8 digits at 16×16), built with `resnext_jax.nnx.create_model`; with `--init_from` it starts
from a Linen workdir's weights (`python train.py --workdir=WORKDIR`), loaded without
conversion. It trains with `nnx.Optimizer` in the step `resnext_jax.nnx.train_step` builds:
the model and optimizer split once into a graph and a flat state, the step jitted over the
state. Then it times, on one batch, the median step of
  - that step (NNX, split once),
  - the same step under graph-mode `nnx.jit` (the module graph walked on every call),
  - a Linen step (`jax.jit` over params, statistics and optimizer state),
each to its finished result: on this tiny network the step's own computation is small, so the
differences are the host's per-step overhead.
"""
import argparse
import statistics
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, __file__.rsplit('/examples/', 1)[0])   # the repository: configs/, resnext_jax

from configs import quickstart                       # noqa: E402
from resnext_jax import convert, create_model, data, sources   # noqa: E402
import resnext_jax.nnx as rnnx                        # noqa: E402
from resnext_jax.image_settings import normalisation   # noqa: E402


def batches(config, batch_size, source):
    """Normalised float32 training batches of the digits."""
    mean, std = (np.asarray(v, np.float32) for v in normalisation(config))
    for batch in data.train_batches(config, batch_size, source=source):
        yield (batch['image'].astype(np.float32) - mean) / std, batch['label']


def median_ms(fn, steps):
    fn()                                   # compile
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--init_from', help='a Linen workdir of the quick start to start from')
    p.add_argument('--steps', type=int, default=200, help='fine-tuning steps')
    p.add_argument('--time_steps', type=int, default=50, help='steps timed per variant')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--time_batch', type=int, default=2,
                   help='images per timed step: few, so that the host overhead shows')
    args = p.parse_args()

    config = quickstart.get_config()
    source = sources.make_source(config)
    options = dict(config.model_options, form=config.form)
    model = rnnx.create_model(config.model, num_classes=source.num_classes, rngs=nnx.Rngs(0),
                              **options)
    if args.init_from:
        _, variables, _ = convert.load_model(args.init_from)
        rnnx.load_variables(model, variables)
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    # ---------------------------------------------------------------- fine-tune
    model.train()
    step, state = rnnx.train_step(model, optimizer)
    stream = batches(config, args.batch_size, source)
    for i in range(args.steps):
        x, y = next(stream)
        state, loss = step(state, x, y)
    nnx.update((model, optimizer), state)
    model.eval()
    mean, std = (np.asarray(v, np.float32) for v in normalisation(config))
    hits = total = 0
    for batch in data.eval_batches(config, 120, source=source):
        logits = model((batch['image'].astype(np.float32) - mean) / std)
        hits += int(((np.asarray(logits).argmax(-1) == batch['label']) * batch['mask']).sum())
        total += int(batch['mask'].sum())
    print(f'fine-tuned {args.steps} steps: loss {float(loss):.4f}, held-out top-1 '
          f'{100 * hits / total:.2f}% of {total}')

    # ---------------------------------------------------------------- time the steps
    x, y = (a[:args.time_batch] for a in next(stream))
    model.train()
    timings = {}
    step, state = rnnx.train_step(model, optimizer)

    def split_once():
        nonlocal state
        state, loss = step(state, x, y)
        jax.block_until_ready(loss)
    timings['NNX, split once (resnext_jax.nnx.train_step)'] = median_ms(split_once,
                                                                       args.time_steps)
    nnx.update((model, optimizer), state)

    @nnx.jit
    def graph_step(model, optimizer, x, y):
        value, grads = nnx.value_and_grad(lambda m: rnnx.cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return value
    timings['NNX, graph-mode nnx.jit'] = median_ms(
        lambda: jax.block_until_ready(graph_step(model, optimizer, x, y)), args.time_steps)

    linen = create_model(config.model, num_classes=source.num_classes, **options)
    variables = rnnx.variables(model)

    @jax.jit
    def linen_step(params, stats, opt_state, x, y):
        def loss(p):
            logits, new = linen.apply({'params': p, 'batch_stats': stats}, x, train=True,
                                      mutable=['batch_stats'])
            return rnnx.cross_entropy(logits, y), new['batch_stats']
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, value
    carry = [variables['params'], variables['batch_stats'], tx.init(variables['params'])]

    def linen_once():
        *carry[:], value = linen_step(*carry, x, y)
        jax.block_until_ready(value)
    timings['Linen, jax.jit over params, statistics, optimizer state'] = median_ms(
        linen_once, args.time_steps)
    arrays = len(jax.tree_util.tree_leaves(nnx.state((model, optimizer))))
    print(f'median step over {args.time_steps} calls, batch {args.time_batch}, '
          f'{arrays} arrays of state, {jax.devices()[0].device_kind}:')
    for name, ms in timings.items():
        print(f'  {ms:8.2f} ms  {name}')


if __name__ == '__main__':
    main()
