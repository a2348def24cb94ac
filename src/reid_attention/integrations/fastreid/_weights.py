"""ImageNet weights for the trunk from fast-reid's ``PRETRAIN`` keys (local files only), and
``NORM: FrozenBN`` for the trunk."""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = ["freeze_norms", "pretrained_weights"]

_log = logging.getLogger("reid_attention.integrations.fastreid")


def _state_dict(path: str) -> dict[str, Tensor]:
    """A state_dict from a file (``torch.load(weights_only=True)``), also one nested under
    ``state_dict`` or ``model``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.BACKBONE.PRETRAIN_PATH: no file at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(
            f"MODEL.BACKBONE.PRETRAIN_PATH {path!r} holds a {type(state).__name__}, not a state_dict"
        )
    return state


def _imagenet_file(arch: str) -> str:
    """torchvision's IMAGENET1K_V1 file of ``arch`` in the torch hub cache (never downloaded)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "MODEL.BACKBONE.PRETRAIN with an empty PRETRAIN_PATH reads torchvision's ImageNet weights of "
            f"{arch} from the torch hub cache, not found at {path}: fetch them once with "
            f"torchvision.models.get_model({arch!r}, weights='IMAGENET1K_V1'), or set "
            "MODEL.BACKBONE.PRETRAIN_PATH to a local torchvision state_dict, or "
            "MODEL.BACKBONE.PRETRAIN: False"
        )
    return path


def pretrained_weights(cfg: Any, arch: str, norm: str) -> dict[str, Tensor] | None:
    backbone = cfg.MODEL.BACKBONE
    if not backbone.PRETRAIN:
        return None
    if norm == "GN":
        raise ValueError(
            "MODEL.BACKBONE.PRETRAIN with NORM 'GN': the ImageNet ResNet's weights are a BatchNorm "
            "network's; train from scratch (PRETRAIN: False) or use NORM 'BN', 'syncBN' or 'FrozenBN'"
        )
    state = _state_dict(backbone.PRETRAIN_PATH or _imagenet_file(arch))
    _log.info("Loading the %s weights from %s", arch, backbone.PRETRAIN_PATH or "the torch hub cache")
    return state


def freeze_norms(trunk: nn.Module) -> None:
    """Replace the BatchNorm2d modules of the trunk, not those of the inserted attention, by
    torchvision FrozenBatchNorm2d modules holding their statistics and affine parameters."""
    from torchvision.ops import FrozenBatchNorm2d

    from ...insert import fx_leaf_modules

    attention = tuple(fx_leaf_modules(trunk))  # the inserted attention's classes
    skip = {id(m) for a in trunk.modules() if isinstance(a, attention) for m in a.modules()}
    for parent in list(trunk.modules()):
        if id(parent) in skip:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, key).copy_(getattr(child, key))
                setattr(parent, name, frozen)
