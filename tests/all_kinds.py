"""Every registered attention kind at a small valid size, for the deployment and contract suites.

``build(kind, impl)`` returns a float64 module with randomised BatchNorm parameters and running
statistics (so folding, export and compile comparisons can fail). The size is the smallest
round one every kind accepts with its default ratios: RGA-C needs (1 + C // 8) // 8 >= 1, so
C = 64; RGA-S needs (1 + H*W // 8) // 8 >= 1, i.e. H*W >= 56, also on each of the two 8x8
stripes of APNet-S's level 2, so (16, 8).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import randomize_bn

import reid_attention as ra
from reid_attention.registry import needs_feat_size

CHANNELS = 64
FEAT_SIZE = (16, 8)
KINDS = tuple(ra.list_attentions())
IMPLS = ("reference", "fused")
SIZE_TIED = tuple(k for k in KINDS if needs_feat_size(k))
# Kinds with weights over the channels (everything but the parameter-free PFSA).
CHANNEL_TIED = tuple(k for k in KINDS if k != "pfsa")


def build(kind: str, impl: str = "fused", *, dtype=torch.float64, seed: int = 0, **kw) -> torch.nn.Module:
    """``kind`` built for (B, CHANNELS, *FEAT_SIZE) maps, BN randomised, in ``dtype``."""
    torch.manual_seed(seed)
    module = ra.create_attention(kind, CHANNELS, feat_size=FEAT_SIZE, impl=impl, **kw)
    return randomize_bn(module, seed).to(dtype)


def make_input(batch: int = 3, *, dtype=torch.float64, seed: int = 0, size=FEAT_SIZE, scale: float = 1.0):
    """A (batch, CHANNELS, *size) map; shifted positive like a post-ReLU feature map."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, CHANNELS, *size, generator=g, dtype=torch.float64) + 0.5) * scale).to(dtype)


def kind_impl_params(kinds=KINDS):
    """pytest params over kinds x impls, with readable ids."""
    return [pytest.param(k, i, id=f"{k}-{i}") for k, i in itertools.product(kinds, IMPLS)]


@torch.no_grad()
def calibrate_bn(module: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of one training-mode pass over ``x``.

    Randomised statistics unrelated to the data leave eval-mode logits far outside the
    sigmoid's range; calibrated ones put eval mode in the regime of a trained network.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    mode = module.training
    for bn in bns:
        bn.momentum = 1.0
    module.train()(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return module.train(mode)
