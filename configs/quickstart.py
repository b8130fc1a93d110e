"""What plain `python train.py --workdir=DIR` runs: offline, a few minutes on 2 CPU cores.

A small ResNeXt (three stages of one 8×4d block each, CIFAR-style stem) on scikit-learn's 8×8
handwritten digits (1,437 train / 360 held-out images, upscaled to 16×16), without
augmentation. The 3×3 runs as a dense convolution with a block-diagonal kernel ('blockdiag');
`form='auto'` would pick 'sliced', measured fastest on CPU for the paper's networks (README,
Performance). The parameters are the same in every form.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model = 'resnext29_8x4d'
    c.model_options = {'stage_sizes': (1, 1, 1), 'stem_width': 32, 'base_features': 64}
    c.form = 'blockdiag'
    c.dataset = 'digits'
    c.train_split, c.eval_split = 'train', 'test'
    c.image_size = 16
    c.augment = 'none'
    c.batch_size = 64
    c.learning_rate = 0.1
    c.lr_base_batch_size = 128
    c.nesterov = True
    c.weight_decay = 5e-4
    c.schedule = 'cosine'
    c.warmup_epochs = 1.0
    c.num_epochs = 15.0
    c.log_every_steps = 20
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    return c
