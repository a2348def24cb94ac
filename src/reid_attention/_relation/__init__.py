"""The relation core of RGA (both axes) and of APNet-S's stripe agents.

One agent computes the equation in :mod:`reid_attention.rga` (steps 1-6) on tokens (B, d, n);
the fused functions take a stack of G agents at once (APNet-S's stripes), tokens (B, G, d, n).

    modules.py    an agent's official Sequentials (:class:`RelationBranch`, :class:`AxisWidths`,
                  :func:`build_branch`), their activation slots, the sigmoid gate (step 6)
    reference.py  the official computation, slot by slot, building R (B, n, n)
    fused.py      the same function without R: the projection GEMM, the factored embedding,
                  the W network; RGA-SC's two autograd Functions
    lean.py       the fused path's memory-lean form: :class:`LeanEmbedding` and the
                  recomputation in backward

On every path each norm runs through :func:`reid_attention._norm.norm_channels` (one kernel for
exact BatchNorms, the modules themselves otherwise) and activations other than an exact
``nn.ReLU`` are called as modules. Under autocast the input projections run in the autocast
dtype; everything after them runs in float32 (float64 stays float64).

This package is private: the layers are the API. It is also the documented testing seam: tests
may import its public names (no leading underscore) and those of its modules; this file lists
what the layers import.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .fused import DoubleGate, GatedChannelProjection, fused_logits, projection_weight, projections
from .lean import LeanEmbedding, lean_applies, lean_logits
from .modules import AxisWidths, RelationBranch, build_branch, conv_weight, gate, gate_values
from .reference import relation_logits_reference

__all__ = [
    "AxisWidths",
    "DoubleGate",
    "GatedChannelProjection",
    "LeanEmbedding",
    "RelationBranch",
    "build_branch",
    "conv_weight",
    "gate",
    "gate_values",
    "lean_applies",
    "logits_from_projections",
    "projection_weight",
    "projections",
    "relation_logits_fused",
    "relation_logits_reference",
]


def logits_from_projections(proj: Tensor, branches: Sequence[RelationBranch], *, lean: bool = False
                            ) -> Tensor:
    """The logits (B, G, n) from the projections before their norms (B, G, 3d', n): the fused
    path, or its memory-lean form when the caller's route chose it (``lean``; then
    :func:`lean_applies` holds)."""
    return lean_logits(proj, branches) if lean else fused_logits(proj, branches)


def relation_logits_fused(tokens: Tensor, branches: Sequence[RelationBranch], *, lean: bool = False
                          ) -> Tensor:
    """The fused path for G stacked agents, agent g reading ``tokens[:, g]``: tokens
    (B, G, d, n) -> logits (B, G, n), the same function as the reference without the n x n
    relation (``lean``: see :func:`logits_from_projections`)."""
    return logits_from_projections(projections(tokens, branches), branches, lean=lean)
