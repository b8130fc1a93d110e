"""Training-step and inference speed of a network on this machine, beside PyTorch; a recipe's
step beside the host cores its input pipeline needs to feed it.

    python -m resnext_jax.benchmark --model resnext50_32x4d --batch-size 16 --image-size 224
    python -m resnext_jax.benchmark --model resnext29_8x64d --batch-size 32 --form all --torch
    python -m resnext_jax.benchmark --layer --batch-size 16 --image-size 56 --width 128 --groups 32
    python -m resnext_jax.benchmark --config=configs/modern.py:rsb_a1_resnext50_32x4d \
        --config.batch_size=16 --config.dataset=folder:DIR [--seconds=30] [--json]
    python -m resnext_jax.benchmark --input --config=configs/paper.py:table3_resnext50_32x4d \
        --config.data_dir=DIR [--seconds=30] [--json]

A training step is the whole jitted update of `resnext_jax.step.train_step`: forward,
backward, SGD with momentum and weight decay, BN statistics; the state is donated, the batch
sharded over every local device. Inference is the jitted eval-mode forward pass. Each figure is
the median over `--steps` timed calls after `--warmup` untimed ones (the first call, which
compiles, is timed separately). Memory: the device's peak bytes in use, read after the timed
steps, where the device reports it (GPU, TPU; for the whole process, so `--mode train` gives
the training step's alone), and beside it what XLA planned for the compiled step (arguments
+ outputs − donated + temporaries). `--torch` times
the same network built from torchvision's `ResNet` (groups, width_per_group) in the same
process, channels_last, with `torch.optim.SGD`, on the device kind JAX uses (CPU, or CUDA for a
GPU; `torch_device`; its peak is `torch.cuda.max_memory_allocated`); torch and torchvision are
an optional extra.

`--config` (a training recipe) times the step train.py would compile for it (`step.make_steps`:
its network, dtype, optimizer, loss, Mixup/CutMix, EMA and, with `augment_on='device'`, its
per-pixel augmentation) on uint8 batches of `--config.batch_size`, then its input pipeline's
training images/s per busy host core, and divides the one by the other: the host cores it
takes to keep the step fed.
`--layer` times one 3×3 grouped convolution in every form instead of a network. `--input`
times the input pipeline of a training config alone (`resnext_jax.data`: reading, decoding,
augmentation, batching) for training and for evaluation, with this host's batch
(`--config.batch_size`): images/s, the CPU cores it kept busy (process CPU time over wall time)
and images/s per busy core, the figure that says how many host cores feed an accelerator. Run as a
program, it first applies `resnext_jax.runtime.prepare_process()` (YNNPACK fusions, huge pages;
the header line shows the resulting XLA_FLAGS and GLIBC_TUNABLES).
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnext_jax import cli, parallel
from resnext_jax.aggregated import FORMS, block_diagonal, conv, resolve_form, sliced_conv
from resnext_jax.models import create_model, model_spec
from resnext_jax.summary import macs_by_scope
from resnext_jax.tpus import CHIPS as TPU_CHIPS

# Dense bf16 peak of accelerators we know, for model FLOP utilisation (FLOP/s, 2 per MAC);
# the TPUs' with their sources in resnext_jax.tpus.
PEAK_BF16_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                   **{c.device_kind: c.peak_bf16_flops for c in TPU_CHIPS.values()}}


@dataclasses.dataclass
class Row:
    framework: str
    form: str
    train_images_per_sec: float | None = None
    infer_images_per_sec: float | None = None
    compile_sec: float | None = None
    peak_memory_mb: float | None = None      # the device's peak, after the timed steps
    planned_memory_mb: float | None = None   # XLA's plan for the compiled step
    mfu: float | None = None


def _median_time(fn, steps, warmup):
    """(seconds of the first call, median seconds of `steps` calls after `warmup` more)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def _peak_flops():
    kind = jax.devices()[0].device_kind
    return next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0]))
                 if k.lower() in kind.lower()), None)


def _memory_stats():
    return jax.local_devices()[0].memory_stats() or {}


def peak_memory_mb():
    """The first local device's peak bytes in use so far, in MiB; None where the device reports
    none (CPU). Read it after the work it should cover."""
    stats = _memory_stats()
    return stats['peak_bytes_in_use'] / 2**20 if 'peak_bytes_in_use' in stats else None


def planned_memory_mb(compiled):
    """What XLA planned for a compiled program per device: arguments + outputs − the donated
    arguments reused for outputs + temporaries, in MiB (None where it does not say)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**20


def time_train_step(row, jitted, state, batch, steps, warmup):
    """Compiles `jitted` (a train step that donates its state) for (state, batch), records the
    compile seconds and XLA's plan in `row`, and returns the median seconds of `steps` steps
    after `warmup` (`_median_time`), each timed to its metrics."""
    t = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    row.compile_sec = time.perf_counter() - t
    row.planned_memory_mb = planned_memory_mb(compiled)

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    return _median_time(run, steps, warmup)[1]


def bench_jax(name, batch_size, image_size, form, mode, dtype, steps, warmup, bn_group_size=0):
    from resnext_jax import step as step_lib
    model = create_model(name, form=form, dtype=dtype, bn_group_size=bn_group_size or None)
    row = Row('jax', form if form != 'auto' else f'auto={resolve_form(form)}')
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = jax.device_put(
        rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
        parallel.batch_sharding(mesh))
    labels = jax.device_put(rng.integers(0, model.num_classes, batch_size).astype(np.int32),
                            parallel.batch_sharding(mesh))
    variables = jax.jit(model.init, out_shardings=parallel.replicated(mesh))(
        jax.random.key(0), images[:1])
    peak = _peak_flops()
    macs = peak and sum(macs_by_scope(create_model(name, form='grouped').apply, variables,
                                      images[:1]).values())
    if mode in ('infer', 'both'):
        infer = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
            variables, images).compile()
        row.planned_memory_mb = planned_memory_mb(infer)
        _, dt = _median_time(lambda: jax.block_until_ready(infer(variables, images)),
                             steps, warmup)
        row.infer_images_per_sec = batch_size / dt
    if mode in ('train', 'both'):
        config = ml_collections.ConfigDict(dict(weight_decay=1e-4, decay_bn_and_bias=True,
                                                momentum=0.9, nesterov=False))
        tx = step_lib.create_optimizer(config, 0.1)
        state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                                 batch_stats=variables['batch_stats'],
                                 opt_state=tx.init(variables['params']))
        step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx),
                       donate_argnums=0)
        dt = time_train_step(row, step, state, {'image': images, 'label': labels}, steps,
                             warmup)
        row.train_images_per_sec = batch_size / dt
        if peak:  # the model's FLOPs: 2 per multiply-add, backward twice the forward
            row.mfu = 3 * 2 * macs * batch_size / dt / (peak * jax.device_count())
    row.peak_memory_mb = peak_memory_mb()   # after the timed work, not after compiling
    return row


def import_torchvision():
    """torchvision, also where its compiled ops do not match the installed torch (a CPU torch
    beside a CUDA torchvision wheel): the model classes are pure Python and need none of them."""
    import torch  # noqa: PLC0415 (optional extra)
    try:
        import torchvision  # noqa: PLC0415
    except RuntimeError:  # "operator torchvision::nms does not exist"
        import types  # noqa: PLC0415
        for mod in [m for m in sys.modules if m.startswith('torchvision')]:
            del sys.modules[mod]
        sys.modules['torchvision._meta_registrations'] = types.ModuleType('skipped')
        import torchvision  # noqa: PLC0415
    return torch, torchvision


def torch_model(name):
    """The network of `name` from torchvision's ResNet class (CIFAR: 3×3 stem, 3 stages)."""
    torch, torchvision = import_torchvision()
    from torchvision.models.resnet import Bottleneck, ResNet  # noqa: PLC0415
    spec = model_spec(name)
    layers = list(spec['stage_sizes'])
    cifar = spec['stem'] == 'cifar'
    model = ResNet(Bottleneck, layers + [1] * (4 - len(layers)), groups=spec['cardinality'],
                   width_per_group=spec['bottleneck_width'], num_classes=spec['num_classes'])
    if cifar:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
        model.layer4 = torch.nn.Identity()
        model.fc = torch.nn.Linear(1024, spec['num_classes'])
    return model


def torch_device(jax_backend, cuda_available):
    """Where PyTorch runs beside JAX: on the same kind of device, so that "×torch" compares like
    with like ('cpu' or 'cuda'); a ValueError where it cannot."""
    if jax_backend == 'cpu':
        return 'cpu'
    if jax_backend == 'gpu' and cuda_available:
        return 'cuda'
    raise ValueError(f'--torch: JAX runs on {jax_backend}, where this PyTorch cannot run '
                     '(a GPU needs a CUDA build of torch; TPUs are not compared); drop --torch '
                     'or run on CPU with JAX_PLATFORMS=cpu')


def bench_torch(name, batch_size, image_size, mode, dtype, steps, warmup):
    import torch  # noqa: PLC0415
    device = torch_device(jax.default_backend(), torch.cuda.is_available())
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    model = torch_model(name).to(device, memory_format=torch.channels_last)
    import torchvision   # noqa: PLC0415
    row = Row(f'torch {torch.__version__}', f'torchvision {torchvision.__version__} ({device})')
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    cast = (torch.autocast(device, torch.bfloat16) if dtype == 'bfloat16'
            else contextlib.nullcontext())
    if mode in ('train', 'both'):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with cast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sync()   # GPU work is asynchronous: time it to the end
        _, dt = _median_time(step, steps, warmup)
        row.train_images_per_sec = batch_size / dt
    if mode in ('infer', 'both'):
        model.eval()

        def infer():
            with torch.inference_mode(), cast:
                model(x)
            sync()
        _, dt = _median_time(infer, steps, warmup)
        row.infer_images_per_sec = batch_size / dt
    if device == 'cuda':
        row.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_layer(batch_size, size, width, groups, steps, warmup):
    """One 3×3, `width`→`width`, `groups`-group convolution: forward and forward+backward."""
    forms = {
        'grouped': lambda x, w: conv(x, w, 1, groups),
        'blockdiag': lambda x, w: conv(x, block_diagonal(w, groups)),
        'sliced': lambda x, w: sliced_conv(x, w, groups),
        'concat': lambda x, w: jnp.concatenate([conv(a, b) for a, b in zip(
            jnp.split(x, groups, -1), jnp.split(w, groups, -1))], -1),
    }
    x = jax.random.normal(jax.random.key(0), (batch_size, size, size, width))
    w = jax.random.normal(jax.random.key(1), (3, 3, width // groups, width))
    rows = []
    for form, f in forms.items():
        fwd = jax.jit(f)
        both = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1)))
        _, t_fwd = _median_time(lambda: jax.block_until_ready(fwd(x, w)), steps, warmup)
        _, t_both = _median_time(lambda: jax.block_until_ready(both(x, w)), steps, warmup)
        rows.append(dict(form=form, forward_sec=t_fwd, forward_backward_sec=t_both))
    return rows


def environment():
    return dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                device_count=jax.device_count(), cpu_count=os.cpu_count(),
                jax=jax.__version__, python=platform.python_version(),
                xla_flags=os.environ.get('XLA_FLAGS', ''),
                glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))


def _fmt(v, spec, suffix=''):
    """`v` formatted by `spec` (+ `suffix`), or '—' right-aligned to the same width."""
    if v is None:
        return '—'.rjust(len(format(0.0, spec) + suffix))
    return format(v, spec) + suffix


# The table's columns: (title, width); framework and form left-aligned, figures right.
COLUMNS = (('framework', 20), ('form', 34), ('train img/s', 11), ('infer img/s', 11),
           ('compile s', 9), ('peak MB', 9), ('plan MB', 9), ('MFU', 6))
RATIO_COLUMNS = (('train ×torch', 12), ('infer ×torch', 12))


def format_header(with_torch=False):
    cells = [f'{t:{w}}' if i < 2 else f'{t:>{w}}' for i, (t, w) in enumerate(COLUMNS)]
    return ' '.join(cells + ([f'{t:>{w}}' for t, w in RATIO_COLUMNS] if with_torch else []))


def format_row(r, torch_row=None):
    """One line of the table: `r`, and with `torch_row` its speed as a multiple of PyTorch's."""
    line = (f'{r.framework:20} {r.form:34} {_fmt(r.train_images_per_sec, "11.2f")} '
            f'{_fmt(r.infer_images_per_sec, "11.2f")} {_fmt(r.compile_sec, "9.1f")} '
            f'{_fmt(r.peak_memory_mb, "9.0f")} {_fmt(r.planned_memory_mb, "9.0f")} '
            f'{_fmt(r.mfu and 100 * r.mfu, "5.1f", "%")}')
    if torch_row is not None:   # PyTorch's own row: 1.00
        def ratio(a, b):
            return a / b if a and b else None
        line += (f' {_fmt(ratio(r.train_images_per_sec, torch_row.train_images_per_sec), "12.2f")}'
                 f' {_fmt(ratio(r.infer_images_per_sec, torch_row.infer_images_per_sec), "12.2f")}')
    return line



def _cpu_seconds():
    t = os.times()
    return t.user + t.system


def bench_input(config, part, seconds, source=None):
    """The input pipeline alone: {'part', 'images', 'seconds', 'images_per_sec', 'cpu_cores',
    'images_per_core_sec'} over `seconds` after its first batch (which builds it). `part` is
    'train' (augmented, endless) or 'eval' (repeated; padding is not counted)."""
    from resnext_jax import data, sources   # TensorFlow: only for this mode
    source = source or sources.make_source(config)

    def batches():
        if part == 'train':
            yield from data.train_batches(config, config.batch_size, source=source)
        while True:
            yield from data.eval_batches(config, config.batch_size, source=source)

    stream = batches()
    next(stream)
    images, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        batch = next(stream)
        images += int(batch['mask'].sum()) if 'mask' in batch else len(batch['label'])
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return dict(part=part, images=images, seconds=wall, images_per_sec=images / wall,
                cpu_cores=cpu / wall, images_per_core_sec=images / cpu)


def source_kind(source):
    from resnext_jax import sources
    if isinstance(source, sources.RecordSource):
        return 'TFDS ArrayRecord, read by index'
    if isinstance(source, sources.TfdsSource):
        return 'TFDS TFRecord, streamed'
    if getattr(source, 'encoding', None) == 'file':
        return 'image folder'
    return 'in memory' + (', encoded' if getattr(source, 'encoding', None) else '')


def bench_recipe(config, num_classes, steps, warmup):
    """The training step train.py compiles for `config` (`step.make_steps`: with its per-pixel
    augmentation when `augment_on='device'`), timed on random uint8 (or, fed from a host that
    adds colour noise, bfloat16) batches of `config.batch_size` over every local device: a
    `Row` with train images/s, compile seconds and memory."""
    from resnext_jax import image_settings, step as step_lib
    mesh = parallel.make_mesh()
    model, _, tx, init, _, shardings = step_lib.setup(config, num_classes, mesh, 1000, 90_000)
    size, b = config.image_size, config.batch_size
    rng = np.random.default_rng(0)
    feed = jnp.dtype(image_settings.feed_dtype(config, True))
    batch = jax.device_put(
        {'image': rng.integers(0, 256, (b, size, size, 3)).astype(feed),
         'label': rng.integers(0, num_classes, b).astype(np.int32)},
        parallel.batch_sharding(mesh))
    row = Row('jax', f'{config.form}, {config.dtype}')
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        p_train, _ = step_lib.make_steps(config, model, tx, mesh, shardings, num_classes, 1000)
        dt = time_train_step(row, p_train, state, batch, steps, warmup)
    row.train_images_per_sec = b / dt
    row.peak_memory_mb = peak_memory_mb()
    return row


def describe_augmentation(config):
    """The per-pixel training augmentation of `config` and where it runs, in words."""
    from resnext_jax import image_settings
    parts = [f'colour jitter {config.color_jitter}' if config.color_jitter else '',
             f'PCA lighting {config.pca_lighting}' if config.pca_lighting else '',
             config.get('auto_augment', ''),
             f"random erasing {config.random_erase}" if config.get('random_erase', 0.0) else '']
    parts = [p for p in parts if p]
    if not parts:
        return 'no per-pixel augmentation'
    where = 'in the step' if image_settings.on_device(config) else 'on the host'
    return f"{', '.join(parts)} {where} (augment_on='{config.get('augment_on', 'auto')}')"


def config_main(argv, input_only):
    """`--config` (a recipe's step and the host cores that feed it) and `--input` (its input
    pipeline alone): absl flags, so that --config=FILE[:ROW] and --config.FIELD=VALUE read as
    in train.py."""
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file('config', None, 'Training recipe, e.g. configs/paper.py:ROW.')
    flags.DEFINE_float('seconds', 30.0, 'Seconds the input pipeline is timed per part, after '
                                        'its first batch.')
    flags.DEFINE_boolean('json', False, 'Print one JSON object.')
    flags.DEFINE_boolean('input', False, 'Time the input pipeline alone.')
    flags.DEFINE_integer('steps', 5, 'Timed steps (median reported).', lower_bound=1)
    flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first.', lower_bound=0)
    flags.DEFINE_integer('num-classes', None, "Default: the dataset's.", lower_bound=1)

    def run(_):
        config, seconds = flags.FLAGS.config, flags.FLAGS.seconds
        if config is None:
            sys.exit(f"error: {'--input' if input_only else '--config'} needs "
                     '--config=configs/NAME.py[:ROW]')
        if not (math.isfinite(seconds) and seconds > 0):
            sys.exit(f'error: --seconds {seconds} is not a finite number > 0: pass e.g. '
                     '--seconds=30')
        from resnext_jax import validate
        try:
            validate.check_config(config)
            if not input_only and config.batch_size % jax.device_count():
                raise ValueError(f'batch_size {config.batch_size} is not divisible by the '
                                 f'{jax.device_count()} devices: fix --config.batch_size')
            try:
                from resnext_jax import sources   # TensorFlow starts now
            except ImportError as e:
                if input_only:
                    raise ValueError(f'--input needs TensorFlow ({e})') from None
                source = None   # the step alone, where no TensorFlow is installed
            else:
                source = sources.make_source(config)
        except ValueError as e:
            sys.exit(f'error: {e}')
        if input_only:
            rows = [bench_input(config, part, seconds, source) for part in ('train', 'eval')]
            return print_input(config, source, rows, flags.FLAGS.json)
        num_classes = (flags.FLAGS['num-classes'].value
                       or (source.num_classes if source else 1000))
        row = bench_recipe(config, num_classes, flags.FLAGS.steps, flags.FLAGS.warmup)
        feed = bench_input(config, 'train', seconds, source) if source else None
        print_recipe(config, source, num_classes, row, feed, flags.FLAGS.json)

    app.run(run, argv=argv, flags_parser=functools.partial(
        cli.parse_flags, hint='python -m resnext_jax.benchmark --help describes every option'))


def print_input(config, source, rows, as_json):
    cores = os.cpu_count()
    if as_json:
        print(json.dumps(dict(dataset=config.dataset, source=source_kind(source),
                              batch_size=config.batch_size, image_size=config.image_size,
                              augment=config.augment, augmentation=describe_augmentation(config),
                              cpu_count=cores, rows=rows), indent=1))
        return
    print(f'input pipeline: {config.dataset} ({source_kind(source)}), batch '
          f'{config.batch_size}, {config.image_size}×{config.image_size}, augment '
          f'{config.augment}, {describe_augmentation(config)}, {cores} CPU cores on this host')
    print('| part | images/s | CPU cores busy | images/s per core |')
    print('|---|---:|---:|---:|')
    for r in rows:
        print(f"| {r['part']} | {r['images_per_sec']:.0f} | {r['cpu_cores']:.2f} | "
              f"{r['images_per_core_sec']:.0f} |")


def print_recipe(config, source, num_classes, row, feed, as_json):
    """The recipe's step, its input pipeline per host core, and the cores that feed the one
    with the other."""
    from resnext_jax import image_settings
    env = environment()
    cores = feed and row.train_images_per_sec / feed['images_per_core_sec']
    if as_json:
        print(json.dumps(dict(
            environment=env, recipe=config.name, model=config.model, num_classes=num_classes,
            batch_size=config.batch_size, image_size=config.image_size, dtype=config.dtype,
            augment_on=config.get('augment_on', 'auto'),
            augment_place=image_settings.augment_place(config),
            augmentation=describe_augmentation(config), step=dataclasses.asdict(row),
            input=feed and dict(feed, dataset=config.dataset, source=source_kind(source)),
            host_cores_to_feed=cores), indent=1))
        return
    print(f"{config.name or 'config'}: {config.model}, batch {config.batch_size}, "
          f"{config.image_size}×{config.image_size}, {config.dtype}, "
          f"{describe_augmentation(config)}; {env['backend']} ({env['device']}, "
          f"{env['device_count']} device(s)), {env['cpu_count']} CPU cores, jax {env['jax']}")
    print(f'  step    {row.train_images_per_sec:.2f} images/s (median of the timed steps), '
          f'compiled in {row.compile_sec:.1f} s; memory MB: peak '
          f'{_fmt(row.peak_memory_mb, ".0f")}, planned {_fmt(row.planned_memory_mb, ".0f")}')
    if feed is None:
        print('  input   not timed: TensorFlow is not installed')
        return
    print(f"  input   {feed['images_per_core_sec']:.0f} training images/s per busy host core "
          f"({feed['images_per_sec']:.0f} images/s on {feed['cpu_cores']:.2f} cores; "
          f'{config.dataset}, {source_kind(source)})')
    print(f"  feeding {row.train_images_per_sec:.2f} / {feed['images_per_core_sec']:.0f} = "
          f'{cores:.2f} host cores keep the step fed')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '--input' in argv or any(a.startswith('--config') for a in argv):
        return config_main([sys.argv[0]] + argv, input_only='--input' in argv)
    p = cli.ArgumentParser(prog='python -m resnext_jax.benchmark',
                           description=__doc__.split('\n\n')[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)   # --inp must not pass for --input
    p.add_argument('--model', default='resnext50_32x4d',
                   help='network name (python -m resnext_jax.summary --list prints them)')
    p.add_argument('--batch-size', type=cli.integer(1), default=16,
                   help='images per step, split over every local device')
    p.add_argument('--image-size', type=cli.integer(1), default=None,
                   help='default: 224, CIFAR nets 32')
    p.add_argument('--mode', choices=('train', 'infer', 'both'), default='both',
                   help='time the training step, inference, or both')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='computation dtype (parameters stay float32)')
    p.add_argument('--bn-group-size', type=cli.integer(0), default=0,
                   help='training BN statistics per group of this many images (0: the batch)')
    p.add_argument('--form', default='auto',
                   help=f'one of {", ".join(FORMS)}, a comma-separated list, or "all"')
    p.add_argument('--torch', action='store_true', help='also time torchvision (optional extra)')
    p.add_argument('--steps', type=cli.integer(1), default=5,
                   help='timed calls (median reported)')
    p.add_argument('--warmup', type=cli.integer(0), default=2,
                   help='untimed calls after the first')
    p.add_argument('--layer', action='store_true', help='time one grouped 3×3 conv per form')
    p.add_argument('--width', type=cli.integer(1), default=128, help='--layer: channels')
    p.add_argument('--groups', type=cli.integer(1), default=32,
                   help='--layer: groups, a divisor of --width')
    p.add_argument('--json', action='store_true', help='print one JSON object')
    # Read by absl in config_main, as train.py reads them; here for --help.
    p.add_argument('--config', metavar='FILE[:ROW]',
                   help='a training recipe, e.g. configs/modern.py:ROW (with '
                        '--config.FIELD=VALUE overrides): time the step train.py compiles for '
                        'it, its augmentation included, and its input pipeline per host core; '
                        'with --steps, --warmup, --seconds, --num-classes and --json only')
    p.add_argument('--input', action='store_true',
                   help='with --config: time its input pipeline alone, training and evaluation')
    p.add_argument('--seconds', type=float, metavar='S',
                   help='--config: seconds the input pipeline is timed, after its first batch '
                        '(default: 30)')
    p.add_argument('--num-classes', type=cli.integer(1), metavar='N',
                   help="--config: classes of the network (default: the dataset's)")
    args = p.parse_args(argv)
    if args.seconds is not None or args.num_classes is not None:
        p.error('--seconds and --num-classes go with --config')

    try:
        spec = model_spec(args.model)
        forms = ([f for f in FORMS if f != 'auto'] if args.form == 'all'
                 else args.form.split(','))
        for f in forms:
            if f not in FORMS:
                raise ValueError(f'unknown form {f!r}; use one of {", ".join(FORMS)} or "all"')
        if not args.layer and args.batch_size % jax.device_count():
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by the '
                             f'{jax.device_count()} devices; use a multiple')
        if args.layer and args.width % args.groups:
            raise ValueError(f'--groups {args.groups} does not divide --width {args.width}: '
                             'use a divisor')
        if args.bn_group_size and args.batch_size % args.bn_group_size:
            raise ValueError(f'--bn-group-size {args.bn_group_size} does not divide '
                             f'--batch-size {args.batch_size}: use a divisor, or 0 for the batch')
        if args.torch:
            try:
                import_torchvision()
            except ImportError:
                raise ValueError("--torch needs torch and torchvision: pip install -e '.[torch]'"
                                 ) from None
            import torch  # noqa: PLC0415
            torch_device(jax.default_backend(), torch.cuda.is_available())
    except ValueError as e:
        sys.exit(f'error: {e}')
    size = args.image_size or (32 if spec['stem'] == 'cifar' else 224)
    env = environment()
    if args.layer:
        rows = bench_layer(args.batch_size, size, args.width, args.groups, args.steps,
                           args.warmup)
        if args.json:
            print(json.dumps(dict(environment=env, layer=rows), indent=1))
        else:
            print(f'3×3 conv {args.width}→{args.width}, {args.groups} groups, '
                  f'{args.batch_size}×{size}×{size}, {env["backend"]}')
            for r in rows:
                print(f"{r['form']:10} forward {r['forward_sec']:.3f} s   forward+backward "
                      f"{r['forward_backward_sec']:.3f} s")
        return
    def show(line):   # the text table, one line as each row is measured
        if not args.json:
            print(line, flush=True)

    show(f'{args.model}, batch {args.batch_size}, {size}×{size}, {args.dtype}, '
         f'{env["backend"]} ({env["device"]}, {env["device_count"]} device(s), '
         f'{env["cpu_count"]} CPU cores), jax {env["jax"]}'
         + ''.join(f', {k.upper()}={env[k]}' for k in ('xla_flags', 'glibc_tunables')
                   if env[k]))
    show(format_header(args.torch))
    rows, torch_row = [], None
    if args.torch:   # first: each JAX row then shows its speed as a multiple of PyTorch's
        torch_row = bench_torch(args.model, args.batch_size, size, args.mode, args.dtype,
                                args.steps, args.warmup)
        rows.append(torch_row)
        show(format_row(torch_row, torch_row))
    for f in forms:
        rows.append(bench_jax(args.model, args.batch_size, size, f, args.mode, args.dtype,
                              args.steps, args.warmup, args.bn_group_size))
        show(format_row(rows[-1], torch_row))
    if args.json:
        print(json.dumps(dict(environment=env, model=args.model, batch_size=args.batch_size,
                              image_size=size, dtype=args.dtype,
                              rows=[dataclasses.asdict(r) for r in rows]), indent=1))


if __name__ == '__main__':
    from resnext_jax import runtime
    runtime.prepare_process()
    main()
