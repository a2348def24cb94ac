"""Relation-aware global attention (RGA-S, RGA-C, RGA-SC).

Zhang, Lan, Zeng, Jin, Chen, "Relation-Aware Global Attention for Person Re-identification",
CVPR 2020, arXiv:1904.02998. Official code: microsoft/Relation-Aware-Global-Attention-Networks.

**The equation** (stated here once for the package; other docstrings cite its step numbers).
One agent reads tokens T, n tokens of d features; CBR = 1x1 conv without bias, norm, ReLU.

    1. theta = CBR(d -> d')(T),  phi = CBR(d -> d')(T)
    2. R = theta^T phi (n x n),  r_i = [R(i, :), R(:, i)]  (token i's relation vector, 2n values)
    3. E_i = CBR(2n -> n/s)(r_i)
    4. g_i = mean over the d' channels of CBR(d -> d')(T), at token i
    5. a_i = BN(conv(k -> 1)(ReLU(BN(conv(1 + n/s -> k)([g_i, E_i])))))   k = (1 + n/s) // down_ratio
    6. out = sigmoid(a) * x, broadcast along the other axis (no residual)

RGA-S: tokens = the H*W positions, features = the C channels, gate (B, 1, H, W). RGA-C: tokens =
the C channels, features = the positions, gate (B, C, 1, 1). RGA-SC: RGA-S, then RGA-C on its
output. The fused path computes steps 2-3 without R: the embedding is linear in R before its
norm, so with its weight split into row and column halves [Wr | Wc], E_pre = (Wr phi^T) theta +
(Wc theta^T) phi (derivation in :mod:`reid_attention._relation.fused`).

**Reading map.** :meth:`RGA._route` chooses each call's path; the relation core
(:mod:`reid_attention._relation`, shared with APNet-S) computes it, one module per path:

* reference: ``reference.relation_logits_reference``, steps 1-5 slot by slot, building R.
* fused: ``fused.projections`` (steps 1 and 4 as one GEMM) and ``fused.activated_projections``
  (their norms); ``fused.relation_embedding`` (steps 2-3 by ``fused.factors``, no R);
  ``fused.w_network`` (step 5; ``fused.after_projections`` applies W's first conv to g and E
  separately, so [g, E] is never formed).
* fused-lean (``memory="lean"``): as fused, with steps 2-3 and W's first conv by
  ``lean.LeanEmbedding`` (in batch chunks, E never held whole), and everything after the
  projection GEMM recomputed in backward (``lean.lean_logits``).
* RGA-SC training route (fused, gradient recorded): the spatial axis as above; the channel
  axis's GEMM on y1 = x * s1 by ``fused.GatedChannelProjection`` and step 6 of both axes by
  ``fused.DoubleGate``, so y1 is recomputed in backward, never kept.

Step 6 is ``modules.gate`` on the other paths. The layers call the core's entry points
(``relation_logits_reference``, ``relation_logits_fused``, ``logits_from_projections``) from
``_relation/__init__.py``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_input, check_positive_int, feat_pair, layer_name
from ._norm import NormLayer
from ._precision import autocast_dtype, compute_dtype, no_autocast
from ._relation import (
    AxisWidths,
    DoubleGate,
    GatedChannelProjection,
    RelationBranch,
    build_branch,
    conv_weight,
    gate,
    gate_values,
    lean_applies,
    logits_from_projections,
    projection_weight,
    relation_logits_fused,
    relation_logits_reference,
)
from ._switches import ImplSwitch, MemorySwitch

__all__ = ["RGA"]


RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def resample_positions(weight: Tensor, old: tuple[int, int], new: tuple[int, int], mode: str) -> Tensor:
    """A 1x1 conv weight (O, P * H*W, 1, 1) whose input axis is P rasters of an H x W map,
    resampled to ``new`` and scaled by ``(H*W) / (H'*W')`` so that sums over positions keep their
    size (see :meth:`RGA.resized`)."""
    out_channels, halves = weight.shape[0], weight.shape[1] // (old[0] * old[1])
    raster = weight.detach().reshape(out_channels * halves, 1, *old).to(compute_dtype(weight))
    resampled = F.interpolate(raster, size=new, mode=mode)
    scale = (old[0] * old[1]) / (new[0] * new[1])
    return (resampled * scale).reshape(out_channels, halves * new[0] * new[1], 1, 1).to(weight.dtype)


def _replace_conv_input(conv: nn.Module, weight: Tensor) -> None:
    """Give a 1x1 conv a new weight (and input width), keeping its requires_grad."""
    conv2d = cast(nn.Conv2d, conv)  # a slot of an official Sequential
    conv2d.weight = nn.Parameter(weight, requires_grad=conv2d.weight.requires_grad)
    conv2d.in_channels = weight.shape[1]


class Route(NamedTuple):
    """How one call of an :class:`RGA` runs (see the reading map above)."""

    paths: dict[str, str]  # axis -> "reference", "fused" or "fused-lean"
    sc_training: bool  # RGA-SC's training route: y1 = x * s1 recomputed in backward, not kept


class RGA(ImplSwitch, MemorySwitch, nn.Module):
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
        norm_layer: ``num_channels -> nn.Module`` for every norm (default ``nn.BatchNorm2d``;
            e.g. ``lambda c: nn.GroupNorm(1, c)``, torchvision's ``FrozenBatchNorm2d``). Every
            path calls the norms it owns (see :mod:`reid_attention._norm`), so
            ``nn.SyncBatchNorm.convert_sync_batchnorm`` and swapped norms take effect.
        impl: ``"fused"`` (default, never builds the relation matrix) or ``"reference"``
            (the official computation); settable on a built module.
        memory: ``"auto"`` (default), ``"full"`` or ``"lean"`` (fused path: of each axis only the
            projection GEMM output and small results are kept for backward, the rest is
            recomputed there and the relation embedding is never held whole, in inference too;
            exact BatchNorms only); ``"auto"`` takes the lean form for calls with a large relation
            embedding (see :class:`reid_attention._switches.MemorySwitch`); settable. In every
            mode the fused RGA-SC keeps no copy of the spatially gated map for backward (it is
            recomputed from the input and the gate).
        device, dtype: torch's factory keywords for the parameters and buffers.

    The state_dict keys and shapes equal the official ``RGA_Module(channels, H*W, ...)``.
    A module built for one map size runs at another after :meth:`resized`.
    """

    def __init__(
        self,
        channels: int,
        feat_size: tuple[int, int],
        *,
        spatial: bool = True,
        channel: bool = True,
        channel_ratio: int = 8,
        spatial_ratio: int = 8,
        down_ratio: int = 8,
        min_width: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        impl: str = "fused",
        memory: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.feat_size = feat_pair("RGA", feat_size)
        self.memory = memory
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
        self.widths: dict[str, AxisWidths] = {}
        axes = {}
        factory = dict(device=device, dtype=dtype)
        if spatial:
            self.widths["spatial"] = AxisWidths(
                inter_channel, inter_spatial, max(min_width, (1 + inter_spatial) // down_ratio)
            )
            axes["spatial"] = build_branch(channels, positions, self.widths["spatial"], norm_layer, **factory)
        if channel:
            self.widths["channel"] = AxisWidths(
                inter_spatial, inter_channel, max(min_width, (1 + inter_channel) // down_ratio)
            )
            axes["channel"] = build_branch(positions, channels, self.widths["channel"], norm_layer, **factory)
        for stem in ("theta", "phi", "gx", "gg", "W"):  # the official registration order
            for axis, modules in axes.items():
                self.add_module(f"{stem}_{axis}", modules[stem])

    def branch(self, axis: str) -> RelationBranch:
        """The official sub-networks of ``axis`` ("spatial" or "channel")."""
        return RelationBranch(*(getattr(self, f"{stem}_{axis}") for stem in RelationBranch._fields))

    def resized(self, feat_size: tuple[int, int], *, mode: str = "bilinear") -> RGA:
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
        positional: list[nn.Module] = []
        if self.spatial:
            positional.append(resized.branch("spatial").gg[0])
        if self.channel:
            channel = resized.branch("channel")
            positional += [channel.theta[0], channel.phi[0], channel.gx[0]]
        for conv in positional:
            _replace_conv_input(conv, resample_positions(conv_weight(conv), self.feat_size, new_size, mode))
        resized.feat_size = new_size
        return resized

    def _route(self, x: Tensor) -> Route:
        """The path of this call on ``x``, chosen here and nowhere else.

        ``impl="reference"``: every axis on the reference path. ``impl="fused"``: every axis on
        the fused path, in its memory-lean form where ``memory`` asks for it (``"lean"``, or
        ``"auto"`` for a large relation embedding: batch x n/s x n values) and the form applies to
        that axis (:func:`reid_attention._relation.lean_applies`: non-empty batch, exact
        BatchNorms and plain ReLUs, and a gradient recorded or an eager call); and RGA-SC takes
        its training route whenever a gradient is recorded.
        """
        if self._impl == "reference":
            return Route(dict.fromkeys(self.widths, "reference"), sc_training=False)
        n = {"spatial": x.shape[2] * x.shape[3], "channel": x.shape[1]}  # an axis's positions
        # lean_applies first: in a traced, compiled or exported inference program the batch size
        # is not compared with anything, so a dynamic batch stays dynamic
        paths = {
            axis: "fused-lean"
            if lean_applies([self.branch(axis)], x.shape[0])
            and self._wants_lean(x.shape[0] * widths.tokens * n[axis]) else "fused"  # batch x n/s x n
            for axis, widths in self.widths.items()
        }
        return Route(paths, sc_training=self.spatial and self.channel and torch.is_grad_enabled())

    def _logits(self, tokens: Tensor, axis: str, path: str) -> Tensor:
        """tokens (B, d, n) -> logits (B, 1, n) on ``path``."""
        if path == "reference":
            return relation_logits_reference(tokens, self.branch(axis))
        return relation_logits_fused(tokens.unsqueeze(1), [self.branch(axis)], lean=path == "fused-lean")

    def spatial_logits(self, x: Tensor) -> Tensor:
        """RGA-S logits (B, 1, H*W) of a validated input: tokens are the positions."""
        return self._spatial_logits(x, self._route(x).paths["spatial"])

    def _spatial_logits(self, x: Tensor, path: str) -> Tensor:
        return self._logits(rearrange(x, "b c h w -> b c (h w)"), "spatial", path)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, layer_name(self), self.channels, self.feat_size)
        route = self._route(x)
        if route.sc_training:
            return self._spatial_then_channel(x, route.paths)
        b, c, h, w = x.shape
        if self.spatial:
            x = gate(x, self._spatial_logits(x, route.paths["spatial"]), (b, 1, h, w))
        if self.channel:
            channel_tokens = rearrange(x, "b c h w -> b (h w) c")  # tokens are the channels
            x = gate(x, self._logits(channel_tokens, "channel", route.paths["channel"]), (b, c, 1, 1))
        return x

    def _spatial_then_channel(self, x: Tensor, paths: dict[str, str]) -> Tensor:
        """RGA-SC's training route: the same function as gating twice, without keeping the
        spatially gated map y1 = x * s1 for backward (x, already kept by the spatial gate, and
        the two gates are kept; y1 is recomputed where backward needs it)."""
        b, c, h, w = x.shape
        s1 = gate_values(self._spatial_logits(x, paths["spatial"]), (b, 1, h, w), x.dtype)
        branch = self.branch("channel")
        gemm_dtype = autocast_dtype(x)  # read before autocast is turned off
        with no_autocast(x):
            proj, y1 = GatedChannelProjection.apply(x, s1, projection_weight([branch])[0], gemm_dtype)
        logits = logits_from_projections(proj, [branch], lean=paths["channel"] == "fused-lean")
        out: Tensor = DoubleGate.apply(x, s1, gate_values(logits, (b, c, 1, 1), x.dtype), y1)
        return out

    def extra_repr(self) -> str:
        kind = {(True, True): "sc", (True, False): "s", (False, True): "c"}[(self.spatial, self.channel)]
        widths = ", ".join(f"{axis}={tuple(w)}" for axis, w in self.widths.items())
        return (f"{self.channels}, feat_size={self.feat_size}, kind=rga_{kind}, widths({widths}), "
                f"impl={self._impl!r}")
