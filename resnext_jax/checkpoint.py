"""Checkpoints: saving, restoring, loading to the host, metadata, and the guards around them.

A workdir holds `checkpoints/<step>/{state, meta}` (orbax: `state` = params, batch_stats,
opt_state, step; `meta` = JSON, `run_meta`), written by training and by
`python -m resnext_jax.convert`, read by training (resume, `init_from`), `eval_only`,
`predict` and `convert`. The guards:

- a state is saved only if every array of it is finite (one jitted reduction), so a diverged
  run never leaves a non-finite checkpoint, and rotation only ever deletes finite ones;
- a preemption notice (SIGTERM; on multi-process runs JAX's preemption service, which agrees
  on one step for all processes) saves the current step and stops the run (`Preempted`);
- a newest checkpoint that cannot be read (truncated or missing files) is reported in one line,
  moved aside to `<step>.unreadable` (never deleted) and the one before is used;
- a checkpoint of another model, class count or global batch is refused, never overwritten;
- one run at a time per local workdir (`WorkdirLock`);
- a save that fails (a full disk) is one error naming its step, and leaves no write running.
"""
import asyncio
import fcntl
import logging as pylogging
import os
import signal
import socket
import threading

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src import asyncio_utils as orbax_asyncio

from resnext_jax import image_settings

# What a checkpoint's state must agree on with the run that restores it ('optimizer': its state
# has another shape; checkpoints written before it was recorded are not asked).
MUST_MATCH = ('model', 'model_options', 'num_classes', 'global_batch_size', 'optimizer', 'ema')


class Preempted(Exception):
    """The run saved its state at a preemption notice and stopped; re-running resumes."""


class Interrupted(Preempted):
    """The same, for a Ctrl-C (SIGINT): saved and stopped; re-running resumes."""


def run_meta(config, num_classes, class_names=None):
    """The JSON saved beside every state: what the state is, and how to feed it images (the
    preprocessing travels with the weights, as timm's pretrained configs do)."""
    return {'model': config.model, 'model_options': _plain(dict(config.model_options)),
            'num_classes': int(num_classes), 'global_batch_size': config.batch_size,
            'optimizer': config.get('optimizer', 'sgd'),
            'ema': bool(config.get('ema_decay', 0.0)),
            **_plain(image_settings.eval_settings(config)),
            **({'class_names': list(class_names)} if class_names else {})}


def _plain(x):  # JSON-able: tuples become lists, as they come back from JSON
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


@jax.jit
def all_finite(tree):
    """Whether every floating-point number in `tree` is finite (one fused reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _run_sync_via_new_loop(coro):
    """orbax-checkpoint 0.12.8's `asyncio_utils._run_sync_via_new_loop`, which runs each save and
    restore coroutine in a new event loop, except that the loop is closed only after the tasks
    left in it have ended. orbax closes it at once: when one read or write fails (ENOSPC, a
    missing file), `asyncio.gather` raises while the others are still in TensorStore, and each
    of those then completes on the closed loop ("RuntimeError: Event loop is closed" on stderr,
    one per array, and "Task exception was never retrieved"). They are waited for, not
    cancelled: a cancelled task's TensorStore operation still completes, and calls back into
    the loop."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


if hasattr(orbax_asyncio, '_run_sync_via_new_loop'):   # an orbax without it is left alone
    orbax_asyncio._run_sync_via_new_loop = _run_sync_via_new_loop


class _OrbaxErrorsInOneLine(pylogging.Filter):
    """orbax logs a failed save with its stack in each thread it passes through (five records for
    a full disk) before `Checkpoints` reports it as one error: while a `Checkpoints` is open,
    those records keep one line each, ending in the error's first line (`--verbosity=1`: with
    their stacks)."""
    ORBAX = os.path.dirname(ocp.__file__) + os.sep

    def filter(self, record):
        if (record.exc_info and record.exc_info[1] is not None and logging.get_verbosity() < 1
                and record.pathname.startswith(self.ORBAX)):
            message, error = record.getMessage(), _first_line(record.exc_info[1])
            record.msg = message if error.split(': ', 1)[-1] in message else f'{message} ({error})'
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _manager(directory, keep=None, async_save=False, create=False):
    return ocp.CheckpointManager(
        directory, item_handlers={'state': ocp.StandardCheckpointHandler(),
                                  'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=async_save))


class Checkpoints:
    """The checkpoints of one training run in `workdir`/checkpoints."""

    def __init__(self, workdir, *, keep, async_save=True):
        self.directory = epath.Path(workdir) / 'checkpoints'
        self._manager = _manager(self.directory, keep, async_save, create=True)
        self.newest_finite = None   # the newest step known to be saved (all saved are finite)
        self.restored_meta = None   # the metadata of the checkpoint `restore` returned
        self._saving = None         # the step of the save started last, until `wait`
        self._one_line = _OrbaxErrorsInOneLine()
        logging.get_absl_logger().addFilter(self._one_line)

    def restore(self, abstract, shardings, meta):
        """(state, step) of the newest readable checkpoint, placed with `shardings`, or
        (None, 0) if there is none. Unreadable ones are moved aside; a checkpoint that does not
        match `meta` (MUST_MATCH) is refused with a ValueError."""
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        steps = sorted(self._manager.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                what = f'the checkpoint at step {step} in {self.directory}'
                saved = _read(self._manager.restore, step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))['meta']
                _check_match(saved, meta, what)
                _check_tree(_read(lambda: self._manager.item_metadata(step)['state'].tree),
                            abstract, what)
                state = _read(self._manager.restore, step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))['state']
                if not bool(all_finite(state)):
                    raise _Unreadable('it holds non-finite numbers')
            except _Unreadable as e:
                logging.warning('checkpoint %s/%d is unreadable (%s); moving it aside to %d.'
                                'unreadable and trying the one before', self.directory, step,
                                e, step)
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            self.newest_finite, self.restored_meta = step, saved
            return state, step
        if unreadable:
            self._set_aside(unreadable)
            raise ValueError(
                f'no readable checkpoint in {self.directory}: steps '
                f'{", ".join(map(str, unreadable))} are damaged (moved aside as '
                '<step>.unreadable); use a new --workdir, or restore a copy of the checkpoints')
        return None, 0

    def _set_aside(self, steps):
        if steps and jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                if path.exists():
                    path.rename(self.directory / f'{step}.unreadable')
        if steps:
            multihost_utils.sync_global_devices('resnext_jax checkpoints set aside')
            self._manager.reload()

    def save(self, step, state, meta):
        """Saves `state` as `step` if it is finite; else raises FloatingPointError (one line,
        naming the newest finite checkpoint). Asynchronous unless the run said otherwise: a save
        that fails in the background is reported (OSError, one line, naming its step) by the
        next `save`, `wait` or `diverged`."""
        if not bool(all_finite(state)):
            raise self.diverged(step, 'the training state')
        self.wait()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, 'step': int(step)})), force=True)
        except Exception as e:
            raise _save_error(step, self.directory, e) from None
        self._saving = step

    def diverged(self, step, what):
        """The one-line error for a run whose `what` became non-finite at `step` (an OSError
        is raised instead if the save in progress failed)."""
        self.wait()   # the save in progress, if any, is the newest finite checkpoint
        if self.newest_finite is None:
            where = (f'no checkpoint was saved in {self.directory}; lower '
                     '--config.learning_rate and start again')
        else:
            where = (f'the newest finite checkpoint is step {self.newest_finite} in '
                     f'{self.directory}; lower --config.learning_rate and re-run to resume '
                     'from it')
        return FloatingPointError(f'{what} is not finite at step {step} (the run diverged) and '
                                  f'is not saved: {where}')

    def wait(self):
        """Blocks until the started save is on disk; OSError (one line) if it failed."""
        step, self._saving = self._saving, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise _save_error(step, self.directory, e) from None
        self.newest_finite = step

    def close(self):
        """Waits for the started save and closes the manager. Call `wait` first to hear of a
        failed save: here, on the way out of a run that another error ended, it is logged."""
        try:
            self.wait()   # first: at a failed save it has not raised, orbax's close raises
        except OSError as e:
            logging.error('%s', e)
        finally:
            logging.get_absl_logger().removeFilter(self._one_line)
            self._manager.close()


class _Unreadable(Exception):
    pass


def _read(fn, *args, **kwargs):
    """fn(...), any failure of which means damaged files (orbax and tensorstore raise many
    kinds: ValueError, OSError, RuntimeError, ...)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise _Unreadable(_first_line(e)) from None


def _first_line(e, limit=160):
    """'Type: the first line of the message', at most `limit` characters."""
    text = (str(e).strip().splitlines() or [''])[0].split(' See full TensorStore')[0]
    text = text if len(text) <= limit else text[:limit - 1] + '…'
    return f'{type(e).__name__}: {text}'.rstrip(': ')


def _save_error(step, directory, e):
    return OSError(f'could not write the checkpoint of step {step} to {directory} '
                   f'({_first_line(e)}); the older checkpoints there are intact: fix the '
                   'cause (e.g. free disk space) and re-run to resume')


def _check_match(saved, meta, what):
    for key in MUST_MATCH:
        if key in saved and _plain(saved[key]) != _plain(meta[key]):
            raise ValueError(f'{what} has {key}={saved[key]!r} but the config says '
                             f'{meta[key]!r}; use a new --workdir or the same setting')


def _shapes(tree):
    """{path: shape} of a tree of arrays, shapes or orbax metadata; dataclasses as dicts."""
    return {jax.tree_util.keystr(path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(
                flax.serialization.to_state_dict(tree))}


def _check_tree(saved, expected, what):
    got, want = _shapes(saved), _shapes(expected)
    if got != want:
        key = next(k for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k))
        raise ValueError(f'{what} does not fit the model: {key} has shape {got.get(key)} '
                         f'there and {want.get(key)} here; use a new --workdir or the same '
                         'model settings')


# ------------------------------------------------------------------------------ preemption

class PreemptionWatch:
    """Tells the training loop when to save and stop for a preemption notice or a Ctrl-C.

    On a multi-process run, JAX's preemption service (started by `jax.distributed.initialize`)
    catches SIGTERM on any process and makes every process reach the same step; on one process
    a SIGTERM handler sets a flag. A first SIGINT (Ctrl-C) is taken as such a notice too (on a
    multi-process run it sends this process the SIGTERM the service listens for) and sets
    `interrupted`; a second one raises KeyboardInterrupt at once, as Python's default does
    (checkpoints are written to a temporary name first, so none is left half-written). Use as
    a context manager around the loop; outside it, signals behave as before."""

    def __init__(self):
        self._flag = threading.Event()
        self.interrupted = False
        self._previous = {}

    def _sigint(self, *_):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)   # a second one stops
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._flag.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._sigint)
            if jax.process_count() == 1:
                self._previous[signal.SIGTERM] = signal.signal(
                    signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def reached(self, step):
        """Whether to save `step` and stop. Every process must call it at every step."""
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(int(step))
            except RuntimeError:   # the preemption service is disabled
                return False
        return self._flag.is_set()


# ------------------------------------------------------------------------------ workdir lock

class WorkdirLock:
    """An exclusive lock on a local workdir for the duration of a run (process 0 holds it), so
    two runs cannot write the same checkpoints and metrics. Object stores (gs://) are not
    locked."""

    def __init__(self, workdir):
        self.path = epath.Path(workdir) / 'run.lock'
        self._file = None

    def __enter__(self):
        if jax.process_index() != 0 or '://' in os.fspath(self.path):
            return self
        self._file = open(self.path, 'a+')
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or 'another process'
            self._file.close()
            self._file = None
            raise ValueError(f'another run is using {self.path.parent} ({holder} holds '
                             f'{self.path}); wait for it to finish or use another --workdir'
                             ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        self._file.flush()
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()   # releases the lock


# ------------------------------------------------------------------------------ to and from the host

def newest_readable(directory):
    """(manager, step) of the newest checkpoint in `directory` whose state metadata reads."""
    manager = _manager(directory)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            manager.item_metadata(step)['state'].tree
            return manager, step
        except Exception as e:   # a damaged checkpoint: say so and use the one before
            logging.warning('checkpoint %s/%d is unreadable (%s); using the one before',
                            directory, step, _first_line(e))
    manager.close()
    raise FileNotFoundError(f'no readable checkpoint in {directory}')


def load_checkpoint(workdir, step=None):
    """(state, meta) of a checkpoint in `workdir` (default: the newest readable one) as numpy
    arrays on the host, whatever mesh wrote it; `state` is a dict with params, batch_stats, ..."""
    directory = epath.Path(workdir) / 'checkpoints'
    if step is None:
        manager, step = newest_readable(directory)
    else:
        manager = _manager(directory)
    with manager:
        tree = manager.item_metadata(step)['state'].tree
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state, meta = jax.device_get(restored['state']), restored['meta']
    return state, meta


def variables_of(state, where, ema=False):
    """{'params', 'batch_stats'} of a loaded checkpoint `state` (`load_checkpoint`): the trained
    weights, or with `ema` their moving average (a run with `ema_decay`); `where` names the
    checkpoint in the error for one without an EMA."""
    if ema:
        if not state.get('ema'):
            raise ValueError(f'{where} has no EMA weights (it was trained without '
                             '--config.ema_decay): leave out the EMA option')
        state = state['ema']
    return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}


def save_variables(directory, variables, meta):
    """Writes `variables` (params, batch_stats) as step 0 of `directory`/checkpoints, laid out
    like a training workdir, so that `load_checkpoint` and `--config.init_from` read it."""
    state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    with _manager(epath.Path(directory) / 'checkpoints', create=True) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave({**meta, 'step': 0})))
        manager.wait_until_finished()


def init_from(state, directory, ema=False):
    """(state, meta): `state` with the params and BN statistics of the newest checkpoint in
    `directory` (from `python -m resnext_jax.convert`, or a training workdir; with `ema` its
    EMA weights, `--config.init_from_ema`) or of published weights by registry name
    (`resnext_jax.pretrained`), placed like `state`, and that checkpoint's
    metadata; step and optimizer state stay fresh (a run with its own EMA starts it at these
    weights). A head for another number of classes keeps its fresh initialisation; every other
    variable must match in name and shape."""
    from resnext_jax import pretrained   # noqa: PLC0415
    if pretrained.is_name(directory):   # published weights by name
        if ema:
            raise ValueError(f'init_from {directory} names published weights, which are one '
                             'set: leave out --config.init_from_ema')
        saved, meta = pretrained.load_variables(directory)
    elif not epath.Path(directory).is_dir():
        raise FileNotFoundError(f'init_from {directory} is not a checkpoint directory or '
                                'published weights: pass a training workdir, a directory that '
                                'python -m resnext_jax.convert wrote or a name python -m '
                                'resnext_jax.summary --pretrained lists (--config.init_from)')
    else:
        saved, meta = load_checkpoint(directory)
        saved = variables_of(saved, f'init_from {directory}', ema)
    saved['params'] = dict(saved['params'])
    fresh = {'params': state.params, 'batch_stats': state.batch_stats}
    head = state.params.get('head')
    if head is not None and _shapes(saved['params'].get('head')) != _shapes(head):
        logging.info('init_from %s: it has %s classes, this run %d; the head starts fresh',
                     directory, meta.get('num_classes'), head['kernel'].shape[-1])
        saved['params']['head'] = head
    _check_tree(saved, fresh, f'init_from {directory} ({meta.get("model")})')

    def place(x, like):  # host arrays → `like`'s sharding; the fresh head is already placed
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x, like.dtype)
        return jax.make_array_from_callback(like.shape, like.sharding, lambda index: x[index])

    placed = jax.tree_util.tree_map(place, saved, fresh)
    if meta.get('pretrained'):
        logging.info('initialised from %s', pretrained.get(meta['pretrained']).describe())
    else:
        logging.info('initialised from %s (%s%s)', directory, meta.get('model'),
                     ', its EMA weights' if ema else '')
    ema_state = state.ema if state.ema is None else jax.tree_util.tree_map(jnp.copy, placed)
    return state.replace(params=placed['params'], batch_stats=placed['batch_stats'],
                         ema=ema_state), meta
