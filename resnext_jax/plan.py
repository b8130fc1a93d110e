"""Compile a run's training step for a Cloud TPU slice on this machine, without TPUs.

    python -m resnext_jax.plan --config=configs/paper.py:table3_resnext50_32x4d --topology=v5e-8 \\
        --config.dtype=bfloat16 [--form=all] [--max-batch] [--eval] [--json] [--num-slices=2]

libtpu (`pip install -e '.[tpu]'`) compiles the steps train.py runs (`step.make_steps`, the
state placed by `parallel.state_shardings` with the config's `fsdp` settings, the global batch
`config.batch_size` split over 'data' on a one-axis mesh of every chip of the slice) for the
slice's chips (`resnext_jax.tpus`). The compiled program tells, per chip:

  HBM      arguments + outputs − the donated state reused for outputs + temporaries + program,
           against the chip's HBM; libtpu refuses a program that does not fit, and says how
           much it would need
  FLOPs    per step and per image, beside the model's 3 × 2 × multiply-adds per image (2 × for
           evaluation: no backward pass), and the bytes the step reads and writes
  bound    step time ≥ max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), and the images/s
           per chip and model FLOP utilisation (MFU) that bound allows

All of it is the compiler's estimate of a program it never ran, not measured speed. `--form=all`
compiles every form of the aggregated transformation; `--max-batch` finds the largest per-chip
batch that fits, from the memory of two compiles extrapolated (memory grows about linearly with
the batch) and as few more as confirm it. Each compile of a ResNeXt-50 takes minutes.
"""
import functools
import json
import math
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from resnext_jax import cli, tpus


def define_flags():
    """The command's flags; `python -m resnext_jax.plan` defines them before parsing."""
    config_flags.DEFINE_config_file('config', None, 'Training recipe, e.g. configs/paper.py:ROW.')
    flags.DEFINE_string('topology', None, 'Cloud TPU slice, e.g. v5e-8, v4-32, v5p-8, v6e-8.')
    flags.DEFINE_integer('num-slices', 1, 'Slices joined by the data-centre network.',
                         lower_bound=1)
    flags.DEFINE_string('form', None, "Form of the aggregated transformation, or 'all'; "
                                      "default: the config's ('auto' is 'grouped' on TPU).")
    flags.DEFINE_boolean('max-batch', False, 'Also find the largest per-chip batch that fits.')
    flags.DEFINE_boolean('eval', False, 'Also compile the evaluation step.')
    flags.DEFINE_boolean('json', False, 'Print one JSON object (the report goes to stderr).')
    flags.DEFINE_integer('num-classes', None, "Default: the dataset's, from its TFDS metadata.",
                         lower_bound=1)


FLAGS = flags.FLAGS

TRAIN, EVAL = 'train', 'eval'
# The learning-rate schedule needs a length; its constants do not change the compiled step.
STEPS_PER_EPOCH = 1000
OUT_OF_MEMORY = re.compile(r'total memory required[^(]*\(([\d.]+)G\)')


def check_batch(global_batch, tpu_slice):
    """The per-chip batch; ValueError unless every device gets the same number (≥ 1) of images."""
    n, what = ((tpu_slice.num_chips, 'chips') if tpu_slice.chip.devices_per_chip == 1
               else (tpu_slice.num_devices, 'TensorCores'))
    if global_batch < 1:
        raise ValueError(f'batch_size {global_batch} is not an integer ≥ 1: choose a multiple of '
                         f'{n} (--config.batch_size)')
    if global_batch % n:
        raise ValueError(
            f'batch_size {global_batch} is not divisible by the {n} {what} of '
            f'{tpu_slice.name}: choose a multiple of {n} (--config.batch_size)')
    return global_batch // tpu_slice.num_chips


def dataset_classes(config):
    """The number of classes of `config.dataset`, read without its data."""
    from resnext_jax import sources
    if config.dataset == 'digits' or config.dataset.startswith('folder:'):
        return sources.make_source(config).num_classes
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir)
        return builder.info.features['label'].num_classes
    except Exception:
        raise ValueError(f'cannot tell the number of classes of dataset {config.dataset!r}: '
                         'pass --num-classes') from None


def model_macs(config, num_classes, image_size):
    """Multiply-adds per image as the paper counts them (`resnext_jax.summary`)."""
    from resnext_jax.summary import summarize
    return summarize(config.model, image_size, num_classes=num_classes,
                     **dict(config.model_options))['macs']


def tpu_config(config, form=None):
    """`config` as train.py would run it on a TPU: 'auto' form and augmentation place resolved
    for the TPU backend."""
    from resnext_jax.aggregated import resolve_form
    from resnext_jax.image_settings import augment_place
    config = config.copy_and_resolve_references()
    config.form = resolve_form(form or config.form, backend='tpu')
    config.augment_on = augment_place(config, backend='tpu')
    return config


def compile_step(config, mesh, num_classes, global_batch, step=TRAIN):
    """The compiled train (or eval) step of train.py for `mesh`, and the seconds it took."""
    import jax
    from resnext_jax import parallel, step as step_lib
    model, _, tx, _, abstract, shardings = step_lib.setup(   # as train.py's
        config, num_classes, mesh, STEPS_PER_EPOCH, STEPS_PER_EPOCH * 90)
    state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    size = config.image_size if step == TRAIN else (config.eval_image_size or config.image_size)
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.batch_sharding(mesh))
             for k, s in batch_shapes(config, global_batch, size, step).items()}
    t = time.perf_counter()
    with jax.set_mesh(mesh):  # as train.py traces them: `step.make_steps`
        p_train, p_eval = step_lib.make_steps(config, model, tx, mesh, shardings, num_classes,
                                              STEPS_PER_EPOCH)
        compiled = (p_train if step == TRAIN else p_eval).lower(state, batch).compile()
    return compiled, time.perf_counter() - t


def batch_shapes(config, global_batch, size, step=TRAIN):
    """{name: ShapeDtypeStruct} of the batch the host feeds a step (`data`'s batches): pixels
    as `image_settings.feed_dtype` sends them, augmented (`augment_on='device'`) and normalised
    on the chip."""
    import jax
    import jax.numpy as jnp
    from resnext_jax.image_settings import feed_dtype
    pixels = jnp.dtype(feed_dtype(config, step == TRAIN))
    shapes = {'image': ((global_batch, size, size, 3), pixels),
              'label': ((global_batch,), jnp.int32)}
    if step == EVAL:
        shapes['mask'] = ((global_batch,), jnp.float32)
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def hbm_breakdown(compiled):
    """Bytes per chip of the compiled program's buffers; `total` is what it occupies at once."""
    m = compiled.memory_analysis()
    parts = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
             'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
             'program': m.generated_code_size_in_bytes}
    parts['total'] = (parts['arguments'] + parts['outputs'] - parts['aliased']
                      + parts['temporaries'] + parts['program'])
    return parts


def refused_bytes(error):
    """The HBM bytes per chip that libtpu says a program needs, from the error it raises when it
    refuses to compile one that does not fit; None for any other error."""
    needed = OUT_OF_MEMORY.search(str(error))
    return (round(float(needed[1]) * 2**30)
            if needed and str(error).startswith('RESOURCE_EXHAUSTED') else None)


def plan_step(config, tpu_slice, mesh, num_classes, *, step=TRAIN, per_chip_batch=None,
              capacity=None):
    """Compiles one step and returns what it needs and allows, per chip, as a flat dict.

    `per_chip_batch` replaces `config.batch_size / chips`; `capacity` replaces the chip's HBM
    (bytes) in `fits`. A program libtpu refuses for want of HBM gets `fits` False and the
    total the compiler reported; its FLOPs are then unknown (None). On v2 and v3, whose chips
    are two devices each, the compiled program is one device's: its counts are doubled.
    """
    import jax
    chip = tpu_slice.chip
    b = per_chip_batch or check_batch(config.batch_size, tpu_slice)
    check_batch(b * tpu_slice.num_chips, tpu_slice)
    per_chip = chip.devices_per_chip   # the compiled (per-device) program's counts → per chip
    capacity = capacity or chip.hbm_bytes
    size = config.image_size if step == TRAIN else (config.eval_image_size or config.image_size)
    passes = 3 * 2 if step == TRAIN else 2  # FLOPs per multiply-add: forward 2, backward 4
    row = {'topology': tpu_slice.name, 'num_slices': tpu_slice.num_slices,
           'chip': chip.device_kind, 'num_chips': tpu_slice.num_chips,
           'chip_peak_bf16_flops': chip.peak_bf16_flops,
           'chip_hbm_bytes_per_sec': chip.hbm_bytes_per_sec, 'step': step,
           'model': config.model, 'form': config.form, 'dtype': config.dtype,
           'fsdp': bool(config.fsdp), 'image_size': size, 'per_chip_batch': b,
           'global_batch': b * tpu_slice.num_chips, 'hbm_capacity_bytes': capacity,
           'devices_per_chip': per_chip,
           'host_bytes_per_chip': sum(s.size * s.dtype.itemsize for s in batch_shapes(
               config, b, size, step).values()),   # what the host sends each chip per step
           'model_flops_per_image': passes * model_macs(config, num_classes, size)}
    try:
        compiled, seconds = compile_step(config, mesh, num_classes, b * tpu_slice.num_chips,
                                         step)
    except jax.errors.JaxRuntimeError as e:
        needed = refused_bytes(e)
        if needed is None:
            raise
        return {**row, 'fits': False, 'hbm_bytes_per_chip': needed * per_chip,
                'flops_per_chip': None, 'compile_error': str(e).splitlines()[0]}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm = {k: v * per_chip for k, v in hbm_breakdown(compiled).items()}
    flops, accessed = cost['flops'] * per_chip, cost['bytes accessed'] * per_chip
    compute, memory = flops / chip.peak_bf16_flops, accessed / chip.hbm_bytes_per_sec
    bound = max(compute, memory)
    return {**row, 'fits': hbm['total'] <= capacity, 'hbm_bytes_per_chip': hbm['total'],
            **{f'hbm_{k}_bytes': v for k, v in hbm.items() if k != 'total'},
            'flops_per_chip': flops, 'flops_per_image': flops / b,
            'bytes_accessed_per_chip': accessed, 'compute_seconds': compute,
            'memory_seconds': memory, 'bound_seconds': bound,
            'bound_images_per_sec_per_chip': b / bound,
            'bound_mfu': row['model_flops_per_image'] * b / bound / chip.peak_bf16_flops,
            'compile_seconds': seconds}


def batch_step(config, tpu_slice):
    """The per-chip batches a run accepts are the multiples of this: with `bn_group_size` the
    global batch must be whole groups."""
    groups = config.bn_group_size or 1
    return math.lcm(groups // math.gcd(groups, tpu_slice.num_chips),
                    tpu_slice.chip.devices_per_chip)


def largest_fitting(measure, capacity, known, max_measures=12):
    """The largest batch b ≥ 1 whose `measure(b)` = (bytes, fits) fits, and every measurement.

    `known` maps batches already measured to (bytes, fits). Memory grows about linearly with
    the batch, so each next batch is where a line reaches `capacity`: the line through the two
    measurements nearest the boundary (one alone: through it and zero bytes at batch zero),
    then, once batches on both sides are known, the line through the largest batch that fits
    and the smallest that does not, and strictly between them; the search ends when those two
    are adjacent. Where memory grows in steps and the line keeps landing on one side, the
    other end's distance from `capacity` is halved each time (the Illinois rule).
    """
    points, damp, last = dict(known), {True: 1.0, False: 1.0}, None
    for _ in range(max_measures):
        lo = max((b for b, (_, ok) in points.items() if ok), default=0)
        hi = min((b for b, (_, ok) in points.items() if not ok), default=math.inf)
        if hi <= lo + 1:
            return lo, points
        sized = {b: m for b, (m, _) in points.items() if m is not None}
        if lo in sized and hi in sized:
            (b1, m1), (b2, m2) = ((lo, capacity - (capacity - sized[lo]) * damp[True]),
                                  (hi, capacity + (sized[hi] - capacity) * damp[False]))
        else:
            b1, b2 = (sorted(sized, key=lambda b: abs(sized[b] - capacity)) + [0])[:2]
            m1, m2 = sized[b1], sized.get(b2, 0)
        slope = (m1 - m2) / (b1 - b2)
        guess = math.floor(b1 + (capacity - m1) / slope) if slope > 0 else 2 * max(lo, 1)
        guess = min(max(guess, lo + 1), hi - 1, 16 * max(points))
        points[guess] = measure(guess)
        ok = points[guess][1]
        if hi < math.inf and last is ok:  # the same end moved twice: pull the line to the other
            damp[not ok] /= 2
        else:
            damp = {True: 1.0, False: 1.0}
        last = ok if hi < math.inf else None
    raise RuntimeError(f'no answer after {max_measures} compiles: {points}')


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def _gib(n):
    return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def format_row(r):
    lines = [f"{r['step']} step, form {r['form']}: {r['global_batch']} images = "
             f"{r['per_chip_batch']} per chip of {r['image_size']}×{r['image_size']}"]
    if r['flops_per_chip'] is None:
        return '\n'.join(lines + [
            f"  HBM      {_gib(r['hbm_bytes_per_chip'])} needed, {_gib(r['hbm_capacity_bytes'])}"
            f" per chip: does NOT fit (libtpu: {r['compile_error']})"])
    verdict = 'fits' if r['fits'] else 'does NOT fit'
    return '\n'.join(lines + [
        f"  HBM      arguments {_gib(r['hbm_arguments_bytes'])} + outputs "
        f"{_gib(r['hbm_outputs_bytes'])} − donated {_gib(r['hbm_aliased_bytes'])} + temporaries"
        f" {_gib(r['hbm_temporaries_bytes'])} + program {_gib(r['hbm_program_bytes'])}",
        f"           = {_gib(r['hbm_bytes_per_chip'])} of {_gib(r['hbm_capacity_bytes'])}: "
        f"{verdict} ({100 * r['hbm_bytes_per_chip'] / r['hbm_capacity_bytes']:.0f} %)",
        f"  host     {r['host_bytes_per_chip'] / 1e6:.3g} MB per step sent to each chip (images "
        f"as fed), {r['host_bytes_per_chip'] / r['bound_seconds'] / 1e9:.2g} GB/s at the bound "
        "below",
        f"  FLOPs    {r['flops_per_chip']:.3e} per chip = {r['flops_per_image'] / 1e9:.4g} "
        f"GFLOP/image; the model: {r['model_flops_per_image'] / 1e9:.4g} GFLOP/image "
        f"({'3 × 2' if r['step'] == TRAIN else '2'} × multiply-adds)",
        f"  bytes    {r['bytes_accessed_per_chip']:.3e} accessed per chip",
        f"  bound    max({1e3 * r['compute_seconds']:.3g} ms compute at "
        f"{r['chip_peak_bf16_flops'] / 1e12:.0f} TFLOP/s, {1e3 * r['memory_seconds']:.3g} ms"
        f" memory at {r['chip_hbm_bytes_per_sec'] / 1e9:.0f} GB/s) = "
        f"{1e3 * r['bound_seconds']:.3g}"
        f" ms/step → ≤ {r['bound_images_per_sec_per_chip']:.0f} img/s per chip, "
        f"MFU ≤ {100 * r['bound_mfu']:.2g} %",
        f"  compiled in {r['compile_seconds']:.0f} s"])


def format_forms(rows):
    lines = [f"{'form':<10} {'fits':>5} {'HBM/chip':>11} {'GFLOP/img':>10} {'GB/step':>8} "
             f"{'bound ms':>9} {'≤ img/s/chip':>13} {'MFU ≤':>6} {'compile s':>10}"]
    for r in rows:
        if r['flops_per_chip'] is None:
            lines.append(f"{r['form']:<10} {'no':>5} {_gib(r['hbm_bytes_per_chip']):>11}")
            continue
        lines.append(
            f"{r['form']:<10} {'yes' if r['fits'] else 'no':>5} "
            f"{_gib(r['hbm_bytes_per_chip']):>11} {r['flops_per_image'] / 1e9:>10.2f} "
            f"{r['bytes_accessed_per_chip'] / 1e9:>8.1f} {1e3 * r['bound_seconds']:>9.1f} "
            f"{r['bound_images_per_sec_per_chip']:>13.0f} {100 * r['bound_mfu']:>5.0f}% "
            f"{r['compile_seconds']:>10.0f}")
    return '\n'.join(lines)


def run(config, tpu_slice, *, num_classes=None, form=None, max_batch=False, evaluate=False,
        log=print):
    """Everything the command prints, as one dict: the train step's row at top level, and
    'forms', 'eval', 'max_batch' when asked for. `log` receives each part as it is ready."""
    import numpy as np
    from jax.sharding import Mesh
    from resnext_jax.aggregated import FORMS
    from resnext_jax.parallel import DATA
    check_batch(config.batch_size, tpu_slice)
    num_classes = num_classes or dataset_classes(config)
    mesh = Mesh(np.asarray(tpus.slice_devices(tpu_slice)), (DATA,))  # as parallel.make_mesh
    chip = tpu_slice.chip
    log(f"{config.model} ({config.name or 'config'}), {num_classes} classes, {config.dtype}, "
        f"fsdp {'on' if config.fsdp else 'off'}, on {tpu_slice.name}"
        f"{f' × {tpu_slice.num_slices} slices' if tpu_slice.num_slices > 1 else ''}: "
        f"{tpu_slice.num_chips} × {chip.device_kind}"
        f"{f' ({chip.devices_per_chip} devices each)' if chip.devices_per_chip > 1 else ''} "
        f"({_gib(chip.hbm_bytes)} HBM, "
        f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_sec / 1e9:.0f} "
        f"GB/s). Compiler estimates per chip, not measured speed.\n")
    forms = [f for f in FORMS if f != 'auto'] if form == 'all' else [form]
    rows = []
    for f in forms:
        rows.append(plan_step(tpu_config(config, f), tpu_slice, mesh, num_classes))
        log(format_row(rows[-1]) + '\n')
    result = dict(rows[0])
    if form == 'all':
        result['forms'] = rows
        log(format_forms(rows) + '\n')
    if evaluate:
        result['eval'] = plan_step(tpu_config(config, form if form != 'all' else None),
                                   tpu_slice, mesh, num_classes, step=EVAL)
        log(format_row(result['eval']) + '\n')
    if max_batch:
        cfg = tpu_config(config, form if form != 'all' else None)
        first = next((r for r in rows if r['form'] == cfg.form), None) or plan_step(
            cfg, tpu_slice, mesh, num_classes)
        measured = {}

        def measure(b):
            r = plan_step(cfg, tpu_slice, mesh, num_classes, per_chip_batch=b)
            measured[b] = r
            log(f"  per-chip batch {b}: {_gib(r['hbm_bytes_per_chip'])}, "
                f"{'fits' if r['fits'] else 'does not fit'}")
            return r['hbm_bytes_per_chip'], r['fits']

        step = batch_step(cfg, tpu_slice)
        log(f'largest per-chip batch of the train step, form {cfg.form}, in steps of {step}:')
        k, points = largest_fitting(
            lambda k: measure(k * step), chip.hbm_bytes,
            {first['per_chip_batch'] // step: (first['hbm_bytes_per_chip'], first['fits'])})
        b = k * step
        result['max_batch'] = {
            'form': cfg.form, 'max_per_chip_batch': b, 'max_global_batch': b * tpu_slice.num_chips,
            'per_chip_batch_step': step, 'hbm_bytes_per_chip': points[k][0] if k else None,
            'compiles': len(measured),
            'measured': {str(k * step): v[0] for k, v in sorted(points.items())}}
        log(f'  → {b} per chip ({b * tpu_slice.num_chips} global) fits, {b + step} does not; '
            f'{len(measured)} compiles beyond the first\n')
    return result


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
    try:
        if FLAGS.config is None:
            raise ValueError('pass --config, e.g. --config=configs/paper.py:ROW')
        if not FLAGS.topology:
            raise ValueError(f'pass --topology, one of: {tpus.known_names()}')
        tpu_slice = tpus.parse_slice(FLAGS.topology, FLAGS['num-slices'].value)
        check_batch(FLAGS.config.batch_size, tpu_slice)
        if not tpus.libtpu_installed():
            raise ValueError("libtpu is not installed: pip install -e '.[tpu]'")
        form = FLAGS.form
        if form not in (None, 'all'):
            from resnext_jax.aggregated import check_form
            check_form(form)
        from resnext_jax import validate   # TensorFlow starts now
        validate.check_config(FLAGS.config)   # what train.py would refuse
        import jax
        jax.config.update('jax_platforms', 'cpu')  # the local backend only traces; no TPU needed
        out = sys.stderr if FLAGS.json else sys.stdout  # with --json, stdout is the JSON alone
        result = run(FLAGS.config, tpu_slice, num_classes=FLAGS['num-classes'].value, form=form,
                     max_batch=FLAGS['max-batch'].value, evaluate=FLAGS.eval,
                     log=lambda s: print(s, file=out, flush=True))
    except ValueError as e:
        sys.exit(f'error: {e}')
    if FLAGS.json:
        print(json.dumps(result))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=functools.partial(
        cli.parse_flags, hint='python -m resnext_jax.plan --helpfull lists every flag'))
