"""APNet-C: one site of the channel attention pyramid.

Chen et al., "Person Re-identification via Attention Pyramid", IEEE TIP 2021, arXiv:2108.05340.
Official code: CHENGY12/APNet (channel version only).

"Split-attend-merge-stack": pyramid level l cuts the map into 2^(l-1) parts, gives each part its
own attention agent, merges the parts' attentions back into one map-sized attention, and the
levels are stacked, the finest first, each level attending to the output of the finer one:

    x_L = A_L(x),  x_l = A_l(x_{l+1}),  out = x_1        (A_1 attends to the whole map)

APNet-C cuts the channels into contiguous groups; level 1 is a squeeze-excitation gate

    A_1(x) = x * sigmoid(W2 relu(W1 GAP(x)))

and level l >= 2, with r = 2^(l-1) groups x = [x_1 .. x_r] of C/r channels, is

    s = GAP(x_1 + ... + x_r),  z = fc2(relu(BN(fc1(s)))) viewed (r, C/r)
    A_l(x) = BN_l([softmax_r(z)_1 * x_1, ..., softmax_r(z)_r * x_r])   (BN_l: frozen bias)

The spatial version, stripes with RGA-S agents, is :mod:`reid_attention.apnet_s`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import check_input, check_levels, check_positive_int, layer_name
from ._norm import NormLayer, batchnorm_affine, make_norm, norm_channels, one_kernel, run_module
from ._precision import compute_dtype, no_autocast
from ._switches import ImplSwitch

__all__ = ["APNetC"]


def _linear(x: Tensor, layer: nn.Module, dtype: torch.dtype) -> Tensor:
    """A Linear or 1x1 Conv2d layer on (B, in) features, in ``dtype``."""
    weight, bias = cast(Tensor, layer.weight), cast("Tensor | None", layer.bias)
    return F.linear(x, weight.flatten(1).to(dtype), None if bias is None else bias.to(dtype))


class SqueezeExcite(nn.Module):
    """Level 1 of APNet-C: gate = sigmoid(W2 relu(W1 GAP(x))), bias-free (official SELayer)."""

    def __init__(self, channels: int, hidden: int, **factory: Any) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False, **factory),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=False, **factory),
            nn.Sigmoid(),
        )

    def gate(self, pooled: Tensor) -> Tensor:
        """(B, C) channel means -> (B, C) gate, in pooled's dtype."""
        hidden = torch.relu(_linear(pooled, self.fc[0], pooled.dtype))
        return torch.sigmoid(_linear(hidden, self.fc[2], pooled.dtype))

    def reference(self, x: Tensor) -> Tensor:
        """The official SE layer on the map: x * fc(avg_pool(x))."""
        gate: Tensor = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x * gate.view(*x.shape[:2], 1, 1)


class SplitAttention(nn.Module):
    """Level l >= 2 of APNet-C on r contiguous channel groups (official SAMS + BN2d).

    Parameter names follow the official SAMS (fc1, bn1, fc2) plus ``norm`` for the BN2d that
    follows it (official ``BN{k}.bottleneck2``; its bias is frozen).
    """

    fc1: nn.Conv2d
    fc2: nn.Conv2d
    bn1: nn.Module
    norm: nn.Module

    def __init__(
        self, channels: int, groups: int, reduction: int, min_width: int, norm_layer: NormLayer,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.groups = groups
        width = max(channels * groups // reduction, min_width)
        self.fc1 = nn.Conv2d(channels // groups, width, 1, **factory)
        self.bn1 = make_norm(norm_layer, width, **factory)
        self.fc2 = nn.Conv2d(width, channels, 1, **factory)
        self.norm = make_norm(norm_layer, channels, **factory)
        bias = getattr(self.norm, "bias", None)
        if isinstance(bias, nn.Parameter):  # frozen, as in the official model
            bias.requires_grad_(False)

    def gate(self, pooled: Tensor) -> Tensor:
        """(B, C) channel means of the input -> (B, C) softmax weights, in pooled's dtype.

        The mean of the groups' sum is the sum of the groups' means; one batched softmax runs
        across the r groups for every within-group channel.
        """
        b, c = pooled.shape
        summed = pooled.view(b, self.groups, c // self.groups).sum(1)
        hidden = norm_channels(_linear(summed, self.fc1, pooled.dtype).unsqueeze(2), [self.bn1])
        logits = _linear(hidden.squeeze(2).relu(), self.fc2, pooled.dtype)
        return logits.view(b, self.groups, c // self.groups).softmax(1).view(b, c)

    def reference(self, x: Tensor) -> Tensor:
        """The official SAMS (split, attend, merge) then BN2d, module by module."""
        b, c = x.shape[:2]
        parts = torch.split(x, c // self.groups, dim=1)
        merged = cast(Tensor, sum(parts))
        hidden = torch.relu(self.bn1(self.fc1(F.adaptive_avg_pool2d(merged, 1))))
        softmax = self.fc2(hidden).view(b, self.groups, c // self.groups).softmax(1)
        weights = torch.split(softmax.view(b, c, 1, 1), c // self.groups, dim=1)
        out: Tensor = self.norm(torch.cat([w * part for w, part in zip(weights, parts)], 1))
        return out


class _ChannelMoments(torch.autograd.Function):
    """Per-(sample, channel) mean and biased variance over positions, (B, C) each.

    Two-pass forward, as BatchNorm's CPU kernel computes it (the mean, then the norm of the
    centred map), and a one-pass backward ``dL/dx = dL/dmean / N + 2 (x - mean) dL/dvar / N``.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean((2, 3), dtype=compute_dtype(x))
        centred = x - mean[:, :, None, None]
        var = torch.linalg.vector_norm(centred, dim=(2, 3)).square() / (x.shape[2] * x.shape[3])
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        count = x.shape[2] * x.shape[3]
        slope = 2 * grad_var / count
        offset = grad_mean / count - slope * mean
        with no_autocast(x):
            return torch.addcmul(offset[:, :, None, None], x, slope[:, :, None, None]).to(x.dtype)


def _moments(x: Tensor, with_var: bool) -> tuple[Tensor, Tensor | None]:
    """Per-(sample, channel) spatial mean (B, C) and, if asked, biased variance (else None)."""
    if with_var:
        mean, var = _ChannelMoments.apply(x)
        return mean, var
    return x.mean((2, 3), dtype=compute_dtype(x)), None


def _apply_folded_affine(x: Tensor, mean: Tensor, scale: Tensor, pooled: Tensor) -> Tensor:
    """``x * scale + shift`` per (sample, channel), the shift set so the spatial means are
    ``pooled`` (x's are ``mean``): one broadcast addcmul that keeps x's memory format."""
    shift = pooled - mean * scale
    return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])


class APNetC(ImplSwitch, nn.Module):
    """One site of the APNet channel attention pyramid (APNet-C).

    Levels run fine -> coarse: split attention with r = 2^(l-1) groups for l = levels .. 2 (each
    followed by a BatchNorm2d with frozen bias), then the SE gate (level 1).

    Args:
        channels: C of the input; must be divisible by 2^(levels-1).
        levels: pyramid height (official default 2; 1 = SE gate only).
        se_hidden: SE hidden width (official: 8 at every site).
        split_reduction, split_min_width: split-attention hidden width
            ``max(C * r // split_reduction, split_min_width)`` (official 4 and 32).
        norm_layer: ``num_channels -> nn.Module`` for the split levels' two norms (default
            ``nn.BatchNorm2d``; a ``bias`` parameter of the level's output norm is frozen).
        impl: ``"fused"`` (default) or ``"reference"``; settable on a built module.
        device, dtype: torch's factory keywords (so timm's ``attn_layer=APNetC`` works).

    Level 3+: the official code builds every split level with r = ``levels`` groups, which at
    level 3 cannot divide the channels (64 / 3), so it does not run; as in the paper's figure
    (1, 2, 4 parts) level l uses r = 2^(l-1) here. Level 2 (r = 2) equals the official model.

    State dict: ``se.fc.0.weight``, ``se.fc.2.weight`` (official ``att{k}.fc.*``) and, for level
    l = i + 2, ``split.{i}.fc1.*``, ``split.{i}.bn1.*``, ``split.{i}.fc2.*``, ``split.{i}.norm.*``
    (official level 2: ``att_s{k}.fc1/bn1/fc2`` and ``BN{k}.bottleneck2``).
    :attr:`num_levels` is the pyramid height (the ``levels`` argument), as on :class:`reid_attention.APNetS`.

    Batch of one in training mode: refused with a ValueError (levels >= 2). The split attention
    normalises globally pooled features with BatchNorm, which has a single value per channel
    then, and PyTorch cannot compute its batch statistics. Evaluation mode accepts any batch.

    Paths:

    * ``reference`` runs the official modules on the map, level by level (split, pool, attend,
      re-weight, concatenate, BatchNorm2d, then SE).
    * ``fused`` never runs a level on the map. Every level is a per-(sample, channel) affine
      map of its input (a softmax weight, a BatchNorm, an SE gate), so the whole pyramid is
      ``x * scale + shift`` with (B, C) ``scale`` and ``shift``. Each level's pooled input and
      its BatchNorm batch statistics (mean of the means; mean of the variances plus variance of
      the means) follow from the per-(sample, channel) mean and variance of x, all gates are
      computed on (B, C) tensors, and the map is read for its moments and written once as the
      output (one ``addcmul``, broadcast, keeping the memory format). The moments have a
      one-pass hand-written backward (first-order gradients only). Outputs, gradients and
      running statistics equal the reference's; an empty batch takes the reference path. The
      moments and gates are float32 for half inputs. This folding is taken for a level's output
      norm only when it is an exact BatchNorm (:func:`reid_attention._norm.one_kernel`); any
      other norm (SyncBatchNorm, FrozenBatchNorm2d, GroupNorm, ...) is called as a module on the
      map materialised at that level, and the levels after it fold again from its output.
    """

    se: SqueezeExcite
    split: nn.ModuleList  # of SplitAttention, levels 2 .. levels (typed view: _split_levels)

    def __init__(
        self,
        channels: int,
        *,
        levels: int = 2,
        se_hidden: int = 8,
        split_reduction: int = 4,
        split_min_width: int = 32,
        norm_layer: NormLayer = nn.BatchNorm2d,
        impl: str = "fused",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.num_levels = check_levels("APNetC", levels, "channels", channels)
        for name, value in (("se_hidden", se_hidden), ("split_reduction", split_reduction),
                            ("split_min_width", split_min_width)):
            check_positive_int(name, value)
        factory = dict(device=device, dtype=dtype)
        self.se = SqueezeExcite(channels, se_hidden, **factory)
        self.split = nn.ModuleList(
            SplitAttention(channels, 2 ** (level - 1), split_reduction, split_min_width, norm_layer,
                           **factory)
            for level in range(2, levels + 1)
        )
        self.impl = impl

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, layer_name(self), self.channels)
        if self.training and len(self.split) and x.shape[0] == 1:
            raise ValueError(
                "APNetC with levels >= 2 needs a batch of at least 2 in training mode: its split "
                "attention applies BatchNorm to globally pooled features (one value per channel "
                "for a batch of 1); use a larger batch or call .eval()"
            )
        if self._impl == "reference" or x.shape[0] == 0:  # nothing to fuse on an empty batch
            for level in reversed(self._split_levels()):
                x = level.reference(x)
            return self.se.reference(x)
        return self._fused(x)

    def _split_levels(self) -> list[SplitAttention]:
        return cast("list[SplitAttention]", list(self.split))

    def _fused(self, x: Tensor) -> Tensor:
        count = x.shape[2] * x.shape[3]
        levels = self._split_levels()
        # Exact BatchNorms are folded into the running affine map; any other norm is called as a
        # module on the map materialised so far (the gates stay on pooled features).
        folded = [one_kernel([level.norm]) for level in levels]
        with_var = any(f and (level.norm.training or level.norm.running_mean is None)
                       for f, level in zip(folded, levels))
        with no_autocast(x):
            src = x
            mean, var = _moments(src, with_var)
            # The map so far is src * scale + (a shift): track scale and the map's spatial means.
            scale, pooled = torch.ones_like(mean), mean
            for level, fold in zip(reversed(levels), reversed(folded)):
                weight = level.gate(pooled)
                scale, pooled = scale * weight, pooled * weight
                if fold:
                    stats = None if var is None else var * scale.square()
                    norm_scale, norm_shift = batchnorm_affine(level.norm, pooled, stats, count)
                    scale, pooled = scale * norm_scale, torch.addcmul(norm_shift, pooled, norm_scale)
                else:
                    src = run_module(level.norm, _apply_folded_affine(src, mean, scale, pooled))
                    mean, var = _moments(src, with_var)
                    scale, pooled = torch.ones_like(mean), mean
            se_gate = self.se.gate(pooled)
            out = _apply_folded_affine(src, mean, scale * se_gate, pooled * se_gate)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, levels={self.num_levels}, impl={self._impl!r}"
