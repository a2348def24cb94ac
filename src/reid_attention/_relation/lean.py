"""The fused path's memory-lean form (the layers' ``memory="lean"``).

:func:`lean_logits` is :func:`reid_attention._relation.fused.after_projections` under
``torch.utils.checkpoint``, keeping for backward only its input (the projection GEMM's output,
3d' x n per sample) and the logits, with :class:`LeanEmbedding` as its embedding step; the
recomputation in backward reuses the first run's small results and updates no running
statistics. :func:`lean_applies` says when the form may run (the layers' route asks it).

For a stack of G agents with theta_phi = [theta; phi] (2d' x n per sample) and the factors
a = [Ar^T; Ac^T] of :func:`reid_attention._relation.fused.factors` (2d' x n/s),

    E = a^T theta_phi (n/s x n),   Z = ReLU(BN(E)),   H = W1_E Z (k x n),

W1_E being the columns of the W network's first conv that act on E. E and Z are the largest
relation activations of a training step (n/s x n per sample: the size of the feature map at the
spatial axis after ResNet's layer1, twice it at the channel axis after layer4); autograd keeps
both, and their backward allocates two more of that size.

:class:`LeanEmbedding` computes H keeping theta_phi, the small a and a few statistics only, and
walks the batch in chunks of about :data:`CHUNK_ELEMENTS` values of E, so no E-sized tensor
exists beyond one chunk. E is low-rank (rank <= 2d'), which makes everything the norm needs a
product of small matrices. Per sample, with tc = theta_phi - its mean t over the n positions
and the covariance S = tc tc^T / n (2d' x 2d'):

* forward: E's per-channel mean a^T t and variance diag(a^T S a), so
  :func:`reid_attention._norm.batch_statistics` gives the norm's statistics (and updates its
  running statistics once, as the module would) before any E exists; then one pass over the
  chunks gives Z = ReLU((a D)^T tc + shift), D the norm's scale, and H.
* backward: one pass recomputes Z and gives g = ReLU'(Z) * (W1_E^T dH), dW1_E, the sums of g
  and P = tc g^T. BatchNorm's backward under batch statistics,
  dE = D (g - mean(g) - xhat mean(g xhat)), is g's own term plus a correction that is linear in
  E - mu = a^T tc + (a^T t - mu), so the corrections to d theta_phi = a dE and da = theta_phi dE^T
  are small GEMMs with S, a and tc, applied after the pass. Under running statistics
  dE = D g.

Each E chunk is computed twice (once each way), as autograd computes it once and keeps it. The
same function and gradients as the autograd form up to rounding order, for exact BatchNorms
(``one_kernel``) and a plain ReLU.

Without a gradient (eager inference) there is nothing to keep: :func:`inference_embedding` is
the forward's pass alone, so E is still never whole. That is faster, not only leaner, once E
outgrows the cache: the full form writes E to memory and reads it back twice (norm, ReLU, W1_E),
the chunks stay in cache (AMD EPYC, 2 threads, ResNet-50 + RGA-SC eval forward at batch 64:
0.94x-0.97x the full form's time; 128 MiB less at layer 1's spatial axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._norm import affine_parameters, batch_statistics, is_plain, one_kernel
from .._precision import compute_dtype, no_autocast
from .fused import (
    after_projections,
    batch_chunks,
    exporting,
    factors,
    factors_backward,
    projection_parts,
    recording,
    stacked_weights,
    tracing,
)
from .modules import RelationBranch

if TYPE_CHECKING:
    from torch.nn.modules.batchnorm import _BatchNorm
    from typing_extensions import TypeAlias

    # What LeanEmbedding's first run stashes: a, t, S a (None under running statistics), mu, sigma^2, H.
    _FirstRun: TypeAlias = tuple[Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor]

CHUNK_ELEMENTS = 1 << 20  # values of E per chunk (4 MiB in float32)


def _chunks(batch: int, per_sample: int) -> list[slice]:
    return batch_chunks(batch, per_sample, CHUNK_ELEMENTS)


def _centred(tp: Tensor, mean: Tensor, rows: slice) -> Tensor:
    """tc = theta_phi - its mean over the positions, for the samples ``rows``."""
    return tp[rows] - mean[rows]


def _activated(a_scaled: Tensor, shift: Tensor, tc: Tensor) -> Tensor:
    """Z = ReLU((a D)^T tc + shift) (b, G, n/s, n): the GEMM adds the per-sample shift."""
    b, groups, _, n_inner = a_scaled.shape
    z = torch.baddbmm(shift.flatten(0, 1), a_scaled.transpose(2, 3).flatten(0, 1), tc.flatten(0, 1))
    return z.view(b, groups, n_inner, -1).relu_()


def _means(a: Tensor, tp_mean: Tensor) -> Tensor:
    """E's per-sample channel means a^T t (B, G, n/s)."""
    return torch.matmul(tp_mean.transpose(2, 3), a).squeeze(2)


def _scaled(a: Tensor, means: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """a D and the per-sample shift (B, G, n/s, 1) of BN(E) = (a D)^T tc + shift."""
    return a * scale.transpose(1, 2), shift + scale * means.unsqueeze(-1)


def _product(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """x y z (batched), associated the cheaper way: E is low-rank, so an E-sized intermediate
    (n/s x n) or a 2d' x 2d' one, whichever is smaller."""
    rows, inner, mid, cols = x.shape[-2], x.shape[-1], y.shape[-1], z.shape[-1]
    if inner * cols * (rows + mid) <= rows * mid * (inner + cols):
        return torch.matmul(x, torch.matmul(y, z))
    return torch.matmul(torch.matmul(x, y), z)


def _first_run(
    theta_phi: Tensor, w_gg: Tensor, w1e: Tensor, weight: Tensor | None, bias: Tensor | None,
    norms: Sequence[_BatchNorm], batch_stats: bool,
) -> _FirstRun:
    """a, theta_phi's mean t, S a (under batch statistics), the norm's statistics (running
    statistics updated) and H, the last in chunks."""
    batch, groups, _, d_inner, n = theta_phi.shape
    n_inner = w_gg.shape[1]
    a = factors(theta_phi, w_gg)
    tp = theta_phi.reshape(batch, groups, 2 * d_inner, n)
    tp_mean = tp.mean(-1, keepdim=True)
    chunks = _chunks(batch, groups * n_inner * n)
    means = _means(a, tp_mean)
    cov_a = None
    if batch_stats:
        parts = []
        for rows in chunks:
            tc = _centred(tp, tp_mean, rows)
            parts.append(_product(tc, tc.transpose(2, 3), a[rows]))
        cov_a = torch.cat(parts) / n
        var = (a * cov_a).sum(2).clamp_min_(0)
        mu, sigma2 = batch_statistics(norms, means.flatten(1), var.flatten(1), n)
    else:
        mu, sigma2 = (s.to(tp.dtype) for s in batch_statistics(norms, None, None, n))
    _, scale, shift = _norm_coefficients(mu, sigma2, weight, bias, norms[0].eps, (groups, n_inner, 1))
    a_scaled, sample_shift = _scaled(a, means, scale, shift)
    out = tp.new_empty(batch, groups, w1e.shape[1], n)
    for rows in chunks:
        z = _activated(a_scaled[rows], sample_shift[rows], _centred(tp, tp_mean, rows))
        out[rows] = torch.matmul(w1e, z)
    return a, tp_mean, cov_a, mu, sigma2, out


def _norm_coefficients(
    mu: Tensor, sigma2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    """1 / sigma, and BN(y) = y * scale + shift, each as ``shape`` (copies, not views: they are
    saved for backward, where torch.compile refuses views)."""
    invstd = torch.rsqrt(sigma2 + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -mu * scale if bias is None else bias - mu * scale
    return invstd.reshape(shape).clone(), scale.reshape(shape).clone(), shift.reshape(shape).clone()


class LeanEmbedding(torch.autograd.Function):
    """H = W1_E ReLU(BN(a^T theta_phi)) with a = :func:`~reid_attention._relation.fused.factors`
    (see the module docstring).

    Inputs: theta_phi (B, G, 2, d', n), w_gg (G, n/s, 2n), w1e (G, k, n/s), the norms'
    concatenated weight and bias (G*n/s,) or None, the norm modules (one per agent), and
    ``stash``, a list. Empty, the first run fills it with a, theta_phi's per-sample mean t, S a
    (None under running statistics), the norm's statistics (the running statistics are updated)
    and H; holding them, the call is a recomputation for backward (``torch.utils.checkpoint``)
    and returns them, recomputing nothing E-sized and updating no statistics. They are small:
    2d' x (2 n/s + 1) and k x n per sample. Output H (B, G, k, n).
    """

    @staticmethod
    def forward(
        ctx: Any, theta_phi: Tensor, w_gg: Tensor, w1e: Tensor, weight: Tensor | None, bias: Tensor | None,
        norms: Sequence[_BatchNorm], stash: list[Tensor | None],
    ) -> Tensor:
        first = norms[0]
        ctx.batch_statistics = _batch_statistics(norms)
        ctx.affine = (weight is not None, bias is not None)
        if stash:  # a recomputation: the first run's results (a copy of H, which becomes an output)
            a, tp_mean, cov_a, mu, sigma2, out = cast("_FirstRun", tuple(stash))
            out = out.clone()
        else:
            a, tp_mean, cov_a, mu, sigma2, out = _first_run(
                theta_phi, w_gg, w1e, weight, bias, norms, ctx.batch_statistics)
            # copies: the stash outlives this call, and torch.compile refuses aliases of it
            stash.extend(None if t is None else t.clone() for t in (a, tp_mean, cov_a, mu, sigma2, out))
        shape = (w_gg.shape[0], w_gg.shape[1], 1)
        invstd, scale, shift = _norm_coefficients(mu, sigma2, weight, bias, first.eps, shape)
        mu = mu.reshape(shape).clone()
        ctx.save_for_backward(theta_phi, a, tp_mean, cov_a, w_gg, w1e, mu, invstd, scale, shift)
        return out

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        theta_phi, a, tp_mean, cov_a, w_gg, w1e, mu, invstd, scale, shift = ctx.saved_tensors
        batch, groups, _, d_inner, n = theta_phi.shape
        n_inner = w_gg.shape[1]
        tp = theta_phi.reshape(batch, groups, 2 * d_inner, n)
        means = _means(a, tp_mean)
        a_scaled, sample_shift = _scaled(a, means, scale, shift)
        w1e_t = w1e.transpose(1, 2)
        chunks = _chunks(batch, groups * n_inner * n)
        grad_w1e = torch.zeros_like(w1e)
        sum_g = means.new_empty(means.shape)  # per sample
        grad_tp, proj = torch.empty_like(tp), torch.empty_like(a)  # proj: P = tc g^T
        for rows in chunks:
            tc = _centred(tp, tp_mean, rows)
            z = _activated(a_scaled[rows], sample_shift[rows], tc)
            grad_w1e.add_(torch.matmul(grad_h[rows], z.transpose(2, 3)).sum(0))
            # ReLU's own backward kernel (g where z > 0, else 0), written over z
            g = torch.ops.aten.threshold_backward.grad_input(
                torch.matmul(w1e_t, grad_h[rows]), z, 0, grad_input=z)
            del z
            sum_g[rows] = g.sum(-1)
            grad_tp[rows] = torch.matmul(a_scaled[rows], g)
            proj[rows] = torch.matmul(tc, g.transpose(2, 3))
            del g, tc  # one chunk's tensors alive at a time
        offset = means - mu.view(groups, n_inner)  # E - mu = a^T tc + offset
        sum_gx = ((a * proj).sum(2) + offset * sum_g).sum(0)  # sum of g * (E - mu), (G, n/s)
        total_g = sum_g.sum(0)
        scale_row = scale.view(groups, 1, n_inner)
        grad_a = proj.add_(tp_mean * sum_g.unsqueeze(2)).mul_(scale_row)  # theta_phi g^T D
        if ctx.batch_statistics:
            count = batch * n
            coefficient = scale_row * invstd.view(groups, 1, n_inner) ** 2 * sum_gx.unsqueeze(1) / count
            rank_one = scale_row * total_g.unsqueeze(1) / count + coefficient * offset.unsqueeze(2)
            a_c = a * coefficient
            # dE - D g = -(rank_one 1^T + coefficient * (a^T tc)), per sample and channel
            grad_a.sub_(cov_a.mul(coefficient).add_(tp_mean * rank_one).mul_(n))  # S (a C) = (S a) C
            bias_tp = torch.matmul(a, rank_one.transpose(2, 3))
            for rows in chunks:
                tc = _centred(tp, tp_mean, rows)
                grad_tp[rows] -= _product(a_c[rows], a[rows].transpose(2, 3), tc).add_(bias_tp[rows])
        grad_theta_phi = grad_tp.view_as(theta_phi)
        grad_w_gg = factors_backward(theta_phi, w_gg, grad_a, grad_theta_phi)  # the path through a
        has_weight, has_bias = ctx.affine
        grad_weight = (invstd.view(groups, n_inner) * sum_gx).flatten() if has_weight else None
        grad_bias = total_g.flatten() if has_bias else None
        return grad_theta_phi, grad_w_gg, grad_w1e, grad_weight, grad_bias, None, None


def _embedding_inputs(
    theta_phi: Tensor, branches: Sequence[RelationBranch]
) -> tuple[list[_BatchNorm], Tensor, Tensor | None, Tensor | None]:
    """The embedding's norms (exact BatchNorms: :func:`lean_applies`), its stacked weights
    (G, n/s, 2n) and the norms' concatenated weight and bias."""
    norms = cast("list[_BatchNorm]", [b.gg[1] for b in branches])
    w_gg = stacked_weights([b.gg[0] for b in branches], theta_phi.dtype)
    return (norms, w_gg, *affine_parameters(norms, theta_phi.dtype))


def _batch_statistics(norms: Sequence[_BatchNorm]) -> bool:
    """Whether the norms normalise with batch statistics (else with their running ones)."""
    return norms[0].training or norms[0].running_mean is None


def lean_embedding(
    theta_phi: Tensor, branches: Sequence[RelationBranch], w1e: Tensor, stash: list[Tensor | None]
) -> Tensor:
    """W1_E E (B, G, k, n) by :class:`LeanEmbedding`: the embedding step of
    :func:`~reid_attention._relation.fused.after_projections` on the lean form."""
    norms, w_gg, weight, bias = _embedding_inputs(theta_phi, branches)
    out: Tensor = LeanEmbedding.apply(theta_phi, w_gg, w1e, weight, bias, norms, stash)
    return out


def inference_embedding(theta_phi: Tensor, branches: Sequence[RelationBranch], w1e: Tensor) -> Tensor:
    """W1_E E (B, G, k, n) without a gradient: :class:`LeanEmbedding`'s first run alone (E in
    chunks, the running statistics updated once in train mode), nothing kept."""
    norms, w_gg, weight, bias = _embedding_inputs(theta_phi, branches)
    return _first_run(theta_phi, w_gg, w1e, weight, bias, norms, _batch_statistics(norms))[-1]


def recomputable(branches: Sequence[RelationBranch]) -> bool:
    """Whether everything after the projection GEMM may be recomputed: each norm group (as the
    fused path's steps pass them) takes the one-kernel route, and every activation is a plain
    ReLU (a module called again would run twice: hooks, SyncBatchNorm's communication)."""
    parts = projection_parts(branches)
    groups = ([p.norm for p in parts], [b.gg[1] for b in branches], [b.W[1] for b in branches],
              [b.W[4] for b in branches])
    acts = [p.act for p in parts] + [a for b in branches for a in (b.gg[2], b.W[2])]
    return all(one_kernel(group) for group in groups) and all(is_plain(a, nn.ReLU) for a in acts)


def lean_applies(branches: Sequence[RelationBranch], batch: int) -> bool:
    """Whether the lean form may run for ``batch`` samples: the batch is not empty,
    :func:`recomputable` holds, the call is not being exported or traced, and a gradient is
    recorded or the call runs eagerly. A recorded inference program (exported, traced, or
    compiled without a gradient) takes the full form, whose GEMMs take any batch, where the
    chunk loop would fix it."""
    if exporting() or tracing() or batch == 0 or not recomputable(branches):
        return False
    return torch.is_grad_enabled() or not recording()  # a compiled training step keeps the lean form


def lean_logits(proj: Tensor, branches: Sequence[RelationBranch]) -> Tensor:
    """:func:`~reid_attention._relation.fused.fused_logits` keeping only its input, the
    projection (B, G, 3d', n) before its norms, and the logits: every other activation is
    recomputed in backward. Needs :func:`lean_applies`.

    The first run fills ``stash`` (see :class:`LeanEmbedding`); the recomputation reuses the
    embedding's statistics and updates no running statistics, so BatchNorm statistics are
    counted once, and it normalises with the same batch statistics (the same input gives the
    same values). Without a gradient nothing is kept or recomputed: the embedding is
    :func:`inference_embedding`.
    """
    with no_autocast(proj):
        dtype = compute_dtype(proj)
        if not torch.is_grad_enabled():
            return after_projections(proj, branches, dtype, inference_embedding)
        stash: list[Tensor | None] = []

        def embedding_step(theta_phi: Tensor, branches: Sequence[RelationBranch], w1e: Tensor) -> Tensor:
            return lean_embedding(theta_phi, branches, w1e, stash)

        def run(p: Tensor) -> Tensor:  # a recomputation once the stash holds the first run's results
            return after_projections(p, branches, dtype, embedding_step, update_statistics=not stash)

        return checkpoint(run, proj, use_reentrant=False, preserve_rng_state=False)
