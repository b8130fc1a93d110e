"""Training and evaluation: one jitted step over a mesh of every device of every process.

config → model + sharded state → per-process input → global batch → jitted step → metrics and
checkpoints. `train_and_evaluate(config, workdir)` is the whole run; it resumes from the newest
complete checkpoint in `workdir`, including the input position. The step itself (state,
optimizer, losses, train and eval steps, EMA) is `resnext_jax.step`, which needs no TensorFlow.
"""
import contextlib
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from resnext_jax import (checkpoint, data, image_settings, parallel, pretrained, sources,
                         validate)
from resnext_jax.metrics import MetricsWriter
from resnext_jax.step import ema_view, make_steps, setup


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------

def evaluate(eval_fn, state, config, local_batch, mesh, source):
    """The eval split's mean loss, top-1 and top-5 (each example once) under `eval_fn`."""
    totals = None
    for batch in data.eval_batches(config, local_batch, process_index=jax.process_index(),
                                   process_count=jax.process_count(), source=source):
        sums = eval_fn(state, parallel.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.tree_util.tree_map(lambda x: float(np.asarray(x)), jax.device_get(totals))
    n = totals['num_examples']
    return {'loss': totals['loss'] / n, 'top1': totals['top1'] / n, 'top5': totals['top5'] / n,
            'num_examples': int(n)}


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
    config = pretrained.configure(config)   # what init_from's published weights decide
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

    # ---------------------------------------------------------------- state
    model, schedule, tx, init, abstract, shardings = setup(
        config, info.num_classes, mesh, steps_per_epoch, num_steps)
    rng = jax.random.key(config.seed)
    if config.fsdp:
        split = [jax.tree_util.keystr(path) for path, s in
                 jax.tree_util.tree_leaves_with_path(shardings) if parallel.DATA in s.spec]
        logging.info('fsdp: %d of %d state arrays (≥ %d elements) split over %d devices: %s',
                     len(split), len(jax.tree_util.tree_leaves(shardings)),
                     config.fsdp_min_size, mesh.size, ', '.join(split))
    meta = checkpoint.run_meta(config, info.num_classes, info.class_names)
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
        config = image_settings.as_trained(config, weights[1], weights[0])
    params_count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params))
    devices = jax.devices()
    size, eval_size = config.image_size, image_settings.eval_size(config)
    logging.info('%s (%s parameters) on %s, %d×%d images (evaluated at %d×%d%s): %d %s device%s '
                 'in %d process%s; %d steps of %d images (%.1f epochs); the full config is in %s',
                 config.model, f'{params_count:,}', config.dataset, size, size, eval_size,
                 eval_size, f', the shorter side at {image_settings.eval_resize(config)}'
                 if config.augment == 'imagenet' else '', len(devices),
                 devices[0].device_kind, 's' * (len(devices) > 1), process_count,
                 'es' * (process_count > 1), num_steps, config.batch_size,
                 num_steps / steps_per_epoch, workdir / 'config.json')
    line, warning = parallel.describe_processes(mesh)
    if line:
        logging.info('%s', line)
    if warning:
        logging.warning('%s', warning)
    if image_settings.per_pixel(config):
        logging.info("per-pixel augmentation %s (augment_on='%s')",
                     'in the jitted step' if image_settings.on_device(config) else 'on the host',
                     config.get('augment_on', 'auto'))

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
                    stop = checkpoint.Interrupted if preemption.interrupted else (
                        checkpoint.Preempted)
                    raise stop(f'{"interrupted" if preemption.interrupted else "preempted"}: '
                               f'saved step {step} of {num_steps} in {checkpoints.directory}; '
                               'run the same command again to resume')
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
