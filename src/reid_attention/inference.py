"""BatchNorm scale folding: :func:`fold_batchnorm_scales` (deprecated: no measured gain).

**Deprecated**, to be removed in the next release: the fold does not make inference faster
(``benchmarks/inference_fold.py``: 0.93-1.24x at the RGA paper sites, noise around 1), and the
runtime users deploy to folds for itself: ONNX Runtime fuses every Conv + BatchNorm pair of an
exported model (``reid-attention bench network --mode eval`` measures both runtimes).

An eval-mode BatchNorm after a convolution is an affine map per output channel,

    BN(W x + b) = s * (W x + b - mean) + beta,      s = gamma / sqrt(var + eps),

so its scale ``s`` can live in the convolution weight (``W' = s W``) and everything else in one
shift ``beta' = beta + s * (b - mean)``. The folded BatchNorm is kept as a module in canonical
"shift only" form: weight 1, running mean 0, running variance ``1 - eps`` (so that
``sqrt(var + eps) = 1``) and bias ``beta'``; a convolution bias, if any, becomes 0.

Keeping the BatchNorm module (instead of deleting it or moving the shift into a conv bias) is
deliberate: both paths of every layer read the same modules (the fused paths take
``seq[0].weight`` and run the norm modules, or the one-kernel BatchNorm equivalent of calling
them, and ignore conv biases, as the official modules have none), the state_dict keeps every key
and shape, and a folded state_dict loaded into an unfolded module -- or the official one --
computes the same eval-mode function.

What it is for, and what not: the folded BatchNorm still runs, as a pure shift, which costs the
same elementwise pass as the full eval-mode BatchNorm, so it does not make the layers faster
(``benchmarks/inference_fold.py``: eval forward time unchanged within noise at the paper sites).
The shift cannot be folded further without changing the modules: in every CBR it sits between a
bias-free convolution and a ReLU, so it can only move into a new conv bias (a key the official
state_dict does not have, and which the fused paths, reading ``seq[0].weight``, would have to
learn to apply), and in the ``W`` network's last BatchNorm it is already all that is left. Use it
where weights that carry the normalisation are wanted: per-channel weight quantisation, or
handing the weights to a runtime or a kernel that applies the shift as a bias.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["fold_batchnorm_scales"]


def fold_batchnorm_scales(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` whose BatchNorm scales sit in the preceding conv weights;
    ``module`` is untouched.

    Folded: every BatchNorm that directly follows a (non-transposed) convolution inside an
    ``nn.Sequential`` -- every CBR and ``W`` network of RGA and of APNet-S's agents, and e.g.
    torchvision's downsample branches -- when the BatchNorm is affine, tracks running statistics,
    normalises the convolution's output channels and has ``eps < 1``. Other BatchNorms are left
    as they are. The copy computes the same eval-mode function as ``module.eval()`` (up to
    rounding; the fold is computed in float64 and stored in each parameter's dtype).

    The copy is for inference: in training mode a folded BatchNorm would normalise with batch
    statistics again and the folded scale would be lost. It is not faster than ``module.eval()``
    (see the module docstring).

    Deprecated (a ``DeprecationWarning`` on every call): see the module docstring.
    """
    warnings.warn(
        "fold_batchnorm_scales is deprecated and will be removed in the next release: it does not "
        "speed up inference (benchmarks/inference_fold.py); export to ONNX Runtime, which fuses "
        "Conv + BatchNorm itself (reid-attention bench network --mode eval)",
        DeprecationWarning, stacklevel=2,
    )
    folded = copy.deepcopy(module).eval()
    for seq in folded.modules():
        if isinstance(seq, nn.Sequential):
            layers = list(seq)
            for conv, bn in zip(layers, layers[1:]):
                if isinstance(conv, _ConvNd) and isinstance(bn, _BatchNorm) and _foldable(conv, bn):
                    _fold(conv, bn)
    return folded


def _foldable(conv: _ConvNd, bn: _BatchNorm) -> bool:
    return (
        not conv.transposed
        and bn.affine
        and bn.track_running_stats
        and bn.num_features == conv.out_channels
        and bn.eps < 1
    )


@torch.no_grad()
def _fold(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Fold ``bn`` (eval mode) into ``conv``'s weight and leave ``bn`` as a pure shift."""
    f64 = torch.float64
    running_mean, running_var = bn.running_mean, bn.running_var
    assert running_mean is not None and running_var is not None  # _foldable: track_running_stats
    scale = bn.weight.to(f64) * torch.rsqrt(running_var.to(f64) + bn.eps)
    conv_bias = conv.bias.to(f64) if conv.bias is not None else 0.0
    shift = bn.bias.to(f64) + scale * (conv_bias - running_mean.to(f64))
    weight_scale = scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight.copy_(conv.weight.to(f64) * weight_scale)
    if conv.bias is not None:
        conv.bias.zero_()
    bn.weight.fill_(1.0)
    bn.bias.copy_(shift)
    running_mean.zero_()
    running_var.fill_(1.0 - bn.eps)
