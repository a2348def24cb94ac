"""Parameter-free spatial attention (PFSA).

Wang et al., "Parameter-Free Spatial Attention Network for Person Re-Identification",
arXiv:1811.12150. Official code: HRanWang/Spatial-Re-Scaling (``SpatialAttn``).

With m = the mean over channels of x (B, 1, H, W), the attention map and the layer are

    a_p = m_p / sum_q m_q           (normalize="sum", the official code)
    a_p = exp(m_p) / sum_q exp(m_q) (normalize="softmax", the paper's text)
    out = x * a,                    pool(x) = sum_p a_p x_p  (B, C)

The official network multiplies layer1..3 maps of a PCB-style ResNet-50 by a and average-pools
them; :meth:`ParameterFreeSpatialAttention.pool` is that weighted pooling as one operation (the
official average pool equals ``pool(x) / (H * W)``).

**Two forms.** The official a sums to 1 over the N = H*W positions, so ``x * a`` divides the map by
about N: harmless right before pooling (where the official network uses it), fatal on a
backbone's main path (a ResNet-50's pooled features shrink by ~1e-8 over four sites).
``preserve_scale=True`` uses ``N * a`` instead: the same map up to that constant, with mean 1 over
positions, so ``x * (N a)`` keeps the map's scale. ``attention`` returns the map the layer
multiplies by (``N a`` in that form) and ``pool`` stays ``forward(x).sum((2, 3))``. The layer's
default is the official form; :func:`reid_attention.insert_attention` builds the scale-preserving one.

Two paths compute the same function:

* ``reference`` follows the official layer: the channel mean, then one map at a time normalised
  (the per-sample function vmapped over the batch, in place of the official Python loop, so that
  the batch stays dynamic under torch.export), then ``x * a`` (and ``(x * a).sum`` for
  pooling), all autograd.
* ``fused`` normalises every map in one batched operation, pools with one batched
  vector-matrix product over a view of x (either memory format, no (B, C, H, W) temporary),
  and has a hand-written backward: autograd would return the gradient of ``x * a`` (or of the
  pooling) and that of the channel mean as two full-size tensors and add them; here both terms,
  ``g * a + (dL/dm) / C``, are written in one pass. It supports first-order gradients only
  (double backward raises).

Numerics: the channel mean and the normaliser accumulate in float32 for half inputs (float64
stays), with autocast off; outputs have the input's dtype.

The official sum normalisation has no guard: an all-zero map divides 0 by 0. Here the sum keeps
its sign and is pushed away from zero to at least ``eps`` in magnitude (``eps=1e-12``, the
F.normalize default): on any map whose sum is at least ``eps`` this is exactly the official
value (and gradient), an all-zero map gets a = 0 (so the layer returns zeros and ``pool`` zero
vectors), and a map with negative mean (inputs not after a ReLU) is divided by its own negative
sum, as the official code does, instead of by a clamped positive one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import ArgumentError, check_input, check_positive_int
from ._precision import compute_dtype, no_autocast
from ._switches import ImplSwitch

__all__ = ["ParameterFreeSpatialAttention"]

NORMALIZATIONS = ("sum", "softmax")


def _signed_clamp(s: Tensor, eps: float) -> Tensor:
    """``s`` with its magnitude raised to at least ``eps``, sign kept (zero counts as positive)."""
    return torch.where(s < 0, s.clamp(max=-eps), s.clamp(min=eps))


def _normalise(m: Tensor, normalize: str, eps: float, scale: float) -> Tensor:
    """Normalise maps m (..., H*W) over their last dim to sum ``scale``."""
    if normalize == "softmax":
        return m.softmax(-1) * scale
    # S' / scale is S' itself for scale 1: the official division, bit for bit.
    return m / (_signed_clamp(m.sum(-1, keepdim=True), eps) / scale)


def _normalise_backward(
    grad_a: Tensor, a: Tensor, total: Tensor, normalize: str, eps: float, scale: float
) -> Tensor:
    """dL/dm from dL/da for :func:`_normalise`; ``total`` is sum_p m_p (B, 1).

    With u = a / scale the unit-sum map, dL/du = scale * dL/da and <dL/du, u> = <dL/da, a>.
    """
    dot = (grad_a * a).sum(-1, keepdim=True) / scale  # <dL/da, u>
    if normalize == "softmax":
        return a * (grad_a - dot)  # scale * u * (dL/da - <dL/da, u>)
    # u = m / S' with S' = signed_clamp(S): the clamp passes S's gradient only where |S| >= eps.
    return (grad_a - dot * (total.abs() >= eps)) / (_signed_clamp(total, eps) / scale)


def _token_major(x: Tensor) -> bool:
    """Whether x is stored channels-last, so that :func:`_tokens` is a dense view."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _tokens(x: Tensor) -> Tensor:
    """x (B, C, H, W) as (B, H*W, C): a view for NCHW and channels_last storage alike."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class _FusedPFSA(torch.autograd.Function):
    """x -> ``x * a`` (pool=False) or ``sum_p a_p x_p`` (pool=True) with a one-pass backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, normalize: str, eps: float, scale: float, pool: bool) -> Tensor:
        b, c = x.shape[:2]
        m = x.mean(1, dtype=compute_dtype(x)).flatten(1)  # (B, N)
        total = m.sum(1, keepdim=True)
        a = _normalise(m, normalize, eps, scale)
        ctx.save_for_backward(x, a, total)
        ctx.normalize, ctx.eps, ctx.scale, ctx.pool = normalize, eps, scale, pool
        a_x = a.to(x.dtype)
        if not pool:
            return x * a_x.view(b, 1, *x.shape[2:])
        # (B, 1, N) @ (B, N, C), the vector on the left: on the CPU the faster GEMV orientation
        # than (B, C, N) @ (B, N, 1), in either memory format (benchmarks/ hold the numbers).
        return torch.bmm(a_x.unsqueeze(1), _tokens(x)).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        x, a, total = ctx.saved_tensors
        b, c, h, w = x.shape
        with no_autocast(x):
            a_x = a.to(x.dtype)
            if not ctx.pool:  # dL/da_p = sum_c g_cp x_cp
                grad_a = (grad * x).sum(1, dtype=a.dtype).flatten(1)
            else:  # (B, 1, C) @ (B, C, N), the vector again on the left
                grad_a = torch.bmm(grad.unsqueeze(1), _tokens(x).transpose(1, 2)).squeeze(1)
            grad_m = _normalise_backward(grad_a.to(a.dtype), a, total, ctx.normalize, ctx.eps, ctx.scale)
            grad_m = (grad_m / c).to(x.dtype)
            # dL/dx = g * a + dL/dm / C, in one pass.
            if not ctx.pool:
                grad_x = torch.addcmul(grad_m.view(b, 1, h, w), grad, a_x.view(b, 1, h, w))
            elif _token_major(x):
                grad_x = torch.addcmul(grad_m[:, :, None], a_x[:, :, None], grad[:, None, :])
                grad_x = grad_x.view(b, h, w, c).permute(0, 3, 1, 2)
            else:
                grad_x = torch.addcmul(grad_m[:, None, :], grad[:, :, None], a_x[:, None, :]).view(b, c, h, w)
        return grad_x, None, None, None, None


class ParameterFreeSpatialAttention(ImplSwitch, nn.Module):
    """Parameter-free spatial attention: ``x * a`` with a the normalised channel-mean map.

    Args:
        channels: optional and unused (no weights): accepted so that channel-first factories,
            e.g. timm's ``attn_layer(channels, device=..., dtype=...)``, can build the layer.
        normalize: ``"sum"`` (default; the official ``m / sum(m)``) or ``"softmax"`` (the
            paper's softmax over positions; an all-zero map then gives the uniform 1 / (H*W)).
        eps: smallest magnitude of the ``"sum"`` denominator (> 0); unused by ``"softmax"``.
        preserve_scale: ``False`` (default, official): a sums to 1 over positions; ``True``: a
            times H*W (mean 1), so the output keeps the input's scale, for use on a backbone's
            main path (what :func:`~reid_attention.insert_attention` builds).
        impl: ``"fused"`` (default) or ``"reference"`` (the official per-sample normalisation);
            settable on a built module.
        device, dtype: torch's factory keywords, accepted and unused (the layer has no tensors).

    Methods: ``forward(x)`` -> ``x * a`` (B, C, H, W); ``attention(x)`` -> a (B, 1, H, W);
    ``pool(x)`` -> ``sum_p a_p x_p`` = ``forward(x).sum((2, 3))`` (B, C). Any input size works.
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        normalize: str = "sum",
        eps: float = 1e-12,
        preserve_scale: bool = False,
        impl: str = "fused",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if channels is not None:
            check_positive_int("channels", channels)
        if not isinstance(preserve_scale, bool):
            raise TypeError(f"preserve_scale must be a bool, got {type(preserve_scale).__name__}")
        if normalize not in NORMALIZATIONS:
            raise ArgumentError("normalize", normalize,
                                f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        if not eps > 0:
            raise ArgumentError("eps", eps, f"eps must be > 0, got {eps}")
        self.normalize = normalize
        self.eps = float(eps)
        self.preserve_scale = preserve_scale
        self.impl = impl

    def _scale(self, x: Tensor) -> float:
        """What the attention sums to over positions: H*W (preserve_scale) or 1."""
        return float(x.shape[2] * x.shape[3]) if self.preserve_scale else 1.0

    def _weights(self, x: Tensor) -> Tensor:
        """Attention a (B, H*W) in the compute dtype (autocast off)."""
        m = x.mean(1, dtype=compute_dtype(x)).flatten(1)
        args = (self.normalize, self.eps, self._scale(x))
        if self._impl == "fused":
            return _normalise(m, *args)
        # The official layer normalises one sample at a time: vmap maps that per-sample function
        # over the batch without a Python loop, so the batch stays symbolic under torch.export.
        return torch.vmap(_normalise, in_dims=(0, None, None, None))(m, *args)

    def attention(self, x: Tensor) -> Tensor:
        """The map a (B, 1, H, W) the layer multiplies by, in x's dtype; it sums to 1 over
        positions (official form) or to H*W, i.e. has mean 1 (``preserve_scale=True``)."""
        check_input(x, type(self).__name__)
        with no_autocast(x):
            return self._weights(x).view(x.shape[0], 1, *x.shape[2:]).to(x.dtype)

    def _run(self, x: Tensor, pool: bool) -> Tensor:
        check_input(x, type(self).__name__)
        with no_autocast(x):
            if self._impl == "fused":
                out: Tensor = _FusedPFSA.apply(x, self.normalize, self.eps, self._scale(x), pool)
                return out
            weighted = x * self._weights(x).view(x.shape[0], 1, *x.shape[2:]).to(x.dtype)
            return weighted.sum((2, 3)) if pool else weighted

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, pool=False)

    def pool(self, x: Tensor) -> Tensor:
        """Attention-weighted pooling ``sum_p a_p x_p`` (B, C) in x's dtype."""
        return self._run(x, pool=True)

    def extra_repr(self) -> str:
        return (
            f"normalize={self.normalize!r}, eps={self.eps}, preserve_scale={self.preserve_scale}, "
            f"impl={self._impl!r}"
        )
