"""One agent's modules: the official Sequentials, their widths and slots, and the sigmoid gate.

An agent (one axis of RGA, one stripe of APNet-S) owns five official sub-networks, built here
with the official parameter names and layouts so that official checkpoints load strictly:
``theta``, ``phi``, ``gx`` and ``gg`` are CBR Sequentials (conv 0, norm 1, ReLU 2) and ``W`` is
conv 0, norm 1, ReLU 2, conv 3, norm 4. Both paths read these modules slot by slot
(:class:`CBRParts`, :class:`WParts`); step numbers refer to the equation in
:mod:`reid_attention.rga`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from .._norm import NormLayer, is_plain, make_norm


class RelationBranch(NamedTuple):
    """The five official sub-networks of one agent (official names ``<name>_spatial`` etc.)."""

    theta: nn.Sequential  # step 1: CBR(d -> d')
    phi: nn.Sequential  # step 1: CBR(d -> d')
    gx: nn.Sequential  # step 4: CBR(d -> d'), averaged over its channels
    gg: nn.Sequential  # step 3: CBR(2n -> n/s), embeds the relation vectors
    W: nn.Sequential  # step 5: conv(1 + n/s -> k), norm, ReLU, conv(k -> 1), norm


def conv_weight(conv: nn.Module) -> Tensor:
    """The weight of a conv slot of an official Sequential (indexing types its slots as nn.Module)."""
    return cast(Tensor, conv.weight)


class CBRParts(NamedTuple):
    """The slots of an official CBR Sequential."""

    conv: nn.Conv2d
    norm: nn.Module
    act: nn.Module


class WParts(NamedTuple):
    """The slots of an official W Sequential."""

    conv1: nn.Conv2d
    norm1: nn.Module
    act: nn.Module
    conv2: nn.Conv2d
    norm2: nn.Module


class AxisWidths(NamedTuple):
    """Inner widths of one agent, each ``max(min_width, official formula)``."""

    features: int  # d': width of theta, phi and g
    tokens: int  # n/s: width of the relation embedding
    hidden: int  # k: hidden width of the W network


def cbr(inp: int, out: int, norm_layer: NormLayer, **factory: Any) -> nn.Sequential:
    """1x1 conv without bias, norm, ReLU: the official modules' building block."""
    return nn.Sequential(
        nn.Conv2d(inp, out, 1, bias=False, **factory), make_norm(norm_layer, out, **factory), nn.ReLU()
    )


def build_branch(
    features: int, tokens: int, widths: AxisWidths, norm_layer: NormLayer, **factory: Any
) -> dict[str, nn.Module]:
    """Modules of one agent, keyed by the official attribute stem."""
    d_inner, n_inner, hidden = widths
    return dict(
        theta=cbr(features, d_inner, norm_layer, **factory),
        phi=cbr(features, d_inner, norm_layer, **factory),
        gx=cbr(features, d_inner, norm_layer, **factory),
        gg=cbr(2 * tokens, n_inner, norm_layer, **factory),
        W=nn.Sequential(
            nn.Conv2d(1 + n_inner, hidden, 1, bias=False, **factory),
            make_norm(norm_layer, hidden, **factory),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, 1, bias=False, **factory),
            make_norm(norm_layer, 1, **factory),
        ),
    )


def activate(y: Tensor, acts: Sequence[nn.Module]) -> Tensor:
    """The activation slots on their equal slices of y's channels (dim 1): one in-place ReLU
    when every slot is an exact nn.ReLU, else each slot called as a module on its slice."""
    if all(is_plain(a, nn.ReLU) for a in acts):
        return y.relu_()
    return torch.cat([a(part) for a, part in zip(acts, y.chunk(len(acts), 1))], 1)


def gate_values(logits: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Step 6's gate: sigmoid(logits) viewed as ``shape`` (broadcastable against the map) in the
    map's dtype."""
    return torch.sigmoid(logits).view(shape).to(dtype)


def gate(x: Tensor, logits: Tensor, shape: Sequence[int]) -> Tensor:
    """Step 6: x * sigmoid(logits), the gate broadcast (never expanded) and cast to x's dtype."""
    return x * gate_values(logits, shape, x.dtype)
