"""Training and evaluation: one jitted step over a mesh of every device of every process.

config → model + sharded state → per-process input → global batch → jitted step → metrics and
checkpoints. `train_and_evaluate(config, workdir)` is the whole run; it resumes from the newest
complete checkpoint in `workdir`, including the input position.
"""
import contextlib
import functools
import os
import shutil
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from resnext_jax import checkpoint, data, mixup, parallel, preprocess, sources, validate
from resnext_jax.metrics import MetricsWriter
from resnext_jax.models import create_model


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = None   # {'params', 'batch_stats'}: their moving average (`ema_decay`), or None


# ------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------

def build_model(config, num_classes):
    return create_model(
        config.model, num_classes=num_classes, form=config.form, dtype=config.dtype,
        zero_init_last_bn=config.zero_init_last_bn, bn_group_size=config.bn_group_size or None,
        drop_path_rate=config.drop_path_rate, dropout=config.dropout,
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
    """`config.optimizer` following `schedule`, BN scales and biases left out of the weight
    decay unless `decay_bn_and_bias`:

    'sgd' (default): SGD with momentum and L2 weight decay added to the gradient, as PyTorch's
        SGD does.
    'adamw': `optax.adamw` (Loshchilov & Hutter): Adam, β = (0.9, 0.999), ε = 1e-8 (PyTorch's
        and timm's defaults), and the decoupled decay `weight_decay` · learning rate · w.
    'lamb': LAMB (You et al.) as timm's `Lamb`: Adam's step, β = (0.9, 0.999), ε = 1e-6, plus
        `weight_decay` · w, scaled per parameter array by the trust ratio ‖w‖ / ‖step‖ — only
        for the arrays that are decayed (timm adapts the others only with `always_adapt`).
        timm's Lamb also clips the global gradient norm at 1.0: set `clip_grad_norm` 1.0.
    `momentum` and `nesterov` are SGD's only. `clip_grad_norm` > 0 clips the global norm of
    the gradient to it first (`optax.clip_by_global_norm`), for any optimizer.
    """
    mask = None if config.decay_bn_and_bias else (
        lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params))
    optimizer = config.get('optimizer', 'sgd')
    if optimizer == 'adamw':
        tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask)
    elif optimizer == 'lamb':
        trust = optax.scale_by_trust_ratio()
        tx = optax.chain(
            optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
            optax.add_decayed_weights(config.weight_decay, mask),
            trust if mask is None else optax.masked(trust, mask),
            optax.scale_by_learning_rate(schedule))
    elif optimizer == 'sgd':
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask),
            optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    else:
        raise ValueError(f'unknown optimizer {optimizer!r}; use one of '
                         f'{", ".join(validate.OPTIMIZERS)}')
    clip = config.get('clip_grad_norm', 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


# ------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------

def _targets(logits, labels, smoothing):
    """Class probabilities: `labels` as they are when already (B, K) (mixed, `resnext_jax.mixup`,
    which smooths them itself), else one-hot integer labels smoothed by `smoothing`."""
    if labels.ndim == logits.ndim:
        return labels.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    return optax.smooth_labels(targets, smoothing) if smoothing else targets


def cross_entropy(logits, labels, smoothing=0.0):
    return optax.softmax_cross_entropy(logits, _targets(logits, labels, smoothing))


def binary_cross_entropy(logits, labels, smoothing=0.0, target_thresh=None):
    """Per-example mean over classes of the binary cross-entropy of sigmoid(logits), as timm's
    `BinaryCrossEntropy` ("ResNet strikes back"): one-hot targets smoothed to 1 - s + s/K and
    s/K (K classes), then, with `target_thresh`, 1 where above it and 0 elsewhere. Mixed
    (B, K) targets are thresholded as they come, as timm does after Mixup/CutMix."""
    targets = _targets(logits, labels, smoothing)
    if target_thresh is not None:
        targets = (targets > target_thresh).astype(targets.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)


def training_loss(logits, labels, loss='ce', smoothing=0.0, target_thresh=None):
    """Per-example training loss: 'ce' `cross_entropy`, 'bce' `binary_cross_entropy`
    (`target_thresh`: BCE's only). Evaluation reports `cross_entropy` either way, as timm's."""
    if loss == 'bce':
        return binary_cross_entropy(logits, labels, smoothing, target_thresh)
    if loss != 'ce':
        raise ValueError(f'unknown loss {loss!r}; use one of {", ".join(validate.LOSSES)}')
    return cross_entropy(logits, labels, smoothing)


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


def update_ema(ema, params, batch_stats, step, decay, every=1, copy_until=0):
    """The moving average after optimizer step `step` (1-based): every `every` steps
    ema ← decay · ema + (1 − decay) · (params, batch_stats); a copy of them while
    step ≤ `copy_until` (torchvision resets its EMA during the learning-rate warm-up); else
    unchanged."""
    new = {'params': params, 'batch_stats': batch_stats}
    d = jnp.where(step <= copy_until, 0.0, decay)

    def average(ema):
        return jax.tree_util.tree_map(lambda e, x: (d * e + (1 - d) * x).astype(e.dtype),
                                      ema, new)

    # Only the steps that update read and write the average (a branch, not a select).
    if every == 1:
        return average(ema)
    return jax.lax.cond(step % every == 0, average, lambda ema: ema, ema)


def train_step(state, batch, *, model, tx, loss='ce', label_smoothing=0.0,
               bce_target_thresh=None, seed=0, gather=None, mean=None, std=None, mix=None,
               ema=None):
    """One optimizer step on `batch`: uint8 images normalised with `mean`, `std` (float images
    as they are when `mean` is None), `loss` 'ce' or 'bce' (`training_loss`). The model's
    'dropout' rng (drop path, dropout) and `mix`'s (Mixup/CutMix: f(rng, images, labels) →
    (images, targets)) are functions of (`seed`, step), so a resumed run draws what it would
    have. `ema`: the keyword arguments of `update_ema` after `step`, params and stats."""
    images = normalise(batch['image'], mean, std)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    labels = batch['label']
    if mix is not None:
        images, labels = mix(jax.random.fold_in(rng, 1), images, labels)

    def loss_fn(params):
        logits, updates = model.apply(
            {'params': _gathered(params, gather), 'batch_stats': state.batch_stats},
            images, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
        loss_value = training_loss(logits, labels, loss, label_smoothing,
                                   bce_target_thresh).mean()
        return loss_value, (logits, updates['batch_stats'])

    (loss_value, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                          ema=state.ema if ema is None else update_ema(
                              state.ema, params, batch_stats, step, **ema))
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return state, {'loss': loss_value, 'top1': top1}


def eval_step(state, batch, *, model, gather=None, mean=None, std=None):
    """Sums over the examples whose mask is 1: loss, top-1 and top-5 hits, count. The EMA
    weights are evaluated by the same compiled step: `ema_view(state)`."""
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


def ema_view(state):
    """`state` with its EMA in place of the params and BN statistics (what evaluation,
    predict and convert read as 'the EMA weights'); same shapes, so the same compiled steps."""
    return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


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
        params, stats = variables['params'], variables.get('batch_stats', {})
        ema = ({'params': params, 'batch_stats': stats}
               if config.get('ema_decay', 0.0) else None)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params), ema=ema)
    return init


def state_layout(config, model, tx, mesh):
    """(init, abstract state, shardings) of a run over `mesh`: the initial-state function, its
    shapes and dtypes, and where each array lives (replicated, or split with `fsdp`)."""
    init = make_init(config, model, tx)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh, fsdp=config.fsdp,
                                         min_size=config.fsdp_min_size)
    return init, abstract, shardings


def ema_settings(config, steps_per_epoch):
    """`update_ema`'s keyword arguments for `config` (None without an EMA): `ema_decay` per
    update, every `ema_every_steps` steps, a copy of the weights during the warm-up."""
    if not config.get('ema_decay', 0.0):
        return None
    return {'decay': config.ema_decay, 'every': config.ema_every_steps,
            'copy_until': int(config.warmup_epochs * steps_per_epoch)}


def make_steps(config, model, tx, mesh, shardings, num_classes=None, steps_per_epoch=1):
    """The jitted (train_step, eval_step) of a run over `mesh`, the state placed by `shardings`
    and donated to the train step, the batch split over 'data'. `train_and_evaluate` runs them
    and `python -m resnext_jax.plan` compiles them for TPU topologies. Call or lower them inside
    `jax.set_mesh(mesh)`: the aggregated 3×3 convolutions then run on each device's own share
    of the batch (`parallel.per_device`)."""
    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    gather = repl if config.fsdp else None
    mean, std = preprocess.normalisation(config)   # the pipeline sends unnormalised pixels
    mix = None
    if mixup.enabled(config):
        mix = functools.partial(
            mixup.mix, num_classes=num_classes or model.num_classes,
            mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
            prob=config.mixup_prob, switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing)
    p_train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, loss=config.loss,
                          label_smoothing=config.label_smoothing,
                          bce_target_thresh=config.bce_target_thresh, seed=config.seed,
                          gather=gather, mean=mean, std=std, mix=mix,
                          ema=ema_settings(config, steps_per_epoch)),
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


def _holds_results(workdir):
    """Whether a workdir holds what a run produced: a checkpoint or a metrics record."""
    steps = workdir / 'checkpoints'
    metrics = workdir / 'metrics.jsonl'
    return ((steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()))
            or (metrics.exists() and bool(metrics.read_text().strip())))


@contextlib.contextmanager
def tidy_failed_start(workdir):
    """A start that fails before it has saved a checkpoint or a metric (a missing dataset, a
    mismatched checkpoint, an interrupted compile) removes what it created in `workdir`
    (`run.lock`, `checkpoints/`, `config.json`, the workdir itself), so that the workdir is as
    it was. Process 0, local workdirs; what was there before is never touched."""
    workdir = epath.Path(workdir)
    local = '://' not in os.fspath(workdir)
    before = set(os.listdir(workdir)) if local and workdir.is_dir() else None
    try:
        yield
    except BaseException:
        if local:
            _tidy(workdir, before)
        raise


def _tidy(workdir, before):
    """`tidy_failed_start`'s removal; it never hides the error that ended the start."""
    try:
        # Asked only now: before `parallel.initialize`, JAX must not start a backend.
        if not workdir.is_dir() or jax.process_index() != 0 or _holds_results(workdir):
            return
        for name in set(os.listdir(workdir)) - (before or set()):
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if before is None and not os.listdir(workdir):
            workdir.rmdir()
    except Exception as e:   # noqa: BLE001 (e.g. another process removed a file first)
        logging.warning('could not remove what the failed start created in %s: %s', workdir, e)


class Clock:
    """Training speed and time left, read from the steps' finished work, not their dispatch.

    Made just before the first step, which is timed alone (it compiles) and left out.
    `lap(step, num_steps)`, called once the interval's results are on the host, gives (steps/s
    over the wall time since the last lap, evaluation and saving included, as the log's
    timestamps give it; None if the interval held only the first step) and the seconds left at
    the run's pace since the first step (None at the first step)."""

    def __init__(self):
        self.began = time.perf_counter()
        self.first = self.last = self.start = self.t0 = None

    def first_step(self, step, metrics):
        jax.block_until_ready(metrics)
        self.start = self.t0 = time.perf_counter()
        self.first = self.last = step
        logging.info('step %d: compiled and ran in %.1f s', step, self.start - self.began)

    def lap(self, step, num_steps):
        now = time.perf_counter()
        steps, self.last = step - self.last, step
        speed = steps / (now - self.t0) if steps else None
        self.t0 = now
        done = step - self.first
        eta = (num_steps - step) * (now - self.start) / done if done else None
        return speed, eta


def train_and_evaluate(config, workdir, source=None):
    """Trains `config` in `workdir` (local or gs://), resuming if it holds a checkpoint.

    `source` replaces `config.dataset`, e.g. a `resnext_jax.sources.ArraySource` of numpy arrays.
    Returns the final evaluation metrics.
    """
    validate.check_config(config)
    mesh, workdir = parallel.make_mesh(), epath.Path(workdir)
    with tidy_failed_start(workdir):
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
            state, saved = checkpoint.init_from(state, config.init_from,
                                                config.get('init_from_ema', False))
            weights = (config.init_from, saved)
    if config.eval_only and weights:   # fed images as the weights were trained
        config = preprocess.as_trained(config, weights[1], weights[0])
    params_count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params))
    devices = jax.devices()
    logging.info('%s (%s parameters) on %s: %d %s device%s in %d process%s; %d steps of %d '
                 'images (%.1f epochs); the full config is in %s', config.model,
                 f'{params_count:,}', config.dataset, len(devices), devices[0].device_kind,
                 's' * (len(devices) > 1), process_count, 'es' * (process_count > 1), num_steps,
                 config.batch_size, num_steps / steps_per_epoch, workdir / 'config.json')

    # ---------------------------------------------------------------- compiled steps
    p_train, p_eval = make_steps(config, model, tx, mesh, shardings, info.num_classes,
                                 steps_per_epoch)
    writer = MetricsWriter(workdir, enabled=process_index == 0, resume_step=start)
    if process_index == 0:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=1))

    def run_eval(step):
        t = time.perf_counter()
        result = evaluate(p_eval, state, config, local_batch, mesh, source)
        ema = ''
        if state.ema is not None:   # the EMA weights, by the same compiled step
            averaged = evaluate(p_eval, ema_view(state), config, local_batch, mesh, source)
            result.update({f'ema_{k}': v for k, v in averaged.items() if k != 'num_examples'})
            ema = (f'; EMA: loss {averaged["loss"]:.4f}, top-1 {100 * averaged["top1"]:.2f}%, '
                   f'top-5 {100 * averaged["top5"]:.2f}%')
        writer.write(step, 'eval', **result, epoch=step / steps_per_epoch,
                     num_steps=num_steps)
        logging.info('eval at step %d: loss %.4f, top-1 %.2f%%, top-5 %.2f%%%s (%d examples, '
                     '%.1f s)', step, result['loss'], 100 * result['top1'],
                     100 * result['top5'], ema, result['num_examples'], time.perf_counter() - t)
        return result

    def log_train(step, pending):
        values = jax.device_get(pending)   # waits for the steps: the clock reads their work
        losses = [float(v['loss']) for v in values]
        if not np.all(np.isfinite(losses)):
            raise checkpoints.diverged(step, 'the training loss')
        speed, eta = clock.lap(step, num_steps)
        # Logged first: the line's timestamp is the lap's (TensorBoard's first write is slow).
        logging.info('step %d/%d  loss %.4f  %s  ETA %s', step, num_steps, np.mean(losses),
                     f'{speed * config.batch_size:.1f} img/s' if speed else '(first step)',
                     time.strftime('%H:%M:%S', time.gmtime(eta)) if eta is not None else '…')
        writer.write(step, 'train', loss=float(np.mean(losses)),
                     top1=float(np.mean([v['top1'] for v in values])),
                     learning_rate=float(schedule(step - 1)),
                     **({'images_per_sec': speed * config.batch_size} if speed else {}),
                     epoch=step / steps_per_epoch)

    # ---------------------------------------------------------------- loop
    batches = data.train_batches(config, local_batch, start_step=start,
                                 process_index=process_index, process_count=process_count,
                                 source=source)
    pending, t_start, result = [], time.perf_counter(), None
    last = start if config.eval_only else num_steps
    profile = Profile(config.profile_steps, workdir / 'tensorboard', process_index == 0)
    clock = Clock()
    try:
        with checkpoint.PreemptionWatch() as preemption, profile:
            for step in range(start + 1, last + 1):
                profile.step(step, state)
                if step == start + 1:
                    logging.info('compiling the training step')
                state, step_metrics = p_train(state, parallel.global_batch(next(batches), mesh))
                pending.append(step_metrics)
                if step == start + 1:   # the compile: timed alone, left out of the img/s
                    clock.first_step(step, step_metrics)
                preempted = preemption.reached(step)
                if step % config.log_every_steps == 0 or step == num_steps or preempted:
                    log_train(step, pending)
                    pending = []
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
