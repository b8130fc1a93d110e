"""The training step and what it needs, importing only JAX, Flax and optax: the train state,
model, optimizer and learning-rate schedule of a config, the losses, the jitted train and
eval steps over a mesh (`make_steps`) and the EMA of the weights.

`resnext_jax.train` runs these in its loop, `python -m resnext_jax.plan` compiles them for TPU
slices and `python -m resnext_jax.benchmark` times them; none of them needs TensorFlow, which
only the input pipeline uses. To train in a loop of your own: `state_layout` gives the initial
state and where it lives, `make_steps` the compiled steps; feed them global batches of
{'image': uint8 (B, S, S, 3), 'label': int32 (B,)} (eval: and 'mask').
"""
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from resnext_jax import augment, mixup, parallel, validate
from resnext_jax.image_settings import normalisation
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
               ema=None, pixels=None):
    """One optimizer step on `batch`: uint8 images normalised with `mean`, `std` (float images
    as they are when `mean` is None), or augmented and normalised by `pixels` (f(rng, images)
    → normalised images, `augment.Augmentation`); `loss` 'ce' or 'bce' (`training_loss`). The
    rngs of `pixels`, of the model's 'dropout' (drop path, dropout) and of `mix` (Mixup/CutMix:
    f(rng, images, labels) → (images, targets)) are functions of (`seed`, step), so a resumed
    run draws what it would have. `ema`: the keyword arguments of `update_ema` after `step`,
    params and stats."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    images = (normalise(batch['image'], mean, std) if pixels is None
              else pixels(jax.random.fold_in(rng, 2), batch['image']))
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


def setup(config, num_classes, mesh, steps_per_epoch, num_steps):
    """What a run of `config` over `mesh` is made of, as train.py builds it (and `plan` and
    `benchmark --config` compile it): (model, learning-rate schedule, optimizer, init,
    abstract state, shardings) for `num_steps` steps of `steps_per_epoch` per epoch."""
    model = build_model(config, num_classes)
    schedule = learning_rate_schedule(config, steps_per_epoch, num_steps)
    tx = create_optimizer(config, schedule)
    init, abstract, shardings = state_layout(config, model, tx, mesh)
    return model, schedule, tx, init, abstract, shardings


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
    of the batch (`parallel.per_device`). With `augment_on='device'` the train step augments
    the images per pixel first (`augment.from_config`)."""
    batch_sh, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    gather = repl if config.fsdp else None
    mean, std = normalisation(config)   # the pipeline sends unnormalised pixels
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
                          ema=ema_settings(config, steps_per_epoch),
                          pixels=augment.from_config(config)),
        in_shardings=(shardings, batch_sh), out_shardings=(shardings, repl), donate_argnums=0)
    p_eval = jax.jit(functools.partial(eval_step, model=model, gather=gather, mean=mean, std=std),
                     in_shardings=(shardings, batch_sh), out_shardings=repl)
    return p_train, p_eval
