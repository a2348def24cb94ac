"""Small real models of every torchvision family the insertion tests cover, with an input size
each: ``REAL[family] = (constructor, (H, W))``. Shared by test_insert.py and test_containers.py."""

from __future__ import annotations

import torchvision.models as tvm
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.swin_transformer import SwinTransformer

REAL = {
    "resnet18": (lambda: tvm.resnet18(weights=None), (64, 32)),
    "resnext": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4), (64, 32)),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(weights=None), (64, 64)),
    "mobilenet_v3": (lambda: tvm.mobilenet_v3_small(weights=None), (64, 64)),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None), (64, 64)),
    "convnext": (lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1),
                                   CNBlockConfig(64, 128, 1), CNBlockConfig(128, None, 1)]), (64, 64)),
    "regnet": (lambda: tvm.regnet_y_400mf(weights=None), (64, 64)),
    "densenet": (lambda: tvm.densenet121(weights=None), (64, 64)),
    "shufflenet": (lambda: tvm.shufflenet_v2_x0_5(weights=None), (64, 64)),
    "mnasnet": (lambda: tvm.mnasnet0_5(weights=None), (64, 64)),
    "googlenet": (lambda: tvm.googlenet(weights=None, init_weights=False, aux_logits=False), (64, 64)),
    "swin": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1],
                                     num_heads=[1, 1, 1, 1], window_size=[2, 2]), (64, 64)),
}
