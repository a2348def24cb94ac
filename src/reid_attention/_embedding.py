"""The fused relation embedding's factors, and its memory-lean form as one autograd Function.

For a stack of G agents (see :mod:`reid_attention._relation`) with theta_phi = [theta; phi]
(2d' x n per sample) and the embedding weight split into its row and column halves [Wr | Wc],
the factors a = [Ar^T; Ac^T] = [phi Wr^T; theta Wc^T] (2d' x n/s, :func:`factors`) give

    E = a^T theta_phi (n/s x n),   Z = ReLU(BN(E)),   H = W1_E Z (k x n),

W1_E being the columns of the W network's first conv that act on E. E and Z are the largest
relation activations of a training step (n/s x n per sample: the size of the feature map at the
spatial axis after ResNet's layer1, twice it at the channel axis after layer4); autograd keeps
both, and their backward allocates two more of that size.

:class:`LeanEmbedding` computes H keeping theta_phi, the small a and the norm's statistics
only, and walks the batch in chunks of about :data:`CHUNK_ELEMENTS` values of E, so no E-sized
tensor exists beyond one chunk:

* forward, pass 1 (batch statistics only): each sample's per-channel mean and variance of E,
  from which :func:`reid_attention._norm.batch_statistics` gives the norm's statistics (and
  updates its running statistics once, as the module would); pass 2: H.
* backward: with g = ReLU'(Z) * (W1_E^T dH) and xhat = (E - mu) / sigma, BatchNorm's backward is
  dE = gamma / sigma * (g - mean(g) - xhat * mean(g * xhat)) under batch statistics, and
  gamma / sigma * g under running statistics. Pass A accumulates the means, dW1_E, dgamma and
  dbeta; pass B recomputes g and gives da = theta_phi dE^T and d theta_phi = a dE, plus the
  path through a.

A batch that fits in one chunk computes E once each way. The same function and gradients as the
autograd form up to rounding order, for exact BatchNorms (``one_kernel``) and a plain ReLU.
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


def _embedded(a: Tensor, tp: Tensor, rows: slice) -> Tensor:
    """E = a^T theta_phi (b, G, n/s, n) of the samples ``rows``."""
    return torch.matmul(a[rows].transpose(2, 3), tp[rows])


def _mean_var(e: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance over the last axis, two-pass (as stable as Welford's update;
    several times faster than ``torch.var_mean`` on the CPU)."""
    mean = e.mean(-1, keepdim=True)
    centred = e - mean
    return mean.squeeze(-1), centred.mul_(centred).mean(-1)


def _first_run(theta_phi: Tensor, w_gg: Tensor, w1e: Tensor, weight, bias, norms, batch_stats: bool):
    """The factors a, the norm's statistics (running statistics updated) and H, in chunks."""
    batch, groups, _, d_inner, n = theta_phi.shape
    n_inner = w_gg.shape[1]
    a = factors(theta_phi, w_gg)
    tp = theta_phi.reshape(batch, groups, 2 * d_inner, n)
    chunks = _chunks(batch, groups * n_inner * n)
    e = None
    if batch_stats:
        stats = []
        for rows in chunks:  # pass 1
            e = _embedded(a, tp, rows)
            stats.append(_mean_var(e))
        mean, var = (torch.cat(s).flatten(1) for s in zip(*stats))
        mu, sigma2 = batch_statistics(norms, mean, var, n)
    else:
        mu, sigma2 = (s.to(tp.dtype) for s in batch_statistics(norms, None, None, n))
    _, scale, shift = _affine(mu, sigma2, weight, bias, norms[0].eps, (groups, n_inner, 1))
    reuse = e if len(chunks) == 1 else None  # pass 1's E of a single chunk
    out = []
    for rows in chunks:  # pass 2
        e = reuse if reuse is not None else _embedded(a, tp, rows)
        out.append(torch.matmul(w1e, e.mul_(scale).add_(shift).relu_()))
    return a, mu, sigma2, torch.cat(out)


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
    ``stash``, a list. Empty, the first run fills it with a, the statistics (the running
    statistics are updated) and H; holding them, the call is a recomputation for backward
    (``torch.utils.checkpoint``) and returns them, recomputing nothing E-sized and updating no
    statistics. They are small: 2d' x n/s and k x n per sample. Output H (B, G, k, n).
    """

    @staticmethod
    def forward(ctx, theta_phi, w_gg, w1e, weight, bias, norms: Sequence[nn.Module], stash: list):
        first = norms[0]
        ctx.batch_statistics = first.training or first.running_mean is None
        ctx.affine = (weight is not None, bias is not None)
        if stash:  # a recomputation: the first run's results (a copy of H, which becomes an output)
            a, mu, sigma2, out = stash
            out = out.clone()
        else:
            a, mu, sigma2, out = _first_run(theta_phi, w_gg, w1e, weight, bias, norms, ctx.batch_statistics)
            # copies: the stash outlives this call, and torch.compile refuses aliases of it
            stash.extend(t.clone() for t in (a, mu, sigma2, out))
        shape = (w_gg.shape[0], w_gg.shape[1], 1)
        invstd, scale, shift = _affine(mu, sigma2, weight, bias, first.eps, shape)
        ctx.save_for_backward(theta_phi, a, w_gg, w1e, mu.reshape(shape).clone(), invstd, scale, shift)
        return out

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        theta_phi, a, w_gg, w1e, mu, invstd, scale, shift = ctx.saved_tensors
        batch, groups, _, d_inner, n = theta_phi.shape
        n_inner = w_gg.shape[1]
        tp = theta_phi.reshape(batch, groups, 2 * d_inner, n)
        w1e_t = w1e.transpose(1, 2)
        chunks = _chunks(batch, groups * n_inner * n)
        grad_w1e = torch.zeros_like(w1e)
        sum_g = tp.new_zeros(1, groups, n_inner, 1)
        sum_gx = tp.new_zeros(1, groups, n_inner, 1)  # sum of g * (E - mu)

        def values(rows: slice, accumulate: bool):
            """E - mu and g for the samples ``rows`` (pass A also adds to the sums and dW1_E)."""
            e = _embedded(a, tp, rows)
            z = torch.addcmul(shift, e, scale).relu_()
            if accumulate:
                grad_w1e.add_(torch.matmul(grad_h[rows], z.transpose(2, 3)).sum(0))
            # ReLU's own backward kernel (g where z > 0, else 0), written over z
            g = torch.ops.aten.threshold_backward.grad_input(
                torch.matmul(w1e_t, grad_h[rows]), z, 0, grad_input=z)
            del z
            e.sub_(mu)
            if accumulate:
                sum_g.add_(g.sum((0, 3), keepdim=True))
                sum_gx.add_((g * e).sum((0, 3), keepdim=True))
            return e, g

        kept = None
        for rows in chunks:  # pass A
            e, g = values(rows, True)
            kept = (e, g) if len(chunks) == 1 else None
            del e, g  # one chunk's tensors alive at a time
        count = batch * n
        mean_g, coefficient = sum_g / count, invstd * invstd * sum_gx / count
        grad_tp, grad_a = torch.empty_like(tp), torch.empty_like(a)
        for rows in chunks:  # pass B
            e, g = kept if kept is not None else values(rows, False)
            kept = None
            if ctx.batch_statistics:
                g.sub_(mean_g).sub_(e.mul_(coefficient))
            del e
            grad_e = g.mul_(scale)
            grad_tp[rows] = torch.matmul(a[rows], grad_e)
            grad_a[rows] = torch.matmul(tp[rows], grad_e.transpose(2, 3))
            del g, grad_e
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
        grad_weight = (invstd * sum_gx).flatten() if has_weight else None
        grad_bias = sum_g.flatten() if has_bias else None
        return grad_theta_phi, grad_w_gg, grad_w1e, grad_weight, grad_bias, None, None
