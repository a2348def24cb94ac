"""Validation at the layers' boundaries: sizes, counts and input maps, with messages that say what
was expected and what came.

A value refused because of one argument raises :class:`ArgumentError` (a ``ValueError``) that
carries the argument's name and value, so a caller (insertion, a preset) can say where to change
it from that data instead of reading the message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

SizeLike = Union[int, Sequence[int]]
# Set by insert_attention on every module it inserts: the name of the site it follows.
SITE_ATTR = "_reid_attention_site"


class ArgumentError(ValueError):
    """A ``ValueError`` about one argument: ``argument`` is its name, ``value`` what came.

    ``str(err)`` is the message alone; ``ArgumentError("levels", 3, "...")`` reads as "argument
    ``levels``, value 3, what is wrong with it".
    """

    def __init__(self, argument: str, value: object, message: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.value = value

    def __reduce__(self) -> tuple[type[ArgumentError], tuple[str, object, str]]:
        # pickles (e.g. across DDP / multiprocessing workers) with its data
        return type(self), (self.argument, self.value, str(self))


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ArgumentError(name, value, f"{name} must be >= 1, got {value}")
    return value


def pair(name: str, size: object, *, square_int: bool = True) -> tuple[int, int]:
    """A size (a :data:`SizeLike`, checked here) as (H, W); with ``square_int`` an int means a
    square (image sizes)."""
    if square_int and isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        expected = "an int or a pair (H, W)" if square_int else "a pair (H, W)"
        raise ArgumentError(name, size, f"{name} must be {expected}, got {size!r}")
    h, w = size
    return check_positive_int(f"{name}[0]", h), check_positive_int(f"{name}[1]", w)


def feat_pair(owner: str, size: object) -> tuple[int, int]:
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


def layer_name(module: object) -> str:
    """``"RGA"``, or ``"RGA at site 'layer1'"`` for a module that insert_attention placed."""
    site = getattr(module, SITE_ATTR, None)
    name = type(module).__name__
    return f"{name} at site {site!r}" if site else name


def check_input(
    x: object, owner: str, channels: int | None = None, feat_size: tuple[int, int] | None = None
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


def max_levels(size: int) -> int:
    """The most attention-pyramid levels a side of ``size`` allows: 1 + the power of two in
    ``size`` (level l cuts it into 2^(l-1) equal parts)."""
    return (size & -size).bit_length()


def check_levels(owner: str, levels: object, what: str, size: int) -> int:
    """An attention pyramid's ``levels``: an int whose finest level's 2^(levels-1) parts divide
    ``size`` (APNet-C: the channels; APNet-S: the height)."""
    levels = check_positive_int("levels", levels)
    parts = 2 ** (levels - 1)
    if size % parts:
        most = max_levels(size)
        raise ArgumentError(
            "levels", levels,
            f"{owner} level {levels} splits {what} into {parts} parts: {what} = {size} is not "
            f"divisible by {parts}; levels 1..{most} work at this size (pass levels={most} or fewer)",
        )
    return levels
