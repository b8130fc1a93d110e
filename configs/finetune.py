"""Fine-tuning published ImageNet weights on your own images, in one command:

    python train.py --config=configs/finetune.py --workdir=runs/flowers \
        --config.init_from=resnext50_32x4d.tv2_in1k --config.dataset=folder:/data/flowers

`init_from` is a name `python -m resnext_jax.summary --pretrained` lists (or a converted
checkpoint or workdir, with `--config.model` and `--config.image_size` then set). The network
is the weights' own (`model` ''); the head starts fresh for the dataset's classes; images are
fed as the weights learned to see them (`image_size` 0: their training size, test crop and
resize; `interpolation` '': theirs; ImageNet's mean and std), with the paper's
scale-and-aspect crop and flip.

The optimisation follows BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT): General Visual
Representation Learning", ECCV 2020, Sec. 3.3): SGD with momentum 0.9, learning rate 0.003
for a batch of 512 (scaled linearly to the batch here), divided by 10 at 30 %, 60 % and 90 % of
training. BiT fixes the length by the dataset's size (500 steps of 512 below 20k images); here
it is 20 epochs (boundaries at epochs 6, 12, 18: change them with `num_epochs`), with one
epoch of linear warm-up and no weight decay (ours: the start is the pretrained weights, not
zero).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.name = 'finetune'
    c.model = ''                   # '': the network of the published weights init_from names
    c.init_from = ''               # required: e.g. resnext50_32x4d.tv2_in1k
    c.dataset = ''                 # required: folder:DIR (DIR/train/<class>/*, DIR/validation/…)
    c.image_size = 0               # 0: the weights' own training size, test crop and resize
    c.interpolation = ''           # '': the weights' own (bilinear or bicubic)
    c.batch_size = 64
    c.learning_rate = 0.003        # BiT-HyperRule: 0.003 per 512 images
    c.lr_base_batch_size = 512
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.schedule = 'step'
    c.num_epochs = 20.0
    c.lr_boundaries_epochs = (6, 12, 18)   # 30 %, 60 %, 90 % of 20 epochs, ÷ 10 each
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 1.0
    c.log_every_steps = 20
    c.eval_every_epochs = 2.0
    return c
