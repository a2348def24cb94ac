"""Small shared helpers: input validation, the impl switch and the numerics policy."""

from __future__ import annotations

import contextlib
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SizeLike = Union[int, Sequence[int]]
IMPLS = ("reference", "fused")
MEMORY_MODES = ("default", "lean")
# Set by insert_attention on every module it inserts: the name of the site it follows.
SITE_ATTR = "_reid_attention_site"


def check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class ImplSwitch:
    """Mixin of every layer: the ``impl`` attribute ("reference" | "fused"), validated on every
    assignment, and a clear refusal of ``torch.jit.script``.

    TorchScript (in maintenance in PyTorch) cannot compile the layers' Python-level dispatch
    (the impl switch, norm routing, autograd Functions); ``torch.jit.trace``, ``torch.export``
    and ONNX export record the computation instead and are supported.
    """

    _impl: str

    def __prepare_scriptable__(self):
        raise TypeError(
            f"{type(self).__name__} does not support torch.jit.script; record it with "
            "torch.jit.trace(model, example), torch.export.export(model, (example,)) or "
            "torch.onnx.export instead (all supported)"
        )

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = check_impl(value)


class MemorySwitch:
    """Mixin of the relation layers: ``memory`` ("default" | "lean"), validated on assignment.

    ``"lean"``: the fused path keeps, of each agent's computation after its projection GEMM,
    only that GEMM's output (3d' x n per sample) and a few small results (the relation
    embedding's statistics, factors and its product with W's first conv) for backward, and
    recomputes the norms and the W network there; the relation embedding, the largest
    activation of a training step (n/s x n per sample), is computed in batch chunks and never
    held whole (:mod:`reid_attention._embedding`). Same gradients and statistics. Exact
    BatchNorms and plain ReLUs only (a module must not run twice); other norms keep the
    default path.
    """

    _memory: str = "default"

    @property
    def memory(self) -> str:
        return self._memory

    @memory.setter
    def memory(self, value: str) -> None:
        if not isinstance(value, str) or value not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {value!r}")
        self._memory = value

    @property
    def _lean(self) -> bool:
        """Whether ``memory == "lean"``."""
        return self._memory == "lean"


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def pair(name: str, size: SizeLike, *, square_int: bool = True) -> Tuple[int, int]:
    """A size as (H, W); with ``square_int`` an int means a square (image sizes)."""
    if square_int and isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        expected = "an int or a pair (H, W)" if square_int else "a pair (H, W)"
        raise ValueError(f"{name} must be {expected}, got {size!r}")
    h, w = size
    return check_positive_int(f"{name}[0]", h), check_positive_int(f"{name}[1]", w)


def feat_pair(owner: str, size: object) -> Tuple[int, int]:
    """The ``feat_size`` of a size-tied layer: an (H, W) pair only.

    An int is refused: the official ``RGA_Module(in_channel, in_spatial)`` takes H*W there, and
    reading it as a square side would build weights for a (H*W)^2 map.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        raise TypeError(
            f"{owner} takes feat_size as the map's (H, W) pair, got the int {size}; the official "
            f"RGA_Module(in_channel, in_spatial) takes H*W there: pass e.g. (64, 32) for a 64x32 map"
        )
    return pair("feat_size", size, square_int=False)


def where(module: object) -> str:
    """``"RGA"``, or ``"RGA at site 'layer1'"`` for a module that insert_attention placed."""
    site = getattr(module, SITE_ATTR, None)
    name = type(module).__name__
    return f"{name} at site {site!r}" if site else name


def check_input(
    x: object, owner: str, channels: int | None = None, feat_size: Tuple[int, int] | None = None
) -> Tensor:
    """Validate a (B, C, H, W) floating-point feature map at a layer boundary."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point input, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{owner} built for {channels} channels, got input with {x.shape[1]}")
    if feat_size is not None and tuple(x.shape[2:]) != feat_size:
        h, w = x.shape[2:]
        raise ValueError(
            f"{owner} built for feat_size {feat_size}, got input {h}x{w}; build the model for this "
            f"input size (input_size=...), or resize the layer: .resized(({h}, {w})) on the module, "
            "ra.resize_attention(model, input_size) on a wrapped model or preset"
        )
    return x


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


def no_autocast(x: Tensor):
    """Context that turns autocast off on x's device (the float32 island of the relation math).

    Meta tensors (shape-only runs: insert_attention's probes) have no autocast state to turn off.
    """
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)
