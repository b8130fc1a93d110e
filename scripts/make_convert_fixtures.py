"""Writes tests/fixtures/torchvision_*.npz: small torchvision ResNe(X)ts and their logits.

    pip install "resnext_jax[torch]" && python scripts/make_convert_fixtures.py

tests/test_convert.py checks, without torch, that `resnext_jax.convert` turns these state dicts
into Flax variables whose logits match torchvision's. Each network is torchvision's own
`ResNet` with its own `Bottleneck` blocks (built by its `_make_layer`), one block per stage,
made narrower so the files stay small: torchvision fixes the stem at 64 channels and the stage
widths at 64·2^s; here they are `STEM` and `STEM`·2^s, which is our
`create_model(name, num_classes=10, stage_sizes=(1, 1, 1, 1), stem_width=STEM,
base_features=4 * STEM)`. (torchvision's group width is int(planes · width_per_group / 64) ·
groups, so width_per_group = 64 · d / STEM gives our bottleneck width d.)

Every weight is random, including the BN affine parameters and running statistics, so a wrong
layout or a swapped BN buffer shows in the logits. Each file holds the state dict (float32,
num_batches_tracked int64, under the torch keys), 'input' (2, 3, 64, 64) NCHW, 'logits'
(torchvision's eval-mode output, computed in float64) and 'meta' (JSON: our model name and
options, torchvision's groups and width_per_group).
"""
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from resnext_jax.benchmark import import_torchvision  # noqa: E402

STEM = 8
NUM_CLASSES = 10
# Our (C, d) → file name. ResNet is C = 1; 32×1d makes conv2 a depthwise convolution in stage 1.
NETWORKS = {'resnet': (1, 8), 'resnext_4x4d': (4, 4), 'resnext_8x2d': (8, 2),
            'resnext_32x1d': (32, 1)}


def narrow_resnet(groups, width_per_group):
    """torchvision's ResNet(Bottleneck, [1, 1, 1, 1]) with stem STEM and stage widths STEM·2^s."""
    torch, _ = import_torchvision()
    from torchvision.models.resnet import Bottleneck, ResNet  # noqa: PLC0415
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES, groups=groups,
                 width_per_group=width_per_group)
    net.inplanes = STEM
    net.conv1 = torch.nn.Conv2d(3, STEM, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(STEM)
    for s in range(4):
        setattr(net, f'layer{s + 1}', net._make_layer(Bottleneck, STEM * 2**s, 1,
                                                      stride=1 if s == 0 else 2))
    net.fc = torch.nn.Linear(STEM * 8 * Bottleneck.expansion, NUM_CLASSES)
    return net


def randomise(net, generator):
    """Random conv weights (torch's init), fc weights large enough for logits of order 1, and
    random BN weight, bias and running statistics."""
    torch, _ = import_torchvision()
    with torch.no_grad():
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=generator))
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def make_fixture(name, cardinality, width, seed):
    torch, _ = import_torchvision()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    width_per_group = 64 * width // STEM
    net = narrow_resnet(cardinality, width_per_group)
    randomise(net, generator)
    net.eval()
    images = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        logits = net.double()(images.double()).numpy()
        net.float()
    state_dict = {key: value.numpy() for key, value in net.state_dict().items()}
    model = 'resnet50' if cardinality == 1 else f'resnext50_{cardinality}x{width}d'
    options = {'stage_sizes': [1, 1, 1, 1], 'stem_width': STEM, 'base_features': 4 * STEM}
    if cardinality == 1:
        options['bottleneck_width'] = width
    meta = {'model': model, 'model_options': options, 'num_classes': NUM_CLASSES,
            'torchvision': {'groups': cardinality, 'width_per_group': width_per_group,
                            'layers': [1, 1, 1, 1], 'stem': STEM}}
    path = os.path.join(REPO, 'tests', 'fixtures', f'torchvision_{name}.npz')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, input=images.numpy(), logits=logits, meta=np.array(json.dumps(meta)),
                        **state_dict)
    params = sum(v.size for k, v in state_dict.items() if not k.endswith('num_batches_tracked'))
    print(f'{path}: {model} {options}, {params:,} parameters, {os.path.getsize(path):,} bytes')


def main():
    for seed, (name, (cardinality, width)) in enumerate(NETWORKS.items()):
        make_fixture(name, cardinality, width, seed)


if __name__ == '__main__':
    main()
