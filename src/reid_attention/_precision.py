"""The numerics policy: under autocast the input projections run in the autocast dtype; relation
products, norms and normalisers run in float32 (float64 stays float64)."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """Relation products and normalisers accumulate in float32 for half inputs (float64 stays)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a GEMM on x runs in: autocast's where it is on for x's device (float64 is
    never cast), else x's own."""
    device = x.device.type
    if device != "meta" and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def no_autocast(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Context that turns autocast off on x's device (the float32 island of the relation math).

    Meta tensors (shape-only runs: insert_attention's probes) have no autocast state to turn off.
    """
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)
