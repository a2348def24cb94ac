"""The one normalisation helper of every layer: the module tree decides what runs.

Each layer owns its norm modules (built with ``norm_layer``, torchvision's convention:
``norm_layer(num_channels) -> nn.Module``) and runs them through this file only:

* :func:`norm_channels` normalises a (B, C, L) tensor whose C channels are the channels of
  several equally wide norm modules, concatenated (theta, phi and g of one agent; one
  projection of each APNet-S stripe). **Fast route**: when :func:`one_kernel` holds, one
  ``F.batch_norm`` call covers the whole group, and the modules' running statistics and
  ``num_batches_tracked`` end up exactly as if each module had been called on its slice.
  **Otherwise** every module is called, as a module (its hooks, its own mode, its own
  statistics: SyncBatchNorm after ``convert_sync_batchnorm``, torchvision's FrozenBatchNorm2d,
  GroupNorm, a user's norm), on its slice viewed as a (B, c, L, 1) map.
* :func:`batch_statistics` gives the statistics an exact BatchNorm normalises with from the
  per-(sample, channel) means and variances of its input, updating the running statistics as
  the module would: :func:`batchnorm_affine` (APNet-C's fast route: the norm as a per-channel
  affine map, computed without touching the map; APNet-C calls the module wherever the route is
  not provably the same) and the memory-lean relation embedding
  (:mod:`reid_attention._relation.lean`) are built on it.

The fast routes are taken only when every module is exactly ``nn.BatchNorm1d/2d/3d`` (the
type, not a subclass), without forward hooks, in one mode with one eps, momentum, affine and
statistics setting, and ``momentum`` is not None (the cumulative average divides by the
module's own counter; the module computes it as torch does).

Like :mod:`reid_attention._relation`, this module is private core and the documented testing
seam: tests may import its public names (no leading underscore).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

NormLayer = Callable[[int], nn.Module]
_EXACT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def make_norm(norm_layer: NormLayer, channels: int, **factory: Any) -> nn.Module:
    """``norm_layer(channels)`` on the factory device / dtype, checked to be a module."""
    if not callable(norm_layer):
        raise TypeError(
            "norm_layer must be a callable num_channels -> nn.Module (e.g. nn.BatchNorm2d or "
            f"lambda c: nn.GroupNorm(1, c)), got {type(norm_layer).__name__}"
        )
    norm = norm_layer(channels)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"norm_layer({channels}) must return an nn.Module, got {type(norm).__name__}")
    return norm.to(**{k: v for k, v in factory.items() if v is not None})


def is_plain(m: nn.Module, cls: type) -> bool:
    """``m`` is exactly a ``cls`` (not a subclass) with no forward hooks, its own or global."""
    return type(m) is cls and not (
        m._forward_hooks or m._forward_pre_hooks
        or _module._global_forward_hooks or _module._global_forward_pre_hooks
    )


def _settings(m: _BatchNorm) -> tuple[object, ...]:
    return (m.training, m.eps, m.momentum, m.affine, m.running_mean is None)


def one_kernel(norms: Sequence[nn.Module]) -> TypeGuard[Sequence[_BatchNorm]]:
    """Whether one ``F.batch_norm`` call is provably the same as calling every module."""
    if not all(any(is_plain(m, cls) for cls in _EXACT) for m in norms):
        return False
    settings = [_settings(m) for m in norms if isinstance(m, _BatchNorm)]  # every module (above)
    return settings[0][2] is not None and all(s == settings[0] for s in settings)


def _track(norms: Sequence[_BatchNorm]) -> bool:
    """Count a training batch for modules that track statistics; whether they do."""
    first = norms[0]
    track = first.training and first.running_mean is not None
    if track:
        torch._foreach_add_(_buffers(norms, "num_batches_tracked"), 1)
    return track


def _buffers(norms: Sequence[_BatchNorm], name: str) -> list[Tensor]:
    """The tensors ``name`` of every module (a statistic or counter they all track)."""
    return [getattr(m, name) for m in norms]


def _cat(norms: Sequence[_BatchNorm], name: str, dtype: torch.dtype) -> Tensor | None:
    first: Tensor | None = getattr(norms[0], name)  # None for all or none (one_kernel)
    if first is None:
        return None
    return (first if len(norms) == 1 else torch.cat(_buffers(norms, name))).to(dtype)


def _dtype_of(m: nn.Module, default: torch.dtype) -> torch.dtype:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.dtype
    return default


def run_module(module: nn.Module, x: Tensor) -> Tensor:
    """Call a module on x in the module's own dtype (x's for a stateless one); the result in x's."""
    y: Tensor = module(x.to(_dtype_of(module, x.dtype)))
    return y.to(x.dtype)


def norm_channels(x: Tensor, norms: Sequence[nn.Module], *, update_statistics: bool = True) -> Tensor:
    """Normalise x (B, C, L): its channels are ``norms``' channels concatenated (equal widths).

    ``update_statistics=False`` (one-kernel route only: a recomputation for backward) gives the
    same result without counting the batch or touching the running statistics.
    """
    if not one_kernel(norms):
        if not update_statistics:
            raise RuntimeError("only exact BatchNorms can be recomputed without updating statistics")
        parts = x.chunk(len(norms), 1)
        return torch.cat([run_module(m, part.unsqueeze(-1)).squeeze(-1) for m, part in zip(norms, parts)], 1)
    first = norms[0]
    track = _track(norms) if update_statistics else False
    dtype = x.dtype
    running_mean, running_var = _cat(norms, "running_mean", dtype), _cat(norms, "running_var", dtype)
    if not update_statistics and running_mean is not None and running_var is not None:  # throwaway copies
        running_mean, running_var = running_mean.clone(), running_var.clone()
    # F.batch_norm updates the statistics it is given in place: for one module in its own dtype
    # those are its buffers; otherwise they are fresh (concatenated or cast) and written back.
    # x.contiguous(): for a non-contiguous input the CPU kernel returns a contiguous result but
    # its fake-tensor twin keeps the input's strides, and views traced on the fake layout then
    # fail at run time under torch.compile / export (pytorch/pytorch#192668).
    y = F.batch_norm(
        x.contiguous(), running_mean, running_var, *affine_parameters(norms, dtype),
        first.training or running_mean is None, _momentum(first), first.eps,
    )
    if track and running_mean is not first.running_mean:
        assert running_mean is not None and running_var is not None  # tracked statistics
        sizes = [m.num_features for m in norms]
        torch._foreach_copy_(
            _buffers(norms, "running_mean") + _buffers(norms, "running_var"),
            list(running_mean.split(sizes)) + list(running_var.split(sizes)),
        )
    return y


def _momentum(m: _BatchNorm) -> float:
    """The momentum of a ``one_kernel`` module (never None there)."""
    assert m.momentum is not None
    return m.momentum


def batch_statistics(
    norms: Sequence[_BatchNorm], mean: Tensor | None, var: Tensor | None, count: int
) -> tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance (C,) that ``norms`` normalise with, for
    ``one_kernel(norms)`` modules whose channels, concatenated, are the C channels of a tensor y.

    ``mean`` and ``var`` (B, C) are the per-sample mean and biased variance of y over its
    ``count`` positions (both may be None when the norms use running statistics). Batch
    statistics follow from them (law of total variance), and the running statistics and
    counters are updated as calling each module on its channels of y would update them.
    """
    first = norms[0]
    if not (first.training or first.running_mean is None):
        dtype = first.running_mean.dtype if mean is None else mean.dtype
        running_mean, running_var = _cat(norms, "running_mean", dtype), _cat(norms, "running_var", dtype)
        assert running_mean is not None and running_var is not None
        return running_mean, running_var
    assert mean is not None and var is not None  # batch statistics are computed from them
    between, mu = torch.var_mean(mean, 0, correction=0)
    sigma2 = var.mean(0) + between
    if _track(norms):
        n = count * mean.shape[0]
        sizes = [m.num_features for m in norms]
        means, variances = _buffers(norms, "running_mean"), _buffers(norms, "running_var")
        with torch.no_grad():
            for m, m_mu, m_sigma2, r_mean, r_var in zip(
                norms, mu.split(sizes), sigma2.split(sizes), means, variances
            ):
                r_mean.lerp_(m_mu.to(r_mean.dtype), _momentum(m))
                r_var.lerp_((m_sigma2 * (n / (n - 1))).to(r_var.dtype), _momentum(m))
    return mu, sigma2


def affine_parameters(norms: Sequence[_BatchNorm], dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """The norms' weights and biases concatenated in ``dtype`` (None without affine)."""
    return _cat(norms, "weight", dtype), _cat(norms, "bias", dtype)


def batchnorm_affine(bn: nn.Module, mean: Tensor, var: Tensor | None, count: int) -> tuple[Tensor, Tensor]:
    """(scale, shift) (C,) with ``bn(y) = y * scale + shift``, for ``one_kernel([bn])`` modules,
    from y's per-sample statistics (see :func:`batch_statistics`, which also updates ``bn``'s
    running statistics)."""
    norm = cast(_BatchNorm, bn)  # one_kernel([bn]) holds (above)
    mu, sigma2 = batch_statistics([norm], mean, var, count)
    weight, bias = affine_parameters([norm], mean.dtype)
    scale = torch.rsqrt(sigma2 + norm.eps)
    if weight is not None:
        scale = weight * scale
    shift = -mu * scale
    return scale, (shift if bias is None else shift + bias)
