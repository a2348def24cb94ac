"""The relation core of RGA (both axes) and of APNet-S's stripe agents.

Zhang et al., "Relation-Aware Global Attention for Person Re-identification", CVPR 2020,
arXiv:1904.02998. For tokens T (n tokens of d features) one agent computes

    theta = CBR(T), phi = CBR(T), g = mean_c CBR(T)          (d -> d')
    R = theta^T phi (n x n),  r_i = [R(i, :), R(:, i)]        (2n values per token)
    E_i = CBR(2n -> n/s)(r_i),  y_i = [g_i, E_i]
    logit_i = BN(conv(k -> 1)(ReLU(BN(conv(1 + n/s -> k)(y_i)))))

Its modules are the official Sequentials (``theta`` = conv 0, norm 1, ReLU 2; ``W`` = conv 0,
norm 1, ReLU 2, conv 3, norm 4): :class:`CBRParts` and :class:`WParts` name those slots.

* :func:`relation_logits_reference` is the official computation, slot by slot, building R
  (B, n, n).
* :func:`relation_logits_fused` never builds R, for a stack of G agents at once (APNet-S's
  stripes). The embedding is linear in R before its norm, so with the embedding weight split
  into the half acting on rows (Wr) and on columns (Wc), ``E_pre = Ar theta + Ac phi`` with
  ``Ar = Wr phi^T`` and ``Ac = Wc theta^T`` (n/s x d'): two thin batched GEMMs instead of an
  n x n product and a 2n-channel conv. It runs in named steps, :func:`projections`,
  :func:`activated_projections`, :func:`relation_embedding` and :func:`w_network`; the 1x1
  convolutions' weights are read (stacked over agents, theta/phi/g as one GEMM).
* ``lean=True`` (the layers' ``memory="lean"``) checkpoints everything after the projection
  GEMM and replaces the embedding and W's first conv on it by
  :class:`reid_attention._embedding.LeanEmbedding`, which walks the batch in chunks: no
  (B, n/s, n) tensor is kept or ever held whole, and the recomputation reuses the first run's
  small results instead of recomputing the embedding.

On both paths every norm runs through :func:`reid_attention._norm.norm_channels` (one kernel for
exact BatchNorms, the modules themselves otherwise) and activations other than an exact
``nn.ReLU`` are called as modules.

Under autocast the input projections run in the autocast dtype; everything after them runs in
float32 (float64 stays float64).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._precision import compute_dtype, no_autocast
from ._embedding import LeanEmbedding, factors
from ._norm import NormLayer, affine_parameters, is_plain, make_norm, norm_channels, one_kernel


class RelationBranch(NamedTuple):
    """The five official sub-networks of one agent (official names ``<name>_spatial`` etc.)."""

    theta: nn.Sequential  # CBR(d -> d')
    phi: nn.Sequential  # CBR(d -> d')
    gx: nn.Sequential  # CBR(d -> d'), averaged over its channels
    gg: nn.Sequential  # CBR(2n -> n/s), embeds the relation vectors
    W: nn.Sequential  # conv(1 + n/s -> k), norm, ReLU, conv(k -> 1), norm


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


def cbr(inp: int, out: int, norm_layer: NormLayer, **factory) -> nn.Sequential:
    """1x1 conv without bias, norm, ReLU: the official modules' building block."""
    return nn.Sequential(
        nn.Conv2d(inp, out, 1, bias=False, **factory), make_norm(norm_layer, out, **factory), nn.ReLU()
    )


def build_branch(features: int, tokens: int, widths: AxisWidths, norm_layer: NormLayer, **factory) -> dict:
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


# ------------------------------------------------------------------------------ reference


def _activate(y: Tensor, acts: Sequence[nn.Module]) -> Tensor:
    """The activation slots on their equal slices of y's channels (dim 1): one in-place ReLU
    when every slot is an exact nn.ReLU, else each slot called as a module on its slice."""
    if all(is_plain(a, nn.ReLU) for a in acts):
        return y.relu_()
    return torch.cat([a(part) for a, part in zip(acts, y.chunk(len(acts), 1))], 1)


def _official(seq: nn.Sequential, t: Tensor, dtype: torch.dtype) -> Tensor:
    """An official Sequential (conv, norm, act [, conv, norm]) on tokens (B, c, n), slot by slot:
    the first 1x1 conv in t's dtype (autocast applies), everything after it in ``dtype``; the
    norms through :func:`norm_channels`, as on the fused path, and the activation's module."""
    y = torch.matmul(seq[0].weight.flatten(1).to(t.dtype), t)
    with no_autocast(t):
        y = _activate(norm_channels(y.to(dtype), [seq[1]]), [seq[2]])
        if len(seq) == 5:  # the W network's second conv and norm
            y = norm_channels(torch.matmul(seq[3].weight.flatten(1).to(dtype), y), [seq[4]])
    return y


def relation_logits_reference(tokens: Tensor, branch: RelationBranch) -> Tensor:
    """Official computation for one agent: tokens (B, d, n) -> attention logits (B, 1, n)."""
    dtype = compute_dtype(tokens)
    theta, phi, gx = (_official(m, tokens, dtype) for m in branch[:3])
    with no_autocast(tokens):
        relation = torch.matmul(theta.transpose(1, 2), phi)  # R(i, j) = <theta_i, phi_j>
        # Channel j of token i holds R(i, j) for the first n channels, R(j, i) for the last n.
        joint = torch.cat((relation.transpose(1, 2), relation), 1)
        embedded = _official(branch.gg, joint, dtype)
        return _official(branch.W, torch.cat((gx.mean(1, keepdim=True), embedded), 1), dtype)


# ------------------------------------------------------------------------------ fused


def _weights(convs: Sequence[nn.Conv2d], dtype: torch.dtype) -> Tensor:
    """Stack 1x1 conv weights (O, I, 1, 1) of one shape into (G, O, I) (a view for one conv)."""
    weights = [c.weight.flatten(1) for c in convs]
    stacked = weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)
    return stacked.to(dtype)


def _project(weight: Tensor, tokens: Tensor) -> Tensor:
    """1x1 projections of stacked agents: weight (G, O, d) x tokens (B, G, d, n) -> (B, G, O, n).

    The weight gradient is always one GEMM over the whole batch: a broadcast ``matmul`` would
    materialise it per sample (B x O x d) before reducing. One agent: a linear over the folded
    batch when the tokens are stored token-major (the channel axis of an NCHW map, the spatial
    axis of a channels_last one), else a 1x1 conv; neither copies the input. Several agents
    (APNet-S stripes): the (batch, agent) pairs of a stripe view share no single stride, so the
    tokens are gathered once into (G, d, B*n) and one GEMM per agent, batched over agents, covers
    the whole batch (a grouped 1x1 conv over (B, G*d, n) computes the same with the same gather,
    but its backward was about twice as slow on the CPU); the result is a permuted view.
    """
    batch, groups, d, n = tokens.shape
    if groups > 1:
        out = torch.bmm(weight, tokens.permute(1, 2, 0, 3).reshape(groups, d, batch * n))
        return out.view(groups, weight.shape[1], batch, n).permute(2, 0, 1, 3)
    t = tokens[:, 0]
    if t.stride(1) == 1 and t.transpose(1, 2).is_contiguous():
        return F.linear(t.transpose(1, 2), weight[0]).transpose(1, 2).unsqueeze(1)
    return F.conv1d(t, weight[0].unsqueeze(-1)).unsqueeze(1)


def _projection_parts(branches: Sequence[RelationBranch]) -> list:
    """theta, phi and g of every agent, in the order of the projection GEMM's output channels."""
    return [p for b in branches for p in (CBRParts(*b.theta), CBRParts(*b.phi), CBRParts(*b.gx))]


def projection_weight(branches: Sequence[RelationBranch]) -> Tensor:
    """The 1x1 weights of theta, phi and g of every agent stacked: (G, 3d', d)."""
    parts = _projection_parts(branches)
    return torch.cat([p.conv.weight for p in parts]).flatten(1).view(len(branches), -1, parts[0].conv.in_channels)


def projections(tokens: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """theta, phi and g of every agent before their norms: one batched GEMM over the input
    (autocast applies). tokens (B, G, d, n) -> (B, G, 3d', n)."""
    return _project(projection_weight(branches).to(tokens.dtype), tokens)


def activated_projections(
    proj: Tensor, branches: Sequence[RelationBranch], dtype: torch.dtype, update_statistics: bool = True
) -> Tuple[Tensor, Tensor]:
    """The projections' norms and activations, in ``dtype``: theta_phi (B, G, 2, d', n) and the
    channel mean of g (B, G, 1, n)."""
    batch, groups, width, n = proj.shape
    parts = _projection_parts(branches)
    flat = norm_channels(proj.to(dtype).reshape(batch, groups * width, n), [p.norm for p in parts],
                         update_statistics=update_statistics)
    proj = _activate(flat, [p.act for p in parts]).view(batch, groups, 3, width // 3, n)
    theta_phi, g = proj.split([2, 1], 2)  # split, not slices: its backward allocates one map
    return theta_phi, g.mean(3)


def relation_embedding(theta_phi: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """The embedded relation vectors E (B, G, n/s, n) without the n x n relation.

    Embedding weight (n/s, 2n) = [Wr | Wc]: the factors a = [Ar^T; Ac^T] = [phi Wr^T; theta Wc^T]
    (:func:`reid_attention._embedding.factors`), then E_pre = a^T [theta; phi] as one batched
    GEMM, the norm and the activation.
    """
    batch, groups, _, d_inner, n = theta_phi.shape
    gg = [CBRParts(*b.gg) for b in branches]
    w_gg = _weights([p.conv for p in gg], theta_phi.dtype)  # (G, n/s, 2n)
    a = factors(theta_phi, w_gg)
    emb = torch.matmul(a.transpose(2, 3), theta_phi.reshape(batch, groups, 2 * d_inner, n))
    emb = norm_channels(emb.view(batch, groups * w_gg.shape[1], n), [p.norm for p in gg])
    return _activate(emb, [p.act for p in gg]).view(batch, groups, w_gg.shape[1], n)


def lean_embedding(theta_phi: Tensor, branches: Sequence[RelationBranch], w1e: Tensor, stash: list) -> Tensor:
    """W1_E E (B, G, k, n), W1_E the W network's first conv on E, by
    :class:`reid_attention._embedding.LeanEmbedding` (no E-sized tensor kept or held whole)."""
    norms = [b.gg[1] for b in branches]
    w_gg = _weights([b.gg[0] for b in branches], theta_phi.dtype)
    return LeanEmbedding.apply(theta_phi, w_gg, w1e, *affine_parameters(norms, theta_phi.dtype), norms, stash)


def w_network(hidden: Tensor, branches: Sequence[RelationBranch], update_statistics: bool = True) -> Tensor:
    """W after its first conv: hidden (B, G, k, n), the conv's output on y = [g, E] (never
    formed), -> logits (B, G, n)."""
    batch, groups, k, n = hidden.shape
    w = [WParts(*b.W) for b in branches]
    hidden = norm_channels(hidden.view(batch, groups * k, n), [p.norm1 for p in w], update_statistics=update_statistics)
    hidden = _activate(hidden, [p.act for p in w])
    logits = torch.matmul(_weights([p.conv2 for p in w], hidden.dtype), hidden.view(batch, groups, k, n))
    return norm_channels(logits.view(batch, groups, n), [p.norm2 for p in w], update_statistics=update_statistics)


def _after_projections(proj: Tensor, branches, dtype: torch.dtype, stash: Optional[list] = None) -> Tensor:
    """Everything after the projection GEMM: its norms, the embedding and the W network.

    ``stash`` (a list, see :class:`reid_attention._embedding.LeanEmbedding`) takes the lean
    embedding; once it holds the statistics this is a recomputation and no norm updates its
    running statistics.
    """
    update = not stash
    theta_phi, g = activated_projections(proj, branches, dtype, update)
    w1 = _weights([WParts(*b.W).conv1 for b in branches], dtype)  # (G, k, 1 + n/s)
    if stash is None:
        hidden = torch.matmul(w1[:, :, 1:], relation_embedding(theta_phi, branches))
    else:
        hidden = lean_embedding(theta_phi, branches, w1[:, :, 1:], stash)
    return w_network(hidden + w1[:, :, :1] * g, branches, update)


def _recomputable(branches: Sequence[RelationBranch]) -> bool:
    """Whether everything after the projection GEMM may be recomputed: each norm group (as
    :func:`activated_projections`, :func:`relation_embedding` and :func:`w_network` pass them)
    takes the one-kernel route, and every activation is a plain ReLU (a module called again
    would run twice: hooks, SyncBatchNorm's communication)."""
    parts = _projection_parts(branches)
    groups = ([p.norm for p in parts], [b.gg[1] for b in branches], [b.W[1] for b in branches],
              [b.W[4] for b in branches])
    acts = [p.act for p in parts] + [a for b in branches for a in (b.gg[2], b.W[2])]
    return all(one_kernel(group) for group in groups) and all(is_plain(a, nn.ReLU) for a in acts)


def _recomputed(proj: Tensor, branches: Sequence[RelationBranch], dtype: torch.dtype) -> Tensor:
    """:func:`_after_projections` with the lean embedding, keeping only its input, the
    projection (B, G, 3d', n) before its norms, and the logits: every other activation is
    recomputed in backward.

    The recomputation reuses the embedding's statistics and updates no running statistics, so
    BatchNorm statistics are counted once; it normalises with the same batch statistics (the
    same input gives the same values).
    """
    stash: list = []
    return checkpoint(lambda p: _after_projections(p, branches, dtype, stash), proj,
                      use_reentrant=False, preserve_rng_state=False)


def relation_logits_fused(tokens: Tensor, branches: Sequence[RelationBranch], *, lean: bool = False) -> Tensor:
    """Same function as the reference for G stacked agents, without the n x n relation.

    tokens: (B, G, d, n), agent g reading ``tokens[:, g]``; returns logits (B, G, n).
    """
    return logits_from_projections(projections(tokens, branches), branches, lean=lean)


def logits_from_projections(proj: Tensor, branches: Sequence[RelationBranch], *, lean: bool = False) -> Tensor:
    """The logits (B, G, n) from the projections before their norms (:func:`projections`).

    ``lean``: keep only ``proj`` for backward and recompute the rest (taken when the gradient
    is needed and :func:`_recomputable` holds).
    """
    with no_autocast(proj):
        dtype = compute_dtype(proj)
        if lean and torch.is_grad_enabled() and proj.shape[0] > 0 and _recomputable(branches):
            return _recomputed(proj, branches, dtype)
        return _after_projections(proj, branches, dtype)


def gate_values(logits: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """sigmoid(logits) viewed as ``shape`` (broadcastable against the map) in the map's dtype."""
    return torch.sigmoid(logits).view(shape).to(dtype)


def gate(x: Tensor, logits: Tensor, shape: Sequence[int]) -> Tensor:
    """x * sigmoid(logits), the gate broadcast (never expanded) and cast to x's dtype."""
    return x * gate_values(logits, shape, x.dtype)
