"""CIFAR-10, ResNeXt-29 8x64d (Table 7: 3.65 % test error; 34.4M parameters).

Paper (Sec. 5.3) and official code: batch 128 on 8 GPUs (BN over 16 images per GPU), SGD
momentum 0.9 (Nesterov in the official code), weight decay 5e-4, learning rate 0.1 divided by
10 at epochs 150 and 225 of 300, 4-pixel pad + random crop + flip. Needs CIFAR-10, which TFDS
downloads (`tfds build cifar10`, or copy a prepared data_dir).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model = 'resnext29_8x64d'
    c.dataset = 'cifar10'
    c.train_split, c.eval_split = 'train', 'test'
    c.image_size = 32
    c.augment = 'cifar'
    c.batch_size = 128
    c.learning_rate = 0.1
    c.lr_base_batch_size = 128
    c.nesterov = True
    c.weight_decay = 5e-4
    c.schedule = 'step'
    c.lr_boundaries_epochs = (150, 225)
    c.num_epochs = 300.0
    c.bn_group_size = 16
    c.log_every_steps = 50
    c.checkpoint_every_steps = 2000
    return c
