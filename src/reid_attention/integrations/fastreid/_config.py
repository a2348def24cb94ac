"""fast-reid's config keys -> the arguments of the attention backbones (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

__all__ = ["NORMS", "add_attention_config", "attention_kwargs", "attention_node", "depth", "input_size",
           "norm_layer"]

#: fast-reid's ``MODEL.BACKBONE.NORM`` names that :func:`norm_layer` maps.
NORMS = ("BN", "syncBN", "FrozenBN", "GN")


def _node(cfg: Any, path: str) -> Any:
    for key in path.split("."):
        cfg = getattr(cfg, key)
    return cfg


def _size_of(key: str, value: Any) -> tuple[int, int]:
    size = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(size) == 1 and key == "INPUT.CROP.SIZE":  # RandomResizedCrop / CenterCrop: a square
        size = size * 2
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        reason = ("a single value resizes the shorter side and keeps the aspect ratio, so the images have no "
                  "fixed size" if len(size) == 1 else "expected [H, W]")
        raise ValueError(f"{key} is {list(size)}: the attention is built for one image size, set [H, W] "
                         f"({reason})")
    return size


def input_size(cfg: Any) -> tuple[int, int]:
    """The (H, W) of the images fast-reid's transforms give the model, which the attention is
    built for: ``INPUT.SIZE_TRAIN``, or ``INPUT.CROP.SIZE`` when ``INPUT.CROP.ENABLED`` (both
    the training crop and the test centre crop). ``INPUT.SIZE_TEST`` must equal
    ``INPUT.SIZE_TRAIN`` (without crop): the attention refuses another size."""
    crop = _node(cfg, "INPUT.CROP")
    if crop.ENABLED:
        return _size_of("INPUT.CROP.SIZE", crop.SIZE)
    train = _size_of("INPUT.SIZE_TRAIN", cfg.INPUT.SIZE_TRAIN)
    test = tuple(cfg.INPUT.SIZE_TEST)
    if test != train:
        raise ValueError(
            f"INPUT.SIZE_TEST is {list(test)} and INPUT.SIZE_TRAIN {list(train)}: the attention is built for "
            f"one image size (INPUT.SIZE_TRAIN); set INPUT.SIZE_TEST: {list(train)} "
            "(reid_attention.resize_attention moves a trained model to another size)"
        )
    return train


class _GroupNorm(nn.GroupNorm):
    """fast-reid's ``GN``: GroupNorm with 32 groups, or the largest divisor of 32 that divides the
    channels (the ResNet's norms all get 32; narrower attention norms, e.g. 8 channels, fewer)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(math.gcd(32, num_channels), num_channels)


def norm_layer(name: str) -> Callable[[int], nn.Module] | None:
    """The ``norm_layer`` (``num_channels -> nn.Module``) for fast-reid's ``MODEL.BACKBONE.NORM``:
    ``BN`` -> None (torchvision's ``nn.BatchNorm2d``), ``syncBN`` -> ``nn.SyncBatchNorm``
    (synchronised in a distributed run, a BatchNorm otherwise), ``GN`` -> GroupNorm with 32
    groups (fast-reid's; fewer where 32 does not divide the channels), ``FrozenBN`` ->
    torchvision's ``FrozenBatchNorm2d`` (the builders freeze the ResNet's norms only: module
    docstring). fast-reid's ``GhostBN`` and other names are refused."""
    if name == "BN":
        return None
    if name == "syncBN":
        return nn.SyncBatchNorm
    if name == "GN":
        return _GroupNorm
    if name == "FrozenBN":
        from torchvision.ops import FrozenBatchNorm2d

        frozen: Callable[[int], nn.Module] = FrozenBatchNorm2d
        return frozen
    raise ValueError(
        f"MODEL.BACKBONE.NORM is {name!r}: the attention backbones take one of {', '.join(NORMS)}"
    )


def depth(value: Any) -> int:
    text = str(value)
    digits = text.removesuffix("x")
    if not digits.isdigit():
        raise ValueError(f"MODEL.BACKBONE.DEPTH is {value!r}: expected fast-reid's form, e.g. '50x'")
    return int(digits)


def attention_node(cfg: Any) -> Any:
    return getattr(cfg.MODEL.BACKBONE, "ATTENTION", None)


def attention_kwargs(cfg: Any) -> dict[str, Any]:
    node = attention_node(cfg)
    extra = getattr(node, "KWARGS", None) if node is not None else None
    return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in (extra or {}).items()}


def add_attention_config(cfg: Any) -> Any:
    """Add ``MODEL.BACKBONE.ATTENTION`` to a fast-reid config (``fastreid.config.get_cfg()``),
    before ``merge_from_file``, as fast-reid's projects add their keys; returns ``cfg``.

    * ``KIND``: the attention kind of ``build_attention_backbone`` (``"rga_s"``, ``"pfsa"``,
      ``"apnet_c"`` ...; :func:`reid_attention.list_attentions`); the presets refuse one.
    * ``ARCH``: the torchvision ResNet-family model of ``build_attention_backbone``
      (``resnet18`` .. ``resnet152``, ``resnext50_32x4d`` ..., ``wide_resnet50_2`` ...); ``""``
      (default): ``resnet<MODEL.BACKBONE.DEPTH>``.
    * ``SITES``: where ``build_attention_backbone`` inserts it (module names,
      :func:`reid_attention.list_sites`); ``[]`` (default): the default sites of
      :func:`reid_attention.insert_attention`.
    * ``KWARGS``: keyword arguments of the attention or the preset, any keys (``impl: fused``,
      ``levels: 3``, ``channel_ratio: 8``...).

    Calling it again keeps the keys already there.
    """
    backbone = cfg.MODEL.BACKBONE
    if "ATTENTION" in backbone:
        return cfg
    frozen = cfg.is_frozen()
    cfg.defrost()
    node = type(cfg)()  # fast-reid's CfgNode: merging refuses another class
    node.KIND = ""
    node.ARCH = ""
    node.SITES = []
    node.KWARGS = type(cfg)(new_allowed=True)
    backbone.ATTENTION = node
    if frozen:
        cfg.freeze()
    return cfg
