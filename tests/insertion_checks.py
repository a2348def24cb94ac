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
from torch import Tensor, nn

import reid_attention as ra
from reid_attention._checks import SITE_ATTR
from reid_attention._probe import ShapeOnly
from reid_attention.insert import default_sites

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
