"""The fused relation embedding's factors, and its memory-lean form as one autograd Function.

For a stack of G agents (see :mod:`reid_attention._relation`) with theta_phi = [theta; phi]
(2d' x n per sample) and the embedding weight split into its row and column halves [Wr | Wc],
the factors a = [Ar^T; Ac^T] = [phi Wr^T; theta Wc^T] (2d' x n/s, :func:`factors`) give

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
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._norm import batch_statistics

CHUNK_ELEMENTS = 1 << 20  # values of E per chunk (4 MiB in float32)


def _rows(theta_phi: Tensor) -> Tensor:
    """(B, G, 2, d', n) -> (2G, B*d', n): per agent phi then theta, the batch folded into rows."""
    batch, groups, _, d_inner, n = theta_phi.shape
    return theta_phi.permute(1, 2, 0, 3, 4)[:, [1, 0]].reshape(groups * 2, batch * d_inner, n)


def _halves(w_gg: Tensor) -> Tensor:
    """Embedding weights (G, n/s, 2n) -> their halves [Wr^T, Wc^T] per agent, (2G, n, n/s)."""
    groups, n_inner, width = w_gg.shape
    return w_gg.view(groups, n_inner, 2, width // 2).permute(0, 2, 3, 1).reshape(groups * 2, width // 2, n_inner)


def factors(theta_phi: Tensor, w_gg: Tensor) -> Tensor:
    """a = [Ar^T; Ac^T] (B, G, 2d', n/s): one GEMM per (agent, half) with the batch folded
    into the rows, so the weights are never expanded over the batch."""
    batch, groups, _, d_inner, _ = theta_phi.shape
    a = torch.bmm(_rows(theta_phi), _halves(w_gg)).view(groups, 2, batch, d_inner, w_gg.shape[1])
    return a.permute(2, 0, 1, 3, 4).reshape(batch, groups, 2 * d_inner, w_gg.shape[1])


def _chunks(batch: int, per_sample: int) -> List[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    return [slice(i, i + step) for i in range(0, batch, step)]


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


def _scaled(a: Tensor, means: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """a D and the per-sample shift (B, G, n/s, 1) of BN(E) = (a D)^T tc + shift."""
    return a * scale.transpose(1, 2), shift + scale * means.unsqueeze(-1)


def _product(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """x y z (batched), associated the cheaper way: E is low-rank, so an E-sized intermediate
    (n/s x n) or a 2d' x 2d' one, whichever is smaller."""
    rows, inner, mid, cols = x.shape[-2], x.shape[-1], y.shape[-1], z.shape[-1]
    if inner * cols * (rows + mid) <= rows * mid * (inner + cols):
        return torch.matmul(x, torch.matmul(y, z))
    return torch.matmul(torch.matmul(x, y), z)


def _first_run(theta_phi: Tensor, w_gg: Tensor, w1e: Tensor, weight, bias, norms, batch_stats: bool):
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
    _, scale, shift = _affine(mu, sigma2, weight, bias, norms[0].eps, (groups, n_inner, 1))
    a_scaled, sample_shift = _scaled(a, means, scale, shift)
    out = tp.new_empty(batch, groups, w1e.shape[1], n)
    for rows in chunks:
        out[rows] = torch.matmul(w1e, _activated(a_scaled[rows], sample_shift[rows], _centred(tp, tp_mean, rows)))
    return a, tp_mean, cov_a, mu, sigma2, out


def _affine(mu: Tensor, sigma2: Tensor, weight, bias, eps: float, shape) -> Tuple[Tensor, Tensor, Tensor]:
    """1 / sigma, and BN(y) = y * scale + shift, each as ``shape`` (copies, not views: they are
    saved for backward, where torch.compile refuses views)."""
    invstd = torch.rsqrt(sigma2 + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -mu * scale if bias is None else bias - mu * scale
    return tuple(t.reshape(shape).clone() for t in (invstd, scale, shift))


class LeanEmbedding(torch.autograd.Function):
    """H = W1_E ReLU(BN(a^T theta_phi)) with a = :func:`factors` (see the module docstring).

    Inputs: theta_phi (B, G, 2, d', n), w_gg (G, n/s, 2n), w1e (G, k, n/s), the norms'
    concatenated weight and bias (G*n/s,) or None, the norm modules (one per agent), and
    ``stash``, a list. Empty, the first run fills it with a, theta_phi's per-sample mean t, S a
    (None under running statistics), the norm's statistics (the running statistics are updated)
    and H; holding them, the call is a recomputation for backward (``torch.utils.checkpoint``)
    and returns them, recomputing nothing E-sized and updating no statistics. They are small:
    2d' x (2 n/s + 1) and k x n per sample. Output H (B, G, k, n).
    """

    @staticmethod
    def forward(ctx, theta_phi, w_gg, w1e, weight, bias, norms: Sequence[nn.Module], stash: list):
        first = norms[0]
        ctx.batch_statistics = first.training or first.running_mean is None
        ctx.affine = (weight is not None, bias is not None)
        if stash:  # a recomputation: the first run's results (a copy of H, which becomes an output)
            a, tp_mean, cov_a, mu, sigma2, out = stash
            out = out.clone()
        else:
            a, tp_mean, cov_a, mu, sigma2, out = _first_run(
                theta_phi, w_gg, w1e, weight, bias, norms, ctx.batch_statistics)
            # copies: the stash outlives this call, and torch.compile refuses aliases of it
            stash.extend(None if t is None else t.clone() for t in (a, tp_mean, cov_a, mu, sigma2, out))
        shape = (w_gg.shape[0], w_gg.shape[1], 1)
        invstd, scale, shift = _affine(mu, sigma2, weight, bias, first.eps, shape)
        ctx.save_for_backward(theta_phi, a, tp_mean, cov_a, w_gg, w1e, mu.reshape(shape).clone(), invstd, scale, shift)
        return out

    @staticmethod
    def backward(ctx, grad_h: Tensor):
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
        # the path through a = factors(theta_phi, w_gg)
        grad_a = grad_a.view(batch, groups, 2, d_inner, n_inner).permute(1, 2, 0, 3, 4)
        grad_a = grad_a.reshape(groups * 2, batch * d_inner, n_inner)
        grad_rows = torch.bmm(grad_a, _halves(w_gg).transpose(1, 2)).view(groups, 2, batch, d_inner, n)
        grad_theta_phi = grad_tp.view_as(theta_phi)
        for source, target in ((0, 1), (1, 0)):  # the rows hold phi, then theta
            grad_theta_phi[:, :, target].add_(grad_rows[:, source].transpose(0, 1))
        del grad_rows
        grad_w_gg = torch.bmm(_rows(theta_phi).transpose(1, 2), grad_a)
        grad_w_gg = grad_w_gg.view(groups, 2, n, n_inner).permute(0, 3, 1, 2).reshape_as(w_gg)
        has_weight, has_bias = ctx.affine
        grad_weight = (invstd.view(groups, n_inner) * sum_gx).flatten() if has_weight else None
        grad_bias = total_g.flatten() if has_bias else None
        return grad_theta_phi, grad_w_gg, grad_w1e, grad_weight, grad_bias, None, None
