"""APNet-S: one site of the spatial attention pyramid, RGA-S agents per horizontal stripe.

Chen et al., "Person Re-identification via Attention Pyramid", IEEE TIP 2021, arXiv:2108.05340.
The authors released no code for this version (they used RGA-S as the agent); it follows the
paper's description.

The levels are stacked as in :mod:`reid_attention.apnet_c` (finest first, each attending to
the output of the finer one). Level l cuts the height into 2^(l-1) horizontal stripes; each
stripe's agent is an RGA-S module built for the stripe's size (its logits: steps 1-5 of the
equation in :mod:`reid_attention.rga`), and

    A_l(x) = x * [sigmoid(RGA-S_1 logits); ...; sigmoid(RGA-S_{2^(l-1)} logits)]   (stacked along H)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_input, check_levels, check_positive_int, feat_pair, layer_name
from ._norm import NormLayer
from ._relation import RelationBranch, gate, lean_applies, relation_logits_fused
from ._switches import ImplSwitch, MemorySwitch
from .rga import RGA

__all__ = ["APNetS"]


def stripe_loop(x: Tensor, level: Sequence[RGA]) -> Tensor:
    """One APNet-S level as a Python loop: each agent gates its own stripe (in the agent's impl)."""
    b, _, h, w = x.shape
    stripes = x.chunk(len(level), dim=2)
    shape = (b, 1, h // len(level), w)
    return torch.cat([gate(s, agent.spatial_logits(s), shape) for agent, s in zip(level, stripes)], dim=2)


def stripes_fused(x: Tensor, branches: Sequence[RelationBranch], lean: bool = False) -> Tensor:
    """One APNet-S level with all its agents (``branches``, top stripe first) in one batched
    relation call: the fused path, in its memory-lean form if ``lean``."""
    b, _, h, w = x.shape
    tokens = rearrange(x, "b c (g h) w -> b g c (h w)", g=len(branches))  # a view, either memory format
    logits = relation_logits_fused(tokens, branches, lean=lean)  # (B, G, h*W)
    return gate(x, logits, (b, 1, h, w))


class APNetS(ImplSwitch, MemorySwitch, nn.Module):
    """One site of the APNet spatial attention pyramid (APNet-S), RGA-S agents per stripe.

    Level l cuts the height into 2^(l-1) stripes of H / 2^(l-1) rows; each stripe has its own
    ``RGA(channels, (H / 2^(l-1), W), spatial=True, channel=False, **rga_kw)`` agent, and the
    stripes' sigmoid gates, stacked along H, multiply the map. Levels run fine -> coarse, each
    gating the output of the finer one (level 1: one RGA-S on the whole map).

    Args:
        channels: C of the input.
        feat_size: (H, W) of the input, a pair; H must be divisible by 2^(levels-1).
        levels: pyramid height (default 2).
        min_width: floor of the agents' inner widths (see :class:`RGA`), so any stripe size builds.
        norm_layer: ``num_channels -> nn.Module`` for the agents' norms (see :class:`RGA`).
        impl: ``"fused"`` (default) or ``"reference"``; settable, and passed on to the agents.
        memory: ``"auto"`` (default), ``"full"`` or ``"lean"`` (see :class:`RGA`; ``"auto"`` counts the
            relation embeddings of a level's stripes together); settable.
        device, dtype: torch's factory keywords.
        **rga_kw: channel_ratio, spatial_ratio, down_ratio of the agents (see :class:`RGA`).

    State dict: ``levels.{l-1}.{stripe}.<RGA-S names>``, e.g. ``levels.1.0.theta_spatial.0.weight``
    is level 2's top stripe; each agent has the official RGA-S layout for its stripe size.

    Attributes: :attr:`levels` holds the agents, an ``nn.ModuleList`` with level l at index
    l - 1, each an ``nn.ModuleList`` of its stripes' :class:`RGA` agents, top stripe first
    (:meth:`agents` lists them all); :attr:`num_levels` is the pyramid height, the int passed
    as ``levels``. The module list keeps the name ``levels`` because it is in the state_dict
    keys above, which presets, the converters and saved checkpoints use; the int is
    ``num_levels``, as on :class:`reid_attention.APNetC`.

    Paths:

    * ``reference`` loops over the stripes (:func:`stripe_loop`): each agent, in its reference
      mode, gates its own stripe, and the gated stripes are concatenated along H.
    * ``fused`` runs a level's agents in one batched call (:func:`stripes_fused`): the stripes
      are viewed as G stacked token sets (B, G, C, h*W) and
      :func:`reid_attention._relation.relation_logits_fused` evaluates all G agents with stacked
      weights; the logits (B, G, h*W) are the (B, 1, H, W) gate by a view. Level 1 (G = 1)
      copies nothing, in NCHW or channels_last. For G > 1 the (batch, stripe) dims of the token
      view cannot share one GEMM batch stride, so the tokens are gathered once per level into
      (G, C, B*h*W) for one GEMM per stripe, batched over the stripes (rather than a broadcast
      matmul, which would copy the stacked weights once per sample). The output keeps x's
      memory format.
    * ``memory="lean"``: the fused call in its memory-lean form, where it applies
      (:func:`reid_attention._relation.lean_applies`, as for :class:`RGA`).
    """

    def __init__(
        self,
        channels: int,
        feat_size: tuple[int, int],
        *,
        levels: int = 2,
        min_width: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        impl: str = "fused",
        memory: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        **rga_kw: Any,
    ) -> None:
        super().__init__()
        self.memory = memory
        self.channels = check_positive_int("channels", channels)
        self.feat_size = feat_pair("APNetS", feat_size)
        height, width = self.feat_size
        self.num_levels = check_levels("APNetS", levels, "the height H", height)
        self.levels = nn.ModuleList(
            nn.ModuleList(
                RGA(channels, (height // stripes, width), spatial=True, channel=False, min_width=min_width,
                    norm_layer=norm_layer, device=device, dtype=dtype, **rga_kw)
                for _ in range(stripes)
            )
            for stripes in (2 ** i for i in range(levels))
        )
        self.impl = impl

    def _impl_changed(self, impl: str) -> None:
        """Pass every ``impl`` assignment on to the stripe agents (:class:`ImplSwitch`'s hook)."""
        for agent in self.agents():
            agent.impl = impl

    def _stripe_levels(self) -> list[list[RGA]]:
        """The stripe agents of each level (a typed view of ``self.levels``)."""
        return [cast("list[RGA]", list(level)) for level in cast("list[nn.ModuleList]", list(self.levels))]

    def agents(self) -> list[RGA]:
        """Every stripe agent, level by level (top stripe first)."""
        return [agent for level in self._stripe_levels() for agent in level]

    def resized(self, feat_size: tuple[int, int], *, mode: str = "bilinear") -> APNetS:
        """A copy for (H', W') maps: every stripe agent :meth:`RGA.resized` to its new stripe.

        H' must be divisible by the finest level's stripes. Exact like :meth:`RGA.resized` for
        nearest upsampling by an integer factor: each stripe of the upsampled map is the
        upsampled stripe.
        """
        height, width = feat_pair("APNetS.resized", feat_size)
        check_levels("APNetS.resized", self.num_levels, "the height H", height)
        resized = copy.deepcopy(self)
        for level, agents in zip(resized.levels, resized._stripe_levels()):
            for i, agent in enumerate(agents):
                cast(nn.ModuleList, level)[i] = agent.resized((height // len(agents), width), mode=mode)
        resized.feat_size = (height, width)
        return resized

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, layer_name(self), self.channels, self.feat_size)
        for level in reversed(self._stripe_levels()):
            if self._impl == "reference":
                x = stripe_loop(x, level)
                continue
            branches = [agent.branch("spatial") for agent in level]
            n = (x.shape[2] // len(level)) * x.shape[3]  # positions of a stripe
            elements = x.shape[0] * len(level) * level[0].widths["spatial"].tokens * n
            lean = lean_applies(branches, x.shape[0]) and self._wants_lean(elements)  # (see RGA._route)
            x = stripes_fused(x, branches, lean=lean)
        return x

    def extra_repr(self) -> str:
        return f"{self.channels}, feat_size={self.feat_size}, levels={self.num_levels}, impl={self._impl!r}"
