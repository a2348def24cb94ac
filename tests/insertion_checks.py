"""Default insertion of every attention kind into a model, checked on the meta device.

Shared by the torchvision matrix (test_insert.py) and the timm one (test_timm.py). A model is
built once per input size on the meta device and copied for each kind; the forward and backward
run on meta tensors with normalisations and activations shape-only (``ShapeOnly``, the probe's own
seam in ``reid_attention._probe``: on the meta device their decompositions cost most of the time),
so several hundred model x kind x size combinations fit in a few minutes. Numerics are checked on
small real models (``check_real_step``).
"""

from __future__ import annotations

import copy

import torch
import torchvision.models as tvm
from torch import Tensor, nn

import reid_attention as ra
from reid_attention._checks import SITE_ATTR
from reid_attention._probe import ShapeOnly
from reid_attention.insert import default_sites

NO_INIT = {"init_weights": False}  # silences GoogLeNet / Inception's slow-init warning

# The torchvision matrix (test_insert.py, test_containers.py).
# family: (builder, kwargs, input size, [(stage end, channels, reduction, layout)])
FAMILIES = {
    "resnet50": (tvm.resnet50, {}, (256, 128), [
        ("relu", 64, 2, "NCHW"), ("layer1", 256, 4, "NCHW"), ("layer2", 512, 8, "NCHW"),
        ("layer3", 1024, 16, "NCHW"), ("layer4", 2048, 32, "NCHW")]),
    "resnext50": (tvm.resnext50_32x4d, {}, (256, 128), [
        ("relu", 64, 2, "NCHW"), ("layer1", 256, 4, "NCHW"), ("layer2", 512, 8, "NCHW"),
        ("layer3", 1024, 16, "NCHW"), ("layer4", 2048, 32, "NCHW")]),
    "mobilenet_v2": (tvm.mobilenet_v2, {}, (224, 224), [
        ("features.1", 16, 2, "NCHW"), ("features.3", 24, 4, "NCHW"), ("features.6", 32, 8, "NCHW"),
        ("features.13", 96, 16, "NCHW"), ("features.18", 1280, 32, "NCHW")]),
    "mobilenet_v3": (tvm.mobilenet_v3_small, {}, (224, 224), [
        ("features.0", 16, 2, "NCHW"), ("features.1", 16, 4, "NCHW"), ("features.3", 24, 8, "NCHW"),
        ("features.8", 48, 16, "NCHW"), ("features.12", 576, 32, "NCHW")]),
    "efficientnet_b0": (tvm.efficientnet_b0, {}, (224, 224), [
        ("features.1", 16, 2, "NCHW"), ("features.2", 24, 4, "NCHW"), ("features.3", 40, 8, "NCHW"),
        ("features.5", 112, 16, "NCHW"), ("features.8", 1280, 32, "NCHW")]),
    "efficientnet_v2": (tvm.efficientnet_v2_s, {}, (224, 224), [
        ("features.1", 24, 2, "NCHW"), ("features.2", 48, 4, "NCHW"), ("features.3", 64, 8, "NCHW"),
        ("features.5", 160, 16, "NCHW"), ("features.7", 1280, 32, "NCHW")]),
    "convnext": (tvm.convnext_tiny, {}, (224, 224), [
        ("features.1", 96, 4, "NCHW"), ("features.3", 192, 8, "NCHW"), ("features.5", 384, 16, "NCHW"),
        ("features.7", 768, 32, "NCHW")]),
    "regnet": (tvm.regnet_y_400mf, {}, (224, 224), [
        ("stem", 32, 2, "NCHW"), ("trunk_output.block1", 48, 4, "NCHW"),
        ("trunk_output.block2", 104, 8, "NCHW"), ("trunk_output.block3", 208, 16, "NCHW"),
        ("trunk_output.block4", 440, 32, "NCHW")]),
    "densenet": (tvm.densenet121, {}, (224, 224), [
        ("features.relu0", 64, 2, "NCHW"), ("features.denseblock1", 256, 4, "NCHW"),
        ("features.denseblock2", 512, 8, "NCHW"), ("features.denseblock3", 1024, 16, "NCHW"),
        ("features.norm5", 1024, 32, "NCHW")]),
    "vgg": (tvm.vgg11, {}, (224, 224), [
        ("features.1", 64, 1, "NCHW"), ("features.4", 128, 2, "NCHW"), ("features.9", 256, 4, "NCHW"),
        ("features.14", 512, 8, "NCHW"), ("features.19", 512, 16, "NCHW"), ("features.20", 512, 32, "NCHW")]),
    "shufflenet": (tvm.shufflenet_v2_x0_5, {}, (224, 224), [
        ("conv1", 24, 2, "NCHW"), ("maxpool", 24, 4, "NCHW"), ("stage2", 48, 8, "NCHW"),
        ("stage3", 96, 16, "NCHW"), ("conv5", 1024, 32, "NCHW")]),
    "mnasnet": (tvm.mnasnet0_5, {}, (224, 224), [
        ("layers.7", 8, 2, "NCHW"), ("layers.8", 16, 4, "NCHW"), ("layers.9", 24, 8, "NCHW"),
        ("layers.11", 48, 16, "NCHW"), ("layers.16", 1280, 32, "NCHW")]),
    "googlenet": (tvm.googlenet, NO_INIT, (224, 224), [
        ("conv1", 64, 2, "NCHW"), ("conv3", 192, 4, "NCHW"), ("inception3b", 480, 8, "NCHW"),
        ("inception4e", 832, 16, "NCHW"), ("inception5b", 1024, 32, "NCHW")]),
    "inception": (tvm.inception_v3, NO_INIT, (299, 299), [
        ("Conv2d_2b_3x3", 64, 2, "NCHW"), ("Conv2d_4a_3x3", 192, 4, "NCHW"), ("Mixed_5d", 288, 8, "NCHW"),
        ("Mixed_6e", 768, 16, "NCHW"), ("Mixed_7c", 2048, 32, "NCHW")]),
    "swin": (tvm.swin_t, {}, (224, 224), [
        ("features.1", 96, 4, "NHWC"), ("features.3", 192, 8, "NHWC"), ("features.5", 384, 16, "NHWC"),
        ("permute", 768, 32, "NCHW")]),
}

KINDS = tuple(ra.list_attentions())
SIZES = ((256, 128), (128, 64), (224, 224))
BATCH = 2  # APNet-C trains with batch >= 2


def tensors(out: object) -> list[Tensor]:
    """The tensors of a model's output: a tensor, or a list / tuple / dict of them (timm's
    features_only models return one map per stage)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in tensors(item)]


def inserted(model: nn.Module) -> dict:
    """Site name -> the inserted module there (the adapter of an NHWC site)."""
    found = {}
    for name, module in model.named_modules():
        site = getattr(module, SITE_ATTR, None)
        if site and not any(name.startswith(f"{other}.") for other in found.values()):
            found[site] = name
    return {site: model.get_submodule(name) for site, name in found.items()}


def check_default_insertion(base: nn.Module, size, kinds=KINDS) -> None:
    """For each kind: ``insert_attention(copy of base, kind)`` with the default sites, then a
    meta forward and backward: output shapes unchanged, every original key kept with its shape,
    one attention per default site, gradients reaching the attention."""
    x = torch.empty(BATCH, 3, *size, device="meta")
    with torch.no_grad(), ShapeOnly():
        expected = [t.shape for t in tensors(base(x))]
    keys = {k: v.shape for k, v in base.state_dict().items()}
    sites = [s.name for s in default_sites(ra.list_sites(base, size))]
    assert sites, "no default site"
    for kind in kinds:
        model = copy.deepcopy(base)
        ra.insert_attention(model, kind, input_size=size)
        attention = inserted(model)
        assert list(attention) == sites, kind
        with ShapeOnly():
            out = tensors(model(x))
            assert [t.shape for t in out] == expected, kind
            sum(t.sum() for t in out).backward()
        state = model.state_dict()
        assert all(state[k].shape == shape for k, shape in keys.items()), kind
        for site, module in attention.items():
            params = [p for p in module.parameters() if p.requires_grad]
            # the norms ran shape-only (no gradient to their affine parameters); the others get one
            assert all(p.grad is not None for p in params if p.dim() > 1), (kind, site)


def check_real_step(base: nn.Module, size, kinds=KINDS, seed: int = 0) -> None:
    """For each kind: insertion with the default sites into a copy of a small real model, one
    training-mode forward and backward on random images: output shapes unchanged, finite
    values, a gradient reaching every trainable attention parameter."""
    x = torch.randn(BATCH, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = [t.shape for t in tensors(copy.deepcopy(base).eval()(x))]
    for kind in kinds:
        model = ra.insert_attention(copy.deepcopy(base).train(), kind, input_size=size)
        out = tensors(model(x))
        assert [t.shape for t in out] == expected, kind
        assert all(torch.isfinite(t).all() for t in out), kind
        sum(t.square().mean() for t in out).backward()
        for site, module in inserted(model).items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), (kind, site, name)
