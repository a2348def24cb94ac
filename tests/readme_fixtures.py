"""Stand-ins for what README.md's code blocks take from the user's disk (used by test_readme.py).

Nothing here comes from the network and nothing is built with reid_attention: the official
modules are re-expressed from torch.nn / torchvision alone (as in tests/test_convert.py, which
checks the converters' numerics; here only the keys, shapes and file formats matter).

* :func:`official_rga_module_state`: the state_dict of the official ``RGA_Module(256, 64*32)``
  (tests/official_rga.py), the name the RGA block loads.
* :func:`write_official_rga_checkpoint`: ``rga_sc_market.pth.tar`` as microsoft/RGA's
  main_imgreid.py saves it: ``{"state_dict", "epoch", "best_top1", "optimizer"}``, the state_dict
  of ``ResNet50_RGA_Model`` (RGA-SC, 256x128, default ratios; taken from ``model.module``, so
  without the ``module.`` prefix) and an SGD optimizer's state_dict.
* :func:`write_official_apnet_checkpoint`: ``apnet.pth``, the bare state_dict of CHENGY12/APNet's
  ``Baseline`` at level 2 (backbone twice: ``base.*`` and the stage views ``base_1`` .. ``base_5``).
* :func:`write_torchvision_weights`: torchvision's download cache (``$TORCH_HOME/hub/checkpoints``)
  holding a *randomly initialised* ResNet-50 state_dict under the file name of
  ``ResNet50_Weights.IMAGENET1K_V2``, so that ``resnet50(weights="IMAGENET1K_V2")`` loads it
  instead of downloading (torch.hub checks the hash only when it downloads).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision.models as tvm
from official_rga import OfficialRGAModule
from torch import nn

# ResNet-50 with last stride 1 at 256x128: (channels, map size) after layer1..4.
_RGA_SITES = [(256, (64, 32)), (512, (32, 16)), (1024, (16, 8)), (2048, (16, 8))]


def official_rga_module_state() -> dict:
    torch.manual_seed(0)
    return OfficialRGAModule(256, 64 * 32).state_dict()


def _resnet50_last_stride_1() -> nn.Module:
    resnet = tvm.resnet50(weights=None)
    resnet.layer4[0].conv2.stride = (1, 1)
    resnet.layer4[0].downsample[0].stride = (1, 1)
    return resnet


class _OfficialRGAModel(nn.Module):
    """ResNet50_RGA_Model's module tree: backbone (RGA_Branch: conv1, bn1, layer1..4, rga_att1..4),
    feat_bn, cls."""

    def __init__(self, num_classes: int = 751):
        super().__init__()
        self.backbone = nn.Module()
        resnet = _resnet50_last_stride_1()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.backbone.add_module(name, getattr(resnet, name))
        for i, (channels, (h, w)) in enumerate(_RGA_SITES, 1):
            self.backbone.add_module(f"rga_att{i}", OfficialRGAModule(channels, h * w))
        self.feat_bn = nn.BatchNorm1d(2048)
        self.cls = nn.Linear(2048, num_classes, bias=False)


def write_official_rga_checkpoint(path: Path) -> None:
    model = _OfficialRGAModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    torch.save(
        {"state_dict": model.state_dict(), "epoch": 600, "best_top1": 0, "optimizer": optimizer.state_dict()},
        path,
    )


class _SELayer(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())


class _SAMS(nn.Module):
    def __init__(self, in_channels: int, channels: int, radix: int):
        super().__init__()
        width = max(in_channels * radix // 4, 32)
        self.fc1 = nn.Conv2d(channels, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc2 = nn.Conv2d(width, channels * radix, 1)


class _BN2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bottleneck2 = nn.BatchNorm2d(channels)


class _OfficialAPNet(nn.Module):
    """Baseline(level=2)'s module tree: base (conv1, bn1, maxpool, layer1..4), its stage views
    base_1..base_5 (the same modules again), att{k} (SE), att_s{k} + BN{k} (split attention),
    bottleneck, classifier."""

    def __init__(self, level: int = 2, num_classes: int = 751):
        super().__init__()
        resnet = _resnet50_last_stride_1()
        self.base = nn.Module()
        for name in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.base.add_module(name, getattr(resnet, name))
        children = list(self.base.children())
        for k, (lo, hi) in enumerate([(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)], 1):
            self.add_module(f"base_{k}", nn.Sequential(*children[lo:hi]))
        se_reductions = [(64, 8), (256, 32), (512, 64), (1024, 128), (2048, 256)]
        for k, (channels, reduction) in enumerate(se_reductions, 1):
            self.add_module(f"att{k}", _SELayer(channels, reduction))
            self.add_module(f"att_s{k}", _SAMS(channels, channels // level, radix=level))
            self.add_module(f"BN{k}", _BN2d(channels))
        self.bottleneck = nn.BatchNorm1d(2048)
        self.classifier = nn.Linear(2048, num_classes, bias=False)


def write_official_apnet_checkpoint(path: Path) -> None:
    torch.save(_OfficialAPNet().state_dict(), path)


def write_torchvision_weights(torch_home: Path) -> None:
    """Random ResNet-50 weights where torchvision's IMAGENET1K_V2 download would be cached."""
    url = tvm.ResNet50_Weights.IMAGENET1K_V2.url
    target = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tvm.resnet50(weights=None).state_dict(), target)
