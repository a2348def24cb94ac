"""The fused path of the relation core: the reference's function without the n x n relation.

Step numbers refer to the equation in :mod:`reid_attention.rga`. The path runs for a stack of G
agents at once (APNet-S's stripes; G = 1 for RGA), tokens (B, G, d, n), in named steps:

* :func:`projections` (steps 1 and 4 before their norms): theta, phi and g of every agent as
  one GEMM over the input, the 1x1 weights stacked (:func:`projection_weight`);
  :func:`activated_projections` applies their norms and activations.
* :func:`relation_embedding` (steps 2-3): the embedding is linear in R before its norm. Split
  its weight (n/s x 2n) into the half acting on a token's row of R and the half acting on its
  column, [Wr | Wc]. Then Wr R(i, :)^T = (Wr phi^T) theta_i and Wc R(:, i) = (Wc theta^T) phi_i,
  so with Ar = Wr phi^T and Ac = Wc theta^T (n/s x d')

      E_pre = Ar theta + Ac phi = a^T [theta; phi],   a = [Ar^T; Ac^T] (2d' x n/s)

  (:func:`factors`): two thin GEMMs instead of an n x n product and a 2n-channel conv. Exact:
  the same sums in another order, so the norm's input, and its batch statistics, are the same.
  In training :class:`Factors` keeps theta_phi, not its copy folded into the GEMM's rows.
* :func:`w_network` (step 5) after W's first conv, which :func:`after_projections` applies to
  g and E separately, so that y = [g, E] is never formed.
* RGA-SC's training route: :class:`GatedChannelProjection` (the channel axis's step 1 on the
  spatially gated map y1 = x * s1) and :class:`DoubleGate` (step 6 of both axes) keep x and the
  gates for backward instead of y1 and recompute y1 where backward needs it.

The memory-lean form of this path (:mod:`reid_attention._relation.lean`) replaces the embedding
step of :func:`after_projections` and recomputes everything after the projection GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._norm import norm_channels
from .._precision import compute_dtype, no_autocast
from .modules import CBRParts, RelationBranch, WParts, activate, conv_weight

# (theta_phi, branches, w1e) -> W1_E E (B, G, k, n): the embedding step of after_projections
EmbeddingStep = Callable[[Tensor, Sequence[RelationBranch], Tensor], Tensor]
# values of a map per chunk where a projection conv walks the batch (GatedChannelProjection's backward,
# conv_1x1 in inference; 16 MiB in float32): at ResNet-50's layer 1 (256 x 64 x 32) 8 samples, large
# enough for the conv library's full speed, small enough for its transients to stay in cache
CONV_CHUNK_ELEMENTS = 1 << 22


def stacked_weights(convs: Sequence[nn.Module], dtype: torch.dtype) -> Tensor:
    """Stack 1x1 conv weights (O, I, 1, 1) of one shape into (G, O, I) (a view for one conv)."""
    weights = [conv_weight(c).flatten(1) for c in convs]
    stacked = weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)
    return stacked.to(dtype)


def batch_chunks(batch: int, per_sample: int, elements: int) -> list[slice]:
    """Slices of the batch of about ``elements`` values each (at least one sample), for tensors of
    ``per_sample`` values per sample."""
    step = max(1, elements // max(1, per_sample))
    return [slice(i, i + step) for i in range(0, batch, step)]


# ------------------------------------------------------------------------------ steps 1 and 4


def conv_1x1(tokens: Tensor, weight: Tensor) -> Tensor:
    """A 1x1 projection of tokens (B, d, n) by weight (O, d) -> (B, O, n), as a 1x1 conv over the
    view (B, d, 1, n), in the tokens' layout: feature-major tokens (n contiguous) are an NCHW map,
    token-major ones (d contiguous: the channel axis of an NCHW map, the spatial axis of a
    channels_last one) a channels_last map, so no layout copies the input.

    A convolution, not a ``linear``: the same sums, and on CPU the convolution library (oneDNN)
    runs the forward and the backward at the speed of the backbone's own convs, where the BLAS
    behind ``linear`` may not (AMD EPYC: a training step's projection 2x slower as a ``linear``;
    ``benchmarks/projection_gemm.py``).

    Exported (``torch.export`` and ONNX, from torch 2.6), a ``matmul``: a deployment runtime's
    convolution takes NCHW maps only, so a token-major input would first be transposed whole
    (ONNX Runtime, ResNet-50 layer 1's channel axis at batch 64: a 37 ms Transpose), where a
    MatMul reads either layout.

    Without a gradient on the CPU, outside a :func:`recording`, feature-major tokens of more than
    :data:`CONV_CHUNK_ELEMENTS` values are projected in batch chunks of that size: oneDNN's NCHW
    1x1 conv slows down 1.5-3x once its input outgrows the cache (AMD EPYC, batch 64: ResNet-50
    layer 1's spatial projection 83 -> 39 ms, layer 2's 50 -> 17 ms).
    """
    if exporting():
        return torch.matmul(weight, tokens)
    w = weight[:, :, None, None]
    if (tokens.is_cpu and tokens.is_contiguous() and not torch.is_grad_enabled()
            and tokens.numel() > CONV_CHUNK_ELEMENTS and not recording()):
        chunks = batch_chunks(tokens.shape[0], tokens[0].numel(), CONV_CHUNK_ELEMENTS)
        first = F.conv2d(tokens[chunks[0]].unsqueeze(2), w)  # its dtype is autocast's
        out = first.new_empty((tokens.shape[0], *first.shape[1:]))
        out[chunks[0]] = first
        for rows in chunks[1:]:
            out[rows] = F.conv2d(tokens[rows].unsqueeze(2), w)
        return out.squeeze(2)
    return F.conv2d(tokens.unsqueeze(2), w).squeeze(2)


def exporting() -> bool:
    """Whether torch.export is recording the call (also under the ONNX exporter, which runs it);
    ``torch.compiler.is_exporting`` is new in torch 2.6."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and bool(is_exporting())


def tracing() -> bool:
    """Whether ``torch.jit.trace`` (also the TorchScript ONNX exporter) is recording the call."""
    return bool(torch.jit.is_tracing())  # type: ignore[attr-defined,no-untyped-call]  # unannotated in torch


def recording() -> bool:
    """Whether the call is being recorded into a program (:func:`exporting`, :func:`tracing`,
    torch.compile), which may run at another batch size: a loop over batch chunks would be
    recorded with this call's batch, so recorded programs take the whole-batch form."""
    return exporting() or tracing() or torch.compiler.is_compiling()


def _project(weight: Tensor, tokens: Tensor) -> Tensor:
    """1x1 projections of stacked agents: weight (G, O, d) x tokens (B, G, d, n) -> (B, G, O, n).

    The weight gradient is always one GEMM over the whole batch: a broadcast ``matmul`` would
    materialise it per sample (B x O x d) before reducing. One agent: :func:`conv_1x1`, which
    copies no input. Several agents (APNet-S stripes): the (batch, agent)
    pairs of a stripe view share no single stride, so the tokens are gathered once into
    (G, d, B*n) and one GEMM per agent, batched over agents, covers the whole batch; the result
    is a permuted view.
    """
    batch, groups, d, n = tokens.shape
    if groups > 1:
        out = torch.bmm(weight, tokens.permute(1, 2, 0, 3).reshape(groups, d, batch * n))
        return out.view(groups, weight.shape[1], batch, n).permute(2, 0, 1, 3)
    return conv_1x1(tokens.squeeze(1), weight.squeeze(0)).unsqueeze(1)  # squeeze: a select is a copy in ONNX


def projection_parts(branches: Sequence[RelationBranch]) -> list[CBRParts]:
    """theta, phi and g of every agent, in the order of the projection GEMM's output channels."""
    return [p for b in branches for p in (CBRParts(*b.theta), CBRParts(*b.phi), CBRParts(*b.gx))]


def projection_weight(branches: Sequence[RelationBranch]) -> Tensor:
    """The 1x1 weights of theta, phi and g of every agent stacked: (G, 3d', d)."""
    parts = projection_parts(branches)
    stacked = torch.cat([p.conv.weight for p in parts]).flatten(1)
    return stacked.view(len(branches), -1, parts[0].conv.in_channels)


def projections(tokens: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """theta, phi and g of every agent before their norms: one batched GEMM over the input
    (autocast applies). tokens (B, G, d, n) -> (B, G, 3d', n)."""
    return _project(projection_weight(branches).to(tokens.dtype), tokens)


def activated_projections(
    proj: Tensor, branches: Sequence[RelationBranch], dtype: torch.dtype, update_statistics: bool = True
) -> tuple[Tensor, Tensor]:
    """The projections' norms and activations, in ``dtype``: theta_phi (B, G, 2, d', n) and the
    channel mean of g (B, G, 1, n)."""
    batch, groups, width, n = proj.shape
    parts = projection_parts(branches)
    flat = norm_channels(proj.to(dtype).reshape(batch, groups * width, n), [p.norm for p in parts],
                         update_statistics=update_statistics)
    proj = activate(flat, [p.act for p in parts]).view(batch, groups, 3, width // 3, n)
    theta_phi, g = proj.split([2, 1], 2)  # split, not slices: its backward allocates one map
    return theta_phi, g.mean(3)


# ------------------------------------------------------------------------------ steps 2-3


def folded_rows(theta_phi: Tensor) -> Tensor:
    """(B, G, 2, d', n) -> (2G, B*d', n): per agent phi then theta, the batch folded into rows."""
    batch, groups, _, d_inner, n = theta_phi.shape
    return theta_phi.permute(1, 2, 0, 3, 4).flip(1).reshape(groups * 2, batch * d_inner, n)


def weight_halves(w_gg: Tensor) -> Tensor:
    """Embedding weights (G, n/s, 2n) -> their halves [Wr^T, Wc^T] per agent, (2G, n, n/s)."""
    groups, n_inner, width = w_gg.shape
    halves = w_gg.view(groups, n_inner, 2, width // 2).permute(0, 2, 3, 1)
    return halves.reshape(groups * 2, width // 2, n_inner)


def factors(theta_phi: Tensor, w_gg: Tensor) -> Tensor:
    """a = [Ar^T; Ac^T] = [phi Wr^T; theta Wc^T] (B, G, 2d', n/s): one GEMM per (agent, half)
    with the batch folded into the rows, so the weights are never expanded over the batch.

    Where a gradient is recorded it runs as :class:`Factors`, which keeps theta_phi for backward
    (held anyway, by its activation) instead of its folded copy (2d' x n per sample)."""
    if torch.is_grad_enabled() and (theta_phi.requires_grad or w_gg.requires_grad):
        return cast(Tensor, Factors.apply(theta_phi, w_gg))
    return _factor_gemm(theta_phi, w_gg)


def _factor_gemm(theta_phi: Tensor, w_gg: Tensor) -> Tensor:
    batch, groups, _, d_inner, _ = theta_phi.shape
    a = torch.bmm(folded_rows(theta_phi), weight_halves(w_gg)).view(groups, 2, batch, d_inner, w_gg.shape[1])
    return a.permute(2, 0, 1, 3, 4).reshape(batch, groups, 2 * d_inner, w_gg.shape[1])


def factors_backward(theta_phi: Tensor, w_gg: Tensor, grad_a: Tensor, grad_theta_phi: Tensor) -> Tensor:
    """The backward of :func:`factors` for a's gradient (B, G, 2d', n/s): adds theta_phi's share
    into ``grad_theta_phi`` (B, G, 2, d', n) and returns w_gg's gradient. theta_phi is folded
    into rows again here, a transient copy."""
    batch, groups, _, d_inner, n = theta_phi.shape
    n_inner = w_gg.shape[1]
    grad_a = grad_a.reshape(batch, groups, 2, d_inner, n_inner).permute(1, 2, 0, 3, 4)
    grad_a = grad_a.reshape(groups * 2, batch * d_inner, n_inner)
    grad_rows = torch.bmm(grad_a, weight_halves(w_gg).transpose(1, 2)).view(groups, 2, batch, d_inner, n)
    for source, target in ((0, 1), (1, 0)):  # the rows hold phi, then theta
        grad_theta_phi[:, :, target].add_(grad_rows[:, source].transpose(0, 1))
    del grad_rows
    grad_w_gg = torch.bmm(folded_rows(theta_phi).transpose(1, 2), grad_a)
    return grad_w_gg.view(groups, 2, n, n_inner).permute(0, 3, 1, 2).reshape_as(w_gg)


class Factors(torch.autograd.Function):
    """:func:`factors` keeping theta_phi and w_gg for backward (:func:`factors_backward`)."""

    @staticmethod
    def forward(ctx: Any, theta_phi: Tensor, w_gg: Tensor) -> Tensor:
        ctx.save_for_backward(theta_phi, w_gg)
        return _factor_gemm(theta_phi, w_gg)

    @staticmethod
    def backward(ctx: Any, grad_a: Tensor) -> tuple[Tensor, Tensor]:
        theta_phi, w_gg = ctx.saved_tensors
        grad_theta_phi = torch.zeros(theta_phi.shape, dtype=theta_phi.dtype, device=theta_phi.device)
        return grad_theta_phi, factors_backward(theta_phi, w_gg, grad_a, grad_theta_phi)


def relation_embedding(theta_phi: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """The embedded relation vectors E (B, G, n/s, n) without the n x n relation:
    E_pre = a^T [theta; phi] (a = :func:`factors`) as one batched GEMM, the norm, the activation.
    """
    batch, groups, _, d_inner, n = theta_phi.shape
    gg = [CBRParts(*b.gg) for b in branches]
    w_gg = stacked_weights([p.conv for p in gg], theta_phi.dtype)  # (G, n/s, 2n)
    a = factors(theta_phi, w_gg)
    emb = torch.matmul(a.transpose(2, 3), theta_phi.reshape(batch, groups, 2 * d_inner, n))
    emb = norm_channels(emb.view(batch, groups * w_gg.shape[1], n), [p.norm for p in gg])
    return activate(emb, [p.act for p in gg]).view(batch, groups, w_gg.shape[1], n)


def embedding_hidden(theta_phi: Tensor, branches: Sequence[RelationBranch], w1e: Tensor) -> Tensor:
    """W1_E E (B, G, k, n), W1_E the columns of W's first conv that act on E: the default
    embedding step of :func:`after_projections`."""
    return torch.matmul(w1e, relation_embedding(theta_phi, branches))


# ------------------------------------------------------------------------------ step 5


def w_network(hidden: Tensor, branches: Sequence[RelationBranch], update_statistics: bool = True) -> Tensor:
    """W after its first conv: hidden (B, G, k, n), the conv's output on y = [g, E] (never
    formed), -> logits (B, G, n)."""
    batch, groups, k, n = hidden.shape
    w = [WParts(*b.W) for b in branches]
    hidden = norm_channels(hidden.view(batch, groups * k, n), [p.norm1 for p in w],
                           update_statistics=update_statistics)
    hidden = activate(hidden, [p.act for p in w]).view(batch, groups, k, n)
    logits = torch.matmul(stacked_weights([p.conv2 for p in w], hidden.dtype), hidden)
    return norm_channels(logits.view(batch, groups, n), [p.norm2 for p in w],
                         update_statistics=update_statistics)


def after_projections(
    proj: Tensor,
    branches: Sequence[RelationBranch],
    dtype: torch.dtype,
    embedding_step: EmbeddingStep = embedding_hidden,
    update_statistics: bool = True,
) -> Tensor:
    """Everything after the projection GEMM, in ``dtype``: its norms, steps 2-3 (by
    ``embedding_step``) and step 5, W's first conv applied to g and E separately."""
    theta_phi, g = activated_projections(proj, branches, dtype, update_statistics)
    w1 = stacked_weights([WParts(*b.W).conv1 for b in branches], dtype)  # (G, k, 1 + n/s)
    hidden = embedding_step(theta_phi, branches, w1[:, :, 1:]) + w1[:, :, :1] * g
    return w_network(hidden, branches, update_statistics)


def fused_logits(proj: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """The logits (B, G, n) from the projections before their norms (:func:`projections`),
    outside autocast (float32 for half inputs)."""
    with no_autocast(proj):
        return after_projections(proj, branches, compute_dtype(proj))


# ------------------------------------------------------------------------------ RGA-SC in training


class GatedChannelProjection(torch.autograd.Function):
    """RGA-SC's channel-axis projection of y1 = x * s1 (s1 the spatial gate, (B, 1, H, W)),
    keeping x and s1 for backward instead of y1 (a full map): y1 is recomputed there.

    Token c is channel c of y1 (H*W features), so the projection is y1 (B, C, H*W) @ weight^T
    -> (B, 3d', C), a :func:`conv_1x1` of the tokens, returned as :func:`projections` does,
    (B, 1, 3d', C); the GEMM runs in ``dtype`` (autocast's, as on the plain path). y1 is
    returned too, without a gradient, for :class:`DoubleGate` to reuse.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s1: Tensor, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, s1, weight)
        ctx.dtype = dtype
        ctx.set_materialize_grads(False)  # y1 gets no gradient: no map of zeros for it
        y1 = x * s1
        ctx.mark_non_differentiable(y1)
        proj = conv_1x1(y1.flatten(2).transpose(1, 2).to(dtype), weight.to(dtype))
        return proj.unsqueeze(1), y1

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: object) -> tuple[Tensor | None, ...]:
        if grad is None:  # the projection is unused
            return None, None, None, None
        x, s1, weight = ctx.saved_tensors
        # the forward conv_1x1's backward, in batch chunks: y1 is recomputed per chunk and the conv
        # library's transients (it reorders its operands) stay chunk-sized, so backward holds no
        # map beyond the input gradient
        grad = grad.squeeze(1).unsqueeze(2).to(ctx.dtype)  # (B, 3d', 1, C)
        w = weight.to(ctx.dtype)[:, :, None, None]
        # the weight gradient summed over the chunks in the weight's own dtype
        grad_weight = torch.zeros_like(weight).view_as(w)
        grad_x, grad_s1 = torch.empty_like(x), torch.empty_like(s1)
        for rows in batch_chunks(x.shape[0], x.numel() // max(1, x.shape[0]), CONV_CHUNK_ELEMENTS):
            y1 = (x[rows] * s1[rows]).flatten(2).to(ctx.dtype).transpose(1, 2).unsqueeze(2)  # conv input
            # the gradient laid out as the conv's output was (small: 3d' x C per sample)
            layout = torch.channels_last if y1.is_contiguous(memory_format=torch.channels_last) else None
            g = grad[rows].contiguous(memory_format=layout or torch.contiguous_format)
            # both gradients in one call: the library reorders the operands once (AMD EPYC, layer 1,
            # batch 8: 31 ms, against 45 ms for conv2d_weight and conv2d_input one after the other)
            grad_y1, grad_w = torch.ops.aten.convolution_backward(
                g, y1, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])[:2]
            del y1
            grad_weight += grad_w
            grad_y1 = grad_y1.squeeze(2).transpose(1, 2).reshape(x[rows].shape).to(x.dtype)
            grad_s1[rows] = (grad_y1 * x[rows]).sum(1, keepdim=True)
            torch.mul(grad_y1, s1[rows], out=grad_x[rows])  # written in place: no copy of a map
        return grad_x, grad_s1, grad_weight.view_as(weight), None


class DoubleGate(torch.autograd.Function):
    """RGA-SC's output y1 * s2 with y1 = x * s1 (gates (B, 1, H, W) and (B, C, 1, 1)), keeping x
    and the two gates for backward instead of y1. Backward needs no y1: with u = grad * x,
    grad_s2 = sum_hw u * s1 and grad_s1 = sum_c u * s2, each one batched matrix-vector product."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, s1: Tensor, s2: Tensor, y1: Tensor) -> Tensor:
        ctx.save_for_backward(x, s1, s2)
        return y1 * s2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, s1, s2 = ctx.saved_tensors
        b, c, h, w = x.shape
        u = (grad * x).flatten(2)  # (B, C, HW)
        grad_s2 = torch.bmm(u, s1.reshape(b, h * w, 1)).view_as(s2)
        grad_s1 = torch.bmm(s2.reshape(b, 1, c), u).view_as(s1)
        del u
        return (grad * s2).mul_(s1), grad_s1, grad_s2, None
