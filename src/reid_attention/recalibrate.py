"""Re-estimate BatchNorm running statistics: :func:`recalibrate_norms`.

**What.** ``recalibrate_norms(model, batches)`` runs the model forward on a few training batches
and replaces the running mean and variance of every BatchNorm with their average over those
batches (a cumulative average, each batch weighing the same, as
``torch.optim.swa_utils.update_bn`` and fast-reid's / detectron2's "precise BN" compute it).
Parameters are never changed; the model's modes and the norms' momenta are restored.

**Why.** In eval mode a BatchNorm normalises with its running statistics, an exponential average
of the statistics of past training batches (momentum 0.1: about the last 10 batches, each seen
through the weights of its own step). While the weights move fast -- early training, a random
init, Adam -- those averages lag the statistics the current weights produce, and the error
compounds through a deep network. RGA is hit hardest: its relation term is a product of two
projections summed over every position, so an error in the statistics before it grows before
the gate's final one-channel BatchNorm; the eval-mode gate logits reach 1e5 .. 1e9, the
sigmoids saturate and the pooled features of all images become identical or zero
(``benchmarks/eval_collapse.py`` measures it on a small re-ID run; docs/training.md has the
figures). Nothing is wrong with the trained weights: statistics estimated for them restore
the features.

**When to call it.** Before evaluating a model that is still training (between epochs, as
torchreid's ``Engine.run(eval_freq=...)`` and fast-reid's evaluation hook do), before saving a
checkpoint meant for inference, and after anything that changes the statistics without
training them (:func:`reid_attention.resize_attention`, loading weights into a model with other
norms). Ten batches of the training loader (its augmentation included) are usually enough;
``docs/training.md`` ("Evaluation during training") shows the torchreid recipe and fast-reid's
equivalent hook.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["IMAGE_KEYS", "recalibrate_norms"]

#: Keys under which a dict batch holds its images, tried in this order: torchreid's data loaders
#: yield ``{"img", "pid", "camid", "impath"}``, fast-reid's ``{"images", "targets", "camids",
#: "img_paths"}``.
IMAGE_KEYS = ("img", "images")


def _images(batch: Any, index: int) -> Tensor:
    """The image tensor of one batch: the batch itself, its first item, or its ``IMAGE_KEYS`` entry."""
    images = batch
    if isinstance(batch, Mapping):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        if key is None:
            raise KeyError(
                f"recalibrate_norms: batch {index} is a dict without an image entry: expected one of the "
                f"keys {IMAGE_KEYS} (torchreid, fast-reid), got {sorted(map(str, batch))}; pass a generator "
                "of image tensors instead, e.g. (b['x'] for b in loader)"
            )
        images = batch[key]
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"recalibrate_norms: batch {index} is an empty {type(batch).__name__}")
        images = batch[0]
    if not isinstance(images, Tensor):
        raise TypeError(
            f"recalibrate_norms: batch {index} must be an image tensor, a tuple/list whose first item is "
            f"one, or a dict holding one under {IMAGE_KEYS}; got {type(images).__name__}"
        )
    return images


def _check(num_batches: int | None, momentum: float | None) -> None:
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be None (every batch) or a positive int, got {num_batches!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 < momentum <= 1.0):
        raise ValueError(f"momentum must be None (cumulative average) or a float in (0, 1], got {momentum!r}")


def _running_stats(norm: _BatchNorm) -> tuple[Tensor, Tensor, Tensor]:
    """``running_mean``, ``running_var`` and ``num_batches_tracked`` of a norm that tracks them."""
    mean, var, count = norm.running_mean, norm.running_var, norm.num_batches_tracked
    assert mean is not None and var is not None and count is not None  # track_running_stats
    return mean, var, count


@torch.no_grad()
def recalibrate_norms(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    momentum: float | None = None,
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``batches``, in place.

    Every module that is a ``torch.nn.modules.batchnorm._BatchNorm`` and tracks running
    statistics is re-estimated: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` (the same logic;
    under ``torch.distributed`` call it on every rank with the same ``num_batches``, since each
    forward synchronises), subclasses such as torchreid integration's BNNeck. Norms without
    running statistics are left alone: torchvision's ``FrozenBatchNorm2d`` (not a
    ``_BatchNorm``: its statistics are fixed by design), GroupNorm, LayerNorm, BatchNorms built
    with ``track_running_stats=False``.

    How (``momentum=None``, the default): the statistics are reset, each norm's momentum is set to
    None (torch's cumulative average), the model runs forward in training mode under
    ``torch.no_grad()`` on each batch, then every module's training flag and every norm's
    momentum are restored. The result is the plain average over the batches of each batch's mean
    and unbiased variance, as the norm saw them in training mode (the norms before it normalising
    with batch statistics too), and ``num_batches_tracked`` counts the batches. Dropout and any
    other training-mode behaviour run as in training. Parameters are never changed, nor are
    gradients. If a batch fails, the statistics are put back as they were and the error is
    raised.

    Args:
        model: any ``nn.Module`` (a preset, a torchreid/fast-reid model, a DDP-wrapped model's
            ``.module``). Its forward is called with the image tensor alone; the output is ignored.
        batches: an iterable of batches, e.g. a data loader. A batch is an image tensor, a
            tuple or list whose first item is the images (``(images, pids, ...)``), or a dict
            holding them under ``"img"`` (torchreid's loaders) or ``"images"`` (fast-reid's);
            anything else: pass a generator, ``(b["x"] for b in loader)``. Images are moved to
            the device of the norms' statistics. Use the training loader: its augmentation is
            what the statistics were estimated under during training.
        num_batches: use at most this many batches (None: all of them). Only the batches used
            are drawn from ``batches``.
        momentum: None (default): reset and take the cumulative average, every batch weighing
            the same. A float in (0, 1]: keep the current statistics and update them with this
            momentum on each batch (an exponential average that starts from the old statistics;
            1.0 keeps the last batch's statistics).

    Returns:
        ``model``, recalibrated in place.

    Raises:
        ValueError: ``batches`` yields nothing (nothing is changed), or a bad ``num_batches`` /
            ``momentum``.
        TypeError / KeyError: a batch holds no image tensor where one was expected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check(num_batches, momentum)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
             and m.running_mean is not None]
    iterator = iter(batches if num_batches is None else itertools.islice(batches, num_batches))
    sentinel = object()
    first = next(iterator, sentinel)
    if first is sentinel:
        raise ValueError(
            "recalibrate_norms got no batches: pass a non-empty iterable of image batches (e.g. the training "
            "data loader)" + ("" if num_batches is None else f" and num_batches >= 1 (got {num_batches})")
        )
    if not norms:
        return model

    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: tuple(t.clone() for t in _running_stats(m)) for m in norms}
    device = _running_stats(norms[0])[0].device
    try:
        for m in norms:
            if momentum is None:
                m.reset_running_stats()
            m.momentum = momentum
        model.train()
        for index, batch in enumerate(itertools.chain([first], iterator)):
            model(_images(batch, index).to(device, non_blocking=True))
    except BaseException:
        for m, (mean, var, count) in saved.items():
            running_mean, running_var, num_batches_tracked = _running_stats(m)
            running_mean.copy_(mean)
            running_var.copy_(var)
            num_batches_tracked.copy_(count)
        raise
    finally:
        for m, value in momenta.items():
            m.momentum = value
        for module, training in modes.items():
            module.training = training
    return model
