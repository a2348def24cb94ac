"""Relation-aware global attention (RGA-S, RGA-C, RGA-SC).

Zhang, Lan, Zeng, Jin, Chen, "Relation-Aware Global Attention for Person Re-identification",
CVPR 2020, arXiv:1904.02998. Official code: microsoft/Relation-Aware-Global-Attention-Networks.

One computation, applied along two axes of a feature map. With tokens T (n tokens of d features),
theta = CBR(T), phi = CBR(T) (d -> d'), the pairwise relation R = theta^T phi (n x n), and for
token i the relation vector r_i = [R(i, :), R(:, i)] (2n values):

    E_i = CBR(2n -> n/s)(r_i),   g_i = mean_c CBR(d -> d')(T)_{c,i},   y_i = [g_i, E_i]
    a_i = BN(conv(k -> 1)(ReLU(BN(conv(1 + n/s -> k)(y_i)))))  with k = (1 + n/s) // down_ratio
    out = sigmoid(a) * x

RGA-S uses the H*W positions as tokens (gate (B, 1, H, W)), RGA-C the C channels (gate
(B, C, 1, 1)); RGA-SC applies RGA-S, then RGA-C to its output.

Two paths compute the same function:

* ``reference`` follows the official module step by step and builds R (B, n, n).
* ``fused`` never builds R. The relation embedding is linear in R before its BatchNorm, so with
  the embedding weight split into the half acting on rows (Wr) and on columns (Wc),
  ``E_pre = Ar theta + Ac phi`` where ``Ar = Wr phi^T`` and ``Ac = Wc theta^T`` (n/s x d'): two
  small batched GEMMs instead of an n x n product and a 2n-channel conv. theta, phi and g come
  from one GEMM over the input, and the concatenation [g, E] is never formed.

The fused core works on a stack of G independent agents (tokens (B, G, d, n)) so that APNet-S
runs all its stripes' RGA-S agents in one batched call.
"""

from __future__ import annotations

import copy
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    batch_norm,
    cbr,
    ImplSwitch,
    check_input,
    check_positive_int,
    compute_dtype,
    conv_weight,
    feat_pair,
    no_autocast,
    where,
)

__all__ = ["RGA"]


class RelationBranch(NamedTuple):
    """The five official sub-networks of one RGA axis (official names ``<name>_spatial`` etc.)."""

    theta: nn.Sequential  # CBR(d -> d')
    phi: nn.Sequential  # CBR(d -> d')
    gx: nn.Sequential  # CBR(d -> d'), averaged over its channels
    gg: nn.Sequential  # CBR(2n -> n/s), embeds the relation vectors
    W: nn.Sequential  # conv(1 + n/s -> k), BN, ReLU, conv(k -> 1), BN


class AxisWidths(NamedTuple):
    """Inner widths of one RGA axis, each ``max(min_width, official formula)``."""

    features: int  # d': width of theta, phi and g
    tokens: int  # n/s: width of the relation embedding
    hidden: int  # k: hidden width of the W network


def build_branch(features: int, tokens: int, widths: AxisWidths, **factory) -> dict:
    """Modules of one axis, keyed by the official attribute stem."""
    d_inner, n_inner, hidden = widths
    return dict(
        theta=cbr(features, d_inner, **factory),
        phi=cbr(features, d_inner, **factory),
        gx=cbr(features, d_inner, **factory),
        gg=cbr(2 * tokens, n_inner, **factory),
        W=nn.Sequential(
            nn.Conv2d(1 + n_inner, hidden, 1, bias=False, **factory),
            nn.BatchNorm2d(hidden, **factory),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, 1, bias=False, **factory),
            nn.BatchNorm2d(1, **factory),
        ),
    )


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


def _apply(seq: nn.Sequential, t: Tensor, dtype: torch.dtype, relu: bool = True) -> Tensor:
    """Conv(1x1) -> BN [-> ReLU] of an official Sequential on tokens (B, d, n).

    The conv runs in t's dtype (autocast applies); BN onwards in ``dtype``.
    """
    y = torch.matmul(seq[0].weight.flatten(1).to(t.dtype), t)
    with no_autocast(t):
        y = batch_norm(y.to(dtype), [seq[1]])
        return torch.relu(y) if relu else y


def relation_logits_reference(tokens: Tensor, branch: RelationBranch) -> Tensor:
    """Official computation for one agent: tokens (B, d, n) -> attention logits (B, 1, n)."""
    dtype = compute_dtype(tokens)
    theta, phi, gx = (_apply(m, tokens, dtype) for m in branch[:3])
    with no_autocast(tokens):
        relation = torch.matmul(theta.transpose(1, 2), phi)  # R(i, j) = <theta_i, phi_j>
        # Channel j of token i holds R(i, j) for the first n channels, R(j, i) for the last n.
        joint = torch.cat((relation.transpose(1, 2), relation), 1)
        embedded = _apply(branch.gg, joint, dtype)
        y = torch.cat((gx.mean(1, keepdim=True), embedded), 1)
        hidden = _apply(branch.W[:3], y, dtype)
        return _apply(branch.W[3:], hidden, dtype, relu=False)


def relation_logits_fused(tokens: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """Same function for G stacked agents without the n x n relation.

    tokens: (B, G, d, n), agent g reading ``tokens[:, g]``; returns logits (B, G, n).
    """
    batch, groups, _, n = tokens.shape
    dtype = compute_dtype(tokens)
    # theta, phi and g of every agent from one batched GEMM over the input (autocast applies).
    w_proj = torch.stack(
        [torch.cat([b.theta[0].weight, b.phi[0].weight, b.gx[0].weight]).flatten(1) for b in branches]
    )
    w_proj = w_proj.to(tokens.dtype)
    proj = _project(w_proj, tokens)  # (B, G, 3d', n)
    d_inner = proj.shape[2] // 3
    with no_autocast(tokens):
        proj = batch_norm(
            proj.to(dtype).reshape(batch, groups * 3 * d_inner, n),
            [bn for b in branches for bn in (b.theta[1], b.phi[1], b.gx[1])],
        ).relu_().view(batch, groups, 3, d_inner, n)
        theta_phi = proj[:, :, :2]  # (B, G, 2, d', n)
        g = proj[:, :, 2].mean(2, keepdim=True)  # (B, G, 1, n)

        # Embedding weight (n/s, 2n) = [Wr | Wc]: Ar^T = phi Wr^T and Ac^T = theta Wc^T, one GEMM
        # per (agent, half) with the batch folded into the rows, so the weights are never expanded
        # over the batch. The token copy this needs also swaps theta and phi to pair them.
        w_gg = conv_weight([b.gg[0] for b in branches], dtype)  # (G, n/s, 2n)
        n_inner = w_gg.shape[1]
        w_rc = w_gg.view(groups, n_inner, 2, n).permute(0, 2, 3, 1).reshape(groups * 2, n, n_inner)
        rows = theta_phi.permute(1, 2, 0, 3, 4)[:, [1, 0]].reshape(groups * 2, batch * d_inner, n)
        a = torch.bmm(rows, w_rc).view(groups, 2, batch, d_inner, n_inner)  # (Ar^T, Ac^T)
        a = a.permute(2, 0, 1, 3, 4).reshape(batch, groups, 2 * d_inner, n_inner)
        emb = torch.matmul(a.transpose(2, 3), theta_phi.reshape(batch, groups, 2 * d_inner, n))
        emb = batch_norm(emb.view(batch, groups * n_inner, n), [b.gg[1] for b in branches]).relu_()

        # W's first conv on [g, E] without forming the concatenation.
        w1 = conv_weight([b.W[0] for b in branches], dtype)  # (G, k, 1 + n/s)
        k = w1.shape[1]
        hidden = torch.matmul(w1[:, :, 1:], emb.view(batch, groups, n_inner, n)) + w1[:, :, :1] * g
        hidden = batch_norm(hidden.view(batch, groups * k, n), [b.W[1] for b in branches]).relu_()
        w2 = conv_weight([b.W[3] for b in branches], dtype)  # (G, 1, k)
        logits = torch.matmul(w2, hidden.view(batch, groups, k, n))  # (B, G, 1, n)
        return batch_norm(logits.view(batch, groups, n), [b.W[4] for b in branches])


def _gate(x: Tensor, logits: Tensor, shape: Sequence[int]) -> Tensor:
    """x * sigmoid(logits), the gate broadcast (never expanded) and cast to x's dtype."""
    return x * torch.sigmoid(logits).view(shape).to(x.dtype)


RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def resample_positions(weight: Tensor, old: Tuple[int, int], new: Tuple[int, int], mode: str) -> Tensor:
    """A 1x1 conv weight (O, P * H*W, 1, 1) whose input axis is P rasters of an H x W map,
    resampled to ``new`` and scaled by ``(H*W) / (H'*W')`` so that sums over positions keep their
    size (see :meth:`RGA.resized`)."""
    out_channels, halves = weight.shape[0], weight.shape[1] // (old[0] * old[1])
    raster = weight.detach().reshape(out_channels * halves, 1, *old).to(compute_dtype(weight))
    resampled = F.interpolate(raster, size=new, mode=mode)
    scale = (old[0] * old[1]) / (new[0] * new[1])
    return (resampled * scale).reshape(out_channels, halves * new[0] * new[1], 1, 1).to(weight.dtype)


def _replace_conv_input(conv: nn.Conv2d, weight: Tensor) -> None:
    """Give a 1x1 conv a new weight (and input width), keeping its requires_grad."""
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = weight.shape[1]


class RGA(ImplSwitch, nn.Module):
    """Relation-aware global attention: RGA-S, RGA-C or RGA-SC on a (B, C, H, W) map.

    Args:
        channels: C of the input.
        feat_size: (H, W) of the input, a pair (the weights depend on H*W). An int is refused:
            the official ``RGA_Module(in_channel, in_spatial)`` takes H*W there.
        spatial / channel: which attentions to use (both: RGA-SC, spatial first).
        channel_ratio: d' = C // channel_ratio (spatial axis) and n/s = C // channel_ratio
            (channel axis), as in the official ``cha_ratio``.
        spatial_ratio: the same for H*W (official ``spa_ratio``).
        down_ratio: width reduction inside the W networks: k = (1 + n/s) // down_ratio.
        min_width: floor of every inner width: each is ``max(min_width, official formula)``, so
            the module equals the official one wherever the formulas give at least ``min_width``
            (every site of the paper) and builds at any map size and channel count (a 1x1 map, a
            single channel). The widths are recorded in :attr:`widths`.
        impl: ``"fused"`` (default, never builds the relation matrix) or ``"reference"``
            (the official computation); settable on a built module.
        device, dtype: torch's factory keywords for the parameters and buffers.

    The state_dict keys and shapes equal the official ``RGA_Module(channels, H*W, ...)``.
    A module built for one map size runs at another after :meth:`resized`.
    """

    def __init__(
        self,
        channels: int,
        feat_size: Tuple[int, int],
        *,
        spatial: bool = True,
        channel: bool = True,
        channel_ratio: int = 8,
        spatial_ratio: int = 8,
        down_ratio: int = 8,
        min_width: int = 1,
        impl: str = "fused",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.feat_size = feat_pair("RGA", feat_size)
        for name, value in (("channel_ratio", channel_ratio), ("spatial_ratio", spatial_ratio),
                            ("down_ratio", down_ratio), ("min_width", min_width)):
            check_positive_int(name, value)
        if not (spatial or channel):
            raise ValueError("RGA needs spatial=True, channel=True or both")
        self.spatial, self.channel = bool(spatial), bool(channel)
        self.impl = impl
        positions = self.feat_size[0] * self.feat_size[1]
        inter_channel = max(min_width, channels // channel_ratio)
        inter_spatial = max(min_width, positions // spatial_ratio)
        self.widths: Dict[str, AxisWidths] = {}
        axes = {}
        factory = dict(device=device, dtype=dtype)
        if spatial:
            self.widths["spatial"] = AxisWidths(
                inter_channel, inter_spatial, max(min_width, (1 + inter_spatial) // down_ratio)
            )
            axes["spatial"] = build_branch(channels, positions, self.widths["spatial"], **factory)
        if channel:
            self.widths["channel"] = AxisWidths(
                inter_spatial, inter_channel, max(min_width, (1 + inter_channel) // down_ratio)
            )
            axes["channel"] = build_branch(positions, channels, self.widths["channel"], **factory)
        for stem in ("theta", "phi", "gx", "gg", "W"):  # the official registration order
            for axis, modules in axes.items():
                self.add_module(f"{stem}_{axis}", modules[stem])

    def branch(self, axis: str) -> RelationBranch:
        """The official sub-networks of ``axis`` ("spatial" or "channel")."""
        return RelationBranch(*(getattr(self, f"{stem}_{axis}") for stem in RelationBranch._fields))

    def resized(self, feat_size: Tuple[int, int], *, mode: str = "bilinear") -> "RGA":
        """A copy of this module for (H', W') maps: resolution transfer of the trained weights.

        The weights meet the map size only on axes indexed by position: the 2N inputs of
        ``gg_spatial`` (the row half and the column half of a relation vector, each an H x W
        raster) and the N inputs of ``theta/phi/gx_channel`` (a channel's map). Exactly those
        axes are resampled as H x W images (``F.interpolate`` with ``mode``) and multiplied by
        N / N' (N = H*W, N' = H'*W'), so that every sum over positions keeps its size; every
        other tensor and every inner width (:attr:`widths`) stays as built, and so do the
        state_dict keys, the impl, the training mode, device and dtype.

        **Exact for nearest upsampling by an integer factor k** (``mode="nearest"``). On
        x' = nearest-upsampling of x, each position p of x becomes k^2 positions p' with the
        same features. Spatial axis: theta and phi of the copies equal those of p, so the
        relation vector of p' repeats each entry R(p, q) of p's k^2 times; the resampled weight
        repeats each w(q) k^2 times divided by k^2, so ``sum_q' w'(q') R'(p', q') = sum_q w(q)
        R(p, q)``: the embedding, g, the W network and the gate of p' are those of p. Channel
        axis: a channel's map of x' repeats each value k^2 times and theta/phi/gx weights are
        repeated and divided by k^2, so every projection, relation and gate is unchanged. Hence
        ``resized(x') == upsample(original(x))``. BatchNorm batch statistics pool k^2 copies of
        the same values, so their mean and biased variance are unchanged and the equality holds
        in training mode too (the running variance's unbiased correction n / (n - 1) differs).

        Any other factor or mode (bilinear, shrinking) is an approximation, like interpolating
        a ViT's position embedding: the relation of a resampled map is close to the resampled
        relation for smooth maps (``benchmarks/resize_transfer.py`` measures how close).
        """
        new_size = feat_pair("RGA.resized", feat_size)
        if mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
        resized = copy.deepcopy(self)
        positional = []
        if self.spatial:
            positional.append(resized.gg_spatial[0])
        if self.channel:
            positional += [resized.theta_channel[0], resized.phi_channel[0], resized.gx_channel[0]]
        for conv in positional:
            _replace_conv_input(conv, resample_positions(conv.weight, self.feat_size, new_size, mode))
        resized.feat_size = new_size
        return resized

    def _logits(self, tokens: Tensor, axis: str) -> Tensor:
        """tokens (B, d, n) -> logits (B, 1, n) on the selected path."""
        if self._impl == "reference":
            return relation_logits_reference(tokens, self.branch(axis))
        return relation_logits_fused(tokens.unsqueeze(1), [self.branch(axis)])

    def spatial_logits(self, x: Tensor) -> Tensor:
        """RGA-S logits (B, 1, H*W) of a validated input."""
        return self._logits(x.flatten(2), "spatial")

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, where(self), self.channels, self.feat_size)
        b, c, h, w = x.shape
        if self.spatial:
            x = _gate(x, self.spatial_logits(x), (b, 1, h, w))
        if self.channel:
            x = _gate(x, self._logits(x.flatten(2).transpose(1, 2), "channel"), (b, c, 1, 1))
        return x

    def extra_repr(self) -> str:
        kind = {(True, True): "sc", (True, False): "s", (False, True): "c"}[(self.spatial, self.channel)]
        widths = ", ".join(f"{axis}={tuple(w)}" for axis, w in self.widths.items())
        return (f"{self.channels}, feat_size={self.feat_size}, kind=rga_{kind}, widths({widths}), "
                f"impl={self._impl!r}")
