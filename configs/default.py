"""Defaults for every field that train.py reads; recipes override what they change.

Sized for ImageNet ResNeXt-50 32x4d as in the paper (Sec. 4): batch 256, SGD momentum 0.9,
weight decay 1e-4, learning rate 0.1 per 256 images, divided by 10 on a step schedule.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.name = ''                    # recipe id, e.g. a paper row (resnext_jax.tables)

    # Model: a registered name (resnext_jax.list_models()) or resnext<depth>_<C>x<d>d.
    c.model = 'resnext50_32x4d'
    c.model_options = {}           # other ResNeXt fields, e.g. {'stage_sizes': (1, 1, 1, 1)}
    c.form = 'auto'                # how the aggregated transformation runs (resnext_jax.FORMS)
    c.dtype = 'float32'            # compute dtype; 'bfloat16' keeps float32 parameters
    c.zero_init_last_bn = False
    c.bn_group_size = 0            # 0: BN statistics over the global batch; N: per N images
    c.drop_path_rate = 0.0         # stochastic depth, last block's rate (linear from 0; timm's)
    c.dropout = 0.0                # dropout on the pooled features before the classifier
    c.init_from = ''               # weights to start from: a convert.py checkpoint or a workdir
    c.init_from_ema = False        # init_from a workdir's EMA weights (one trained with ema_decay)

    # Data (resnext_jax.data): 'digits', a TFDS name, or 'folder:/path/to/root'.
    c.dataset = 'imagenet2012'
    c.train_split = 'train'
    c.eval_split = 'validation'
    c.data_dir = config_dict.placeholder(str)    # TFDS data_dir; None: TFDS's default
    c.in_memory = config_dict.placeholder(bool)  # None: decided by dataset size
    c.image_size = 224
    c.eval_image_size = config_dict.placeholder(int)  # test crop; None: image_size
    c.eval_resize = config_dict.placeholder(int)  # shorter side before the eval centre crop
    #                              ('imagenet' augment); None: the crop × 256/224, as 256 → 224
    c.augment = 'imagenet'         # 'imagenet', 'cifar' or 'none'
    c.interpolation = 'bilinear'   # of every resize: 'bilinear' or 'bicubic' (timm's weights)
    c.color_jitter = 0.0           # brightness/contrast/saturation ± this, random order
    c.pca_lighting = 0.0           # std of the PCA lighting noise (official code: 0.1)
    c.auto_augment = ''            # '', 'ta_wide' (TrivialAugment-Wide) or a RandAugment spec
    #                                in timm's notation, e.g. 'rand-m9-n2-mstd0.5'
    c.random_erase = 0.0           # probability of random erasing (random-pixel fill)
    c.augment_on = 'auto'          # where colour, lighting, auto_augment and erasing run: 'device'
    #                                (in the jitted step), 'host' (per image, in tf.data) or
    #                                'auto': 'device', but 'host' for auto_augment on TPUs
    c.repeated_augments = 1        # k > 1: each example k times per epoch-sized stream span
    c.mean = config_dict.placeholder(tuple)  # RGB mean, 0..255 units; None: per dataset
    c.std = config_dict.placeholder(tuple)   # RGB std; None: per dataset (resnext_jax.data)
    c.crop_padding = config_dict.placeholder(int)  # 'cifar' augment padding; None: size // 8
    c.shuffle_buffer = 16_384
    c.seed = 0
    c.skip_corrupt_images = False  # unreadable images: False stops the run, True skips them

    # Optimisation.
    c.optimizer = 'sgd'            # 'sgd' (momentum, L2 in the gradient), 'adamw' or 'lamb'
    c.batch_size = 256             # global, over all devices of all processes
    c.learning_rate = 0.1          # for lr_base_batch_size images; scaled linearly with batch
    c.lr_base_batch_size = 256
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.decay_bn_and_bias = True     # the official code decays every parameter
    c.schedule = 'step'            # 'step' (÷ lr_decay_factor at each boundary) or 'cosine'
    c.lr_boundaries_epochs = (30, 60)
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 0.0
    c.loss = 'ce'                  # 'ce' softmax cross-entropy, 'bce' per-class sigmoid BCE
    c.label_smoothing = 0.0
    c.bce_target_thresh = config_dict.placeholder(float)  # 'bce': targets > this → 1, else 0
    c.mixup_alpha = 0.0            # Beta(α, α) of Mixup; 0: off
    c.cutmix_alpha = 0.0           # Beta(α, α) of CutMix; 0: off
    c.mixup_prob = 1.0             # probability that a batch is mixed at all
    c.mixup_switch_prob = 0.5      # with both on: probability of CutMix rather than Mixup
    c.clip_grad_norm = 0.0         # > 0: clip the global gradient norm to this (timm's Lamb: 1)
    c.ema_decay = 0.0              # EMA of parameters and BN statistics; 0: none
    c.ema_every_steps = 1          # update the EMA every this many steps
    c.num_epochs = 90.0
    c.num_train_steps = -1         # > 0 overrides num_epochs

    # Distribution.
    c.fsdp = False                 # shard parameters and optimizer state over the data axis
    c.fsdp_min_size = 2**16        # with fsdp: arrays of at least this many elements are split

    # Loop, evaluation, checkpoints.
    c.log_every_steps = 100
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True     # save in a background thread while training goes on
    c.eval_only = False            # evaluate the restored (or initial) state once; no training
    c.profile_steps = ''           # 'A:B': jax.profiler trace of steps A..B-1 in WORKDIR/tensorboard
    return c
