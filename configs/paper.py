"""Every accuracy row of the paper: `python train.py --config=configs/paper.py:ROW`.

ROW is an id from `resnext_jax.tables.ROWS` (`python -m resnext_jax.tables --results` lists
them beside the paper's numbers), e.g.

    table3_resnext50_32x4d       ImageNet, ResNeXt-50 32×4d      expected top-1 error 22.2 %
    table4_resnext101_64x4d      ImageNet, ResNeXt-101 64×4d     20.4 % / top-5 5.3 %
    table5_resnext101_64x4d_320  the same network tested on 320×320 crops: 19.1 % / 4.4 %
    table7_cifar10_resnext29_8x64d   CIFAR-10, 3.65 %   (…_cifar100_…: 17.77 %)
    fig7_cifar10_resnext29_4x64d     CIFAR-10, a point of Fig. 7 (plotted, not printed)

ImageNet recipe (paper Sec. 4, official code = facebookresearch/ResNeXt on fb.resnet.torch),
sized for 8 GPUs or a TPU slice with 8 cores: batch 256 (32 images per device: `bn_group_size`
32 reproduces per-GPU BN on any mesh), SGD momentum 0.9 with Nesterov (official code; the paper
is silent), weight decay 1e-4 on every parameter, learning rate 0.1 per 256 images scaled
linearly with `batch_size`, divided by 10 three times with the schedule of fb.resnet.torch
(epochs 30, 60, 80 of 90). Scale + aspect-ratio crop and flip (paper), colour jitter 0.4 and
PCA lighting 0.1 (official code). Evaluation: resize the shorter side to 256, centre 224 crop.
Data: TFDS `imagenet2012` (manual download into `data_dir`).

CIFAR recipe (paper Sec. 5.3, sized for 8 GPUs): batch 128 (16 images per GPU:
`bn_group_size` 16), learning rate 0.1, weight decay 5e-4, momentum 0.9 (Nesterov as the
official code), 300 epochs, ÷10 at 150 and 225, 4-pixel zero padding + 32 crop + flip.
Data: TFDS `cifar10` / `cifar100`.

Where the paper and the official code disagree the paper wins: the Table 5 320×320 test crop is
of the image resized to 320·256/224 = 366 (the paper gives the crop only; we keep the 224/256
ratio). To test a finished Table 4 run at 320, copy its workdir and run this row on the copy:
the run is complete, so train.py only evaluates. Wide ResNet (Table 7) is not provided.
"""
from configs import default
from resnext_jax.tables import ALIASES, ROW_IDS


def imagenet(c):
    c.dataset, c.train_split, c.eval_split = 'imagenet2012', 'train', 'validation'
    c.image_size, c.augment = 224, 'imagenet'   # eval: shorter side 256, centre 224
    c.color_jitter, c.pca_lighting = 0.4, 0.1
    c.batch_size, c.learning_rate, c.lr_base_batch_size = 256, 0.1, 256
    c.momentum, c.nesterov, c.weight_decay = 0.9, True, 1e-4
    c.schedule, c.lr_boundaries_epochs, c.num_epochs = 'step', (30, 60, 80), 90.0
    c.bn_group_size = 32
    c.checkpoint_every_steps = 5000
    return c


def cifar(c, dataset):
    c.dataset, c.train_split, c.eval_split = dataset, 'train', 'test'
    c.image_size, c.augment = 32, 'cifar'
    c.batch_size, c.learning_rate, c.lr_base_batch_size = 128, 0.1, 128
    c.momentum, c.nesterov, c.weight_decay = 0.9, True, 5e-4
    c.schedule, c.lr_boundaries_epochs, c.num_epochs = 'step', (150, 225), 300.0
    c.bn_group_size = 16
    c.log_every_steps, c.checkpoint_every_steps = 50, 2000
    return c


def get_config(row='table3_resnext50_32x4d'):
    row = ALIASES.get(row, row)
    if row not in ROW_IDS:
        raise ValueError(f'unknown paper row {row!r}; use one of {", ".join(ROW_IDS)}')
    spec = ROW_IDS[row]
    if not spec.provided:
        raise ValueError(f'{row} ({spec.label}) is not provided by this project')
    c = default.get_config()
    c.name, c.model = row, spec.model
    if spec.dataset == 'imagenet2012':
        imagenet(c)
    else:
        cifar(c, spec.dataset)
    if spec.eval_size:
        c.eval_image_size = spec.eval_size   # resized to eval_size × 256/224 first
    return c
