"""The reference path of the relation core: the official computation, slot by slot.

Steps 1-5 of the equation in :mod:`reid_attention.rga` for one agent, in the official order:
the three projections, the relation R (B, n, n) itself, the relation vectors [R(i, :), R(:, i)]
as 2n channels, their embedding, then the W network on [g, E]. The fused path
(:mod:`reid_attention._relation.fused`) computes the same function without R.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._norm import norm_channels
from .._precision import compute_dtype, no_autocast
from .modules import RelationBranch, activate, conv_weight


def _official(seq: nn.Sequential, t: Tensor, dtype: torch.dtype) -> Tensor:
    """An official Sequential (conv, norm, act [, conv, norm]) on tokens (B, c, n), slot by slot:
    the first 1x1 conv in t's dtype (autocast applies), everything after it in ``dtype``; the
    norms through :func:`norm_channels`, as on the fused path, and the activation's module."""
    y = torch.matmul(conv_weight(seq[0]).flatten(1).to(t.dtype), t)
    with no_autocast(t):
        y = activate(norm_channels(y.to(dtype), [seq[1]]), [seq[2]])
        if len(seq) == 5:  # the W network's second conv and norm
            y = norm_channels(torch.matmul(conv_weight(seq[3]).flatten(1).to(dtype), y), [seq[4]])
    return y


def relation_logits_reference(tokens: Tensor, branch: RelationBranch) -> Tensor:
    """Official computation for one agent: tokens (B, d, n) -> attention logits (B, 1, n)."""
    dtype = compute_dtype(tokens)
    theta, phi, gx = (_official(m, tokens, dtype) for m in branch[:3])  # steps 1 and 4
    with no_autocast(tokens):
        relation = torch.matmul(theta.transpose(1, 2), phi)  # step 2: R(i, j) = <theta_i, phi_j>
        # Channel j of token i holds R(i, j) for the first n channels, R(j, i) for the last n.
        joint = torch.cat((relation.transpose(1, 2), relation), 1)
        embedded = _official(branch.gg, joint, dtype)  # step 3
        return _official(branch.W, torch.cat((gx.mean(1, keepdim=True), embedded), 1), dtype)  # step 5
