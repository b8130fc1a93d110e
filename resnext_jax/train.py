"""Training and evaluation: one jitted step over a mesh of every device of every process.

config → model + sharded state → per-process input → global batch → jitted step → metrics and
checkpoints. `train_and_evaluate(config, workdir)` is the whole run; it resumes from the newest
complete checkpoint in `workdir`, including the input position.
"""
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from resnext_jax import checkpoint, data, parallel, preprocess, sources, validate
from resnext_jax.metrics import MetricsWriter
from resnext_jax.models import create_model


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------

def build_model(config, num_classes):
    return create_model(
        config.model, num_classes=num_classes, form=config.form, dtype=config.dtype,
        zero_init_last_bn=config.zero_init_last_bn, bn_group_size=config.bn_group_size or None,
        **dict(config.model_options))


def learning_rate_schedule(config, steps_per_epoch, num_steps):
    """Linear scaling by global batch, optional linear warm-up, then step or cosine decay."""
    base = config.learning_rate * config.batch_size / config.lr_base_batch_size
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == 'step':
        decay = optax.piecewise_constant_schedule(base, {
            int(e * steps_per_epoch) - warmup: config.lr_decay_factor
            for e in config.lr_boundaries_epochs})
    elif config.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(base, max(num_steps - warmup, 1))
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; use 'step' or 'cosine'")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def create_optimizer(config, schedule):
    """SGD with momentum and L2 weight decay added to the gradient, as PyTorch's SGD does."""
    mask = None if config.decay_bn_and_bias else (
        lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params))
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))


# ------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------

def cross_entropy(logits, labels, smoothing=0.0):
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def normalise(images, mean, std):
    """The input pipeline's uint8 or bfloat16 pixels → the float32 (x − mean) / std the network
    sees: the last step of `preprocess.preprocess_fn`, done on the device. Images pass through
    unchanged when `mean` is None (callers that feed normalised float images)."""
    if mean is None:
        return images
    return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
        std, jnp.float32)


def _gathered(params, gather):
    """With FSDP (`gather`: a replicated sharding), the parameters gathered where they are used:
    otherwise XLA may gather a layer's global-batch activations against a split weight."""
    return params if gather is None else jax.lax.with_sharding_constraint(params, gather)


def train_step(state, batch, *, model, tx, label_smoothing=0.0, gather=None, mean=None,
               std=None):
    """One SGD step on `batch`: uint8 images normalised with `mean`, `std` (float images as
    they are when `mean` is None)."""
    images = normalise(batch['image'], mean, std)

    def loss_fn(params):
        logits, updates = model.apply(
            {'params': _gathered(params, gather), 'batch_stats': state.batch_stats},
            images, train=True, mutable=['batch_stats'])
        loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
        return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return state, {'loss': loss, 'top1': top1}


def eval_step(state, batch, *, model, gather=None, mean=None, std=None):
    """Sums over the examples whose mask is 1: loss, top-1 and top-5 hits, count."""
    logits = model.apply({'params': _gathered(state.params, gather),
                          'batch_stats': state.batch_stats},
                         normalise(batch['image'], mean, std), train=False)
    mask, labels = batch['mask'], batch['label']
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    hits = topk == labels[:, None]
    return {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
            'top1': jnp.sum(hits[:, 0] * mask),
            'top5': jnp.sum(jnp.any(hits, -1) * mask),
            'num_examples': jnp.sum(mask)}


def evaluate(eval_fn, state, config, local_batch, mesh, source):
    totals = None
    for batch in data.eval_batches(config, local_batch, process_index=jax.process_index(),
                                   process_count=jax.process_count(), source=source):
        sums = eval_fn(state, parallel.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.tree_util.tree_map(lambda x: float(np.asarray(x)), jax.device_get(totals))
    n = totals['num_examples']
    return {'loss': totals['loss'] / n, 'top1': totals['top1'] / n, 'top5': totals['top5'] / n,
            'num_examples': int(n)}


def make_init(config, model, tx):
    """rng → the initial `TrainState` (jit it with `out_shardings` to create it sharded)."""
    def init(rng):
        shape = (1, config.image_size, config.image_size, 3)
        variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
        params = variables['params']
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))
    return init


def state_layout(config, model, tx, mesh):
    """(init, abstract state, shardings) of a run over `mesh`: the initial-state function, its
    shapes and dtypes, and where each array lives (replicated, or split with `fsdp`)."""
    init = make_init(config, model, tx)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh, fsdp=config.fsdp,
                                         min_size=config.fsdp_min_size)
    return init, abstract, shardings


def make_steps(config, model, tx, mesh, shardings):
    """The jitted (train_step, eval_step) of a run over `mesh`, the state placed by `shardings`
    and donated to the train step, the batch split over 'data'. `train_and_evaluate` runs them
    and `python -m resnext_jax.plan` compiles them for TPU topologies. Call or lower them inside
    `jax.set_mesh(mesh)`: the aggregated 3×3 convolutions then run on each device's own share
    of the batch (`parallel.per_device`)."""
    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    gather = repl if config.fsdp else None
    mean, std = preprocess.normalisation(config)   # the pipeline sends unnormalised pixels
    p_train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, label_smoothing=config.label_smoothing,
                          gather=gather, mean=mean, std=std),
        in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl), donate_argnums=0)
    p_eval = jax.jit(functools.partial(eval_step, model=model, gather=gather, mean=mean, std=std),
                     in_shardings=(shardings, batch_sh), out_shardings=repl)
    return p_train, p_eval


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

class Profile:
    """`profile_steps='A:B'`: a `jax.profiler` trace of steps A to B - 1 in `directory` (the
    workdir's TensorBoard directory: its Profile tab shows it), written by process 0."""

    def __init__(self, steps, directory, enabled):
        first, _, last = steps.partition(':')
        self.first, self.last = (int(first), int(last)) if steps and enabled else (0, 0)
        self.directory, self.tracing = directory, False

    def step(self, step, state):
        """Call before running `step`; `state` is what the steps before it computed."""
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True
        elif step == self.last and self.tracing:
            self._stop(state)

    def _stop(self, state):
        jax.block_until_ready(state)   # the traced steps' work, not only their dispatch
        jax.profiler.stop_trace()
        self.tracing = False
        logging.info('profile of steps %d to %d written to %s', self.first, self.last - 1,
                     self.directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tracing:   # the run ended inside the range
            jax.profiler.stop_trace()
            self.tracing = False


def train_and_evaluate(config, workdir, source=None):
    """Trains `config` in `workdir` (local or gs://), resuming if it holds a checkpoint.

    `source` replaces `config.dataset`, e.g. a `resnext_jax.sources.ArraySource` of numpy arrays.
    Returns the final evaluation metrics.
    """
    validate.check_config(config)
    mesh, workdir = parallel.make_mesh(), epath.Path(workdir)
    validate.check_workdir(workdir)   # creates it; one line if it cannot be written
    # The steps trace with the mesh in context (`make_steps`); one run at a time per workdir.
    with jax.set_mesh(mesh), checkpoint.WorkdirLock(workdir):
        return _run(config, workdir, source, mesh)


def _run(config, workdir, source, mesh):
    # ---------------------------------------------------------------- setup
    process_count, process_index = jax.process_count(), jax.process_index()
    if config.batch_size % jax.device_count():
        raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                         f'{jax.device_count()} devices; choose a multiple of the device count')
    local_batch = config.batch_size // process_count
    source = source or sources.make_source(config)
    info = sources.dataset_info(config, source)
    steps_per_epoch = info.num_train // config.batch_size
    if not info.num_eval:
        raise ValueError(f'the eval split {config.eval_split!r} of {config.dataset} has no '
                         'examples; choose another --config.eval_split')
    if not steps_per_epoch:
        raise ValueError(f'batch_size {config.batch_size} exceeds the {info.num_train} training '
                         'examples; lower --config.batch_size')
    num_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
    eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
    model = build_model(config, info.num_classes)
    schedule = learning_rate_schedule(config, steps_per_epoch, num_steps)
    tx = create_optimizer(config, schedule)

    # ---------------------------------------------------------------- state
    init, abstract, shardings = state_layout(config, model, tx, mesh)
    rng = jax.random.key(config.seed)
    if config.fsdp:
        split = [jax.tree_util.keystr(path) for path, s in
                 jax.tree_util.tree_leaves_with_path(shardings) if parallel.DATA in s.spec]
        logging.info('fsdp: %d of %d state arrays (≥ %d elements) split over %d devices: %s',
                     len(split), len(jax.tree_util.tree_leaves(shardings)),
                     config.fsdp_min_size, mesh.size, ', '.join(split))
    meta = checkpoint.run_meta(config, info.num_classes)
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints,
                                         async_save=config.async_checkpoints)
    state, start = checkpoints.restore(abstract, shardings, meta)
    weights = None   # (where, metadata) of weights that were not initialised here
    if state is not None:
        logging.info('resumed from %s at step %d', checkpoints.directory, start)
        weights = (f'{checkpoints.directory}/{start}', checkpoints.restored_meta)
    else:
        state = jax.jit(init, out_shardings=shardings)(rng)
        if config.init_from:
            state, saved = checkpoint.init_from(state, config.init_from)
            weights = (config.init_from, saved)
    if config.eval_only and weights:   # fed images as the weights were trained
        config = preprocess.as_trained(config, weights[1], weights[0])
    params_count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params))
    logging.info('%s: %s parameters, %d devices in %d processes, %d steps of %d images',
                 config.model, f'{params_count:,}', jax.device_count(), process_count,
                 num_steps, config.batch_size)

    # ---------------------------------------------------------------- compiled steps
    p_train, p_eval = make_steps(config, model, tx, mesh, shardings)
    writer = MetricsWriter(workdir, enabled=process_index == 0, resume_step=start)
    if process_index == 0:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1))

    def run_eval(step):
        result = evaluate(p_eval, state, config, local_batch, mesh, source)
        writer.write(step, 'eval', **result, epoch=step / steps_per_epoch,
                     num_steps=num_steps)
        logging.info('eval at step %d: loss %.4f, top-1 %.2f%%, top-5 %.2f%% (%d examples)',
                     step, result['loss'], 100 * result['top1'], 100 * result['top5'],
                     result['num_examples'])
        return result

    def log_train(step, pending, seconds):
        values = jax.device_get(pending)
        losses = [float(v['loss']) for v in values]
        if not np.all(np.isfinite(losses)):
            raise checkpoints.diverged(step, 'the training loss')
        speed = len(values) * config.batch_size / seconds
        writer.write(step, 'train', loss=float(np.mean(losses)),
                     top1=float(np.mean([v['top1'] for v in values])),
                     learning_rate=float(schedule(step - 1)), images_per_sec=speed,
                     epoch=step / steps_per_epoch)
        eta = (num_steps - step) * seconds / len(values)
        logging.info('step %d/%d  loss %.4f  %.1f img/s  ETA %s', step, num_steps,
                     np.mean(losses), speed, time.strftime('%H:%M:%S', time.gmtime(eta)))

    # ---------------------------------------------------------------- loop
    batches = data.train_batches(config, local_batch, start_step=start,
                                 process_index=process_index, process_count=process_count,
                                 source=source)
    pending, t0, t_start, result = [], time.perf_counter(), time.perf_counter(), None
    last = start if config.eval_only else num_steps
    profile = Profile(config.profile_steps, workdir / 'tensorboard', process_index == 0)
    try:
        with checkpoint.PreemptionWatch() as preemption, profile:
            for step in range(start + 1, last + 1):
                profile.step(step, state)
                state, step_metrics = p_train(state, parallel.global_batch(next(batches), mesh))
                pending.append(step_metrics)
                preempted = preemption.reached(step)
                if step % config.log_every_steps == 0 or step == num_steps or preempted:
                    log_train(step, pending, time.perf_counter() - t0)
                    pending, t0 = [], time.perf_counter()
                if step % eval_every == 0 or step == num_steps:
                    # Before a preemption's save too: the resumed run starts after this step.
                    result = run_eval(step)
                if preempted:
                    checkpoints.save(step, state, meta)
                    checkpoints.wait()
                    raise checkpoint.Preempted(
                        f'preempted: saved step {step} of {num_steps} in '
                        f'{checkpoints.directory}; run the same command again to resume')
                if step % config.checkpoint_every_steps == 0 or step == num_steps:
                    checkpoints.save(step, state, meta)
        if result is None:  # eval_only or nothing left to train: report the restored state
            result = run_eval(start)
        checkpoints.wait()
    finally:  # an interrupted run still completes the saves it started
        checkpoints.close()
    logging.info('done in %.1f s: top-1 %.2f%%, top-5 %.2f%% on %d %s examples',
                 time.perf_counter() - t_start, 100 * result['top1'], 100 * result['top5'],
                 result['num_examples'], config.eval_split)
    return result
