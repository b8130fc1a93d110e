"""ImageNet, ResNeXt-50 32x4d (Table 3: 22.2 % top-1 error at 224 crop; 25.0M params, 4.2 GFLOPs).

Paper (Sec. 4): batch 256 on 8 GPUs (BN over 32 images per GPU), SGD momentum 0.9, weight
decay 1e-4, learning rate 0.1 divided by 10 three times (epochs 30, 60, 90 of 100 here),
scale + aspect-ratio augmentation and flips, single 224 centre crop of the 256-resized image
for evaluation. ImageNet comes from TFDS's manual download (`imagenet2012`: put the ILSVRC
tars in <data_dir>/downloads/manual and run `tfds build imagenet2012`).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model = 'resnext50_32x4d'
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train', 'validation'
    c.batch_size = 256
    c.lr_boundaries_epochs = (30, 60, 90)
    c.num_epochs = 100.0
    c.bn_group_size = 32
    return c
