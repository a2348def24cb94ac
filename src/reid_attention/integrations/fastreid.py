"""fast-reid (``fastreid``) backbones with attention, and the patches its release needs on torch 2.

Install in two steps: fast-reid's only release on PyPI (1.4.0) pins torch 1.13.1 and torchvision
0.14.1, which have no wheels for Python >= 3.11, so ``pip install fastreid`` fails; its code runs on
torch 2 once :func:`patch_for_torch2` is applied. Tested with fastreid 1.4.0, torch 2.14,
torchvision 0.29, Python 3.11::

    pip install "reid-attention[fastreid]"        # fast-reid's runtime dependencies, not fast-reid
    pip install --no-deps fastreid==1.4.0

Recipe (``docs/integrations.md`` has the whole script)::

    from fastreid.config import get_cfg
    from reid_attention.integrations import fastreid as rf

    rf.patch_for_torch2()                  # before importing fastreid.data / engine / evaluation
    rf.register()                          # the backbones below, in fast-reid's BACKBONE_REGISTRY
    cfg = get_cfg()
    rf.add_attention_config(cfg)           # MODEL.BACKBONE.ATTENTION.* (optional for the presets)
    cfg.merge_from_file("rga_market.yml")  # MODEL.BACKBONE.NAME: build_rga_resnet50_backbone

    from fastreid.engine import DefaultTrainer
    trainer = DefaultTrainer(cfg)
    trainer.train()

**Backbones** (:data:`BACKBONES`; ``MODEL.BACKBONE.NAME``): the presets of
:mod:`reid_attention.presets` -- ``build_rga_resnet50_backbone`` (RGA-SC),
``build_rga_s_resnet50_backbone``, ``build_rga_c_resnet50_backbone``,
``build_apnet_resnet50_backbone`` (APNet-C), ``build_apnet_s_resnet50_backbone`` -- and
``build_attention_backbone``, any attention kind of :func:`reid_attention.list_attentions` in a
torchvision ResNet-family model (``MODEL.BACKBONE.ATTENTION.KIND``; see
:func:`add_attention_config`). Each returns a :class:`AttentionBackbone`: images -> the last
stage's feature map (B, C, H, W), which fast-reid's heads pool (C = 2048 for the presets).

**fast-reid's own config keys** are read as its ``build_resnet_backbone`` reads them:

* ``INPUT.SIZE_TRAIN``: the attention is built for the image size (RGA and APNet-S weights are
  tied to the map size), :func:`input_size` (``INPUT.CROP.SIZE`` when ``INPUT.CROP.ENABLED``);
  ``INPUT.SIZE_TEST`` must be the same size (another size would be refused at the first test
  batch, so it is refused at build time).
* ``MODEL.BACKBONE.DEPTH``: ``"50x"`` for the presets (a ResNet-50; other depths are refused);
  the generic builder's ResNet is ``resnet<DEPTH>`` (``18x`` .. ``152x``) unless
  ``MODEL.BACKBONE.ATTENTION.ARCH`` names one.
* ``MODEL.BACKBONE.LAST_STRIDE``: 1 or 2 for the generic builder; the presets are the papers'
  networks, last stride 1, and refuse 2.
* ``MODEL.BACKBONE.NORM``: :func:`norm_layer` maps ``BN``, ``syncBN``, ``FrozenBN`` and ``GN``.
  ``FrozenBN`` freezes the ResNet's norms only: the attention starts from random weights, so its
  norms stay trainable BatchNorm2d (frozen at initialisation they would be identity maps).
* ``MODEL.BACKBONE.PRETRAIN`` / ``PRETRAIN_PATH``: ImageNet weights for the ResNet from a local
  torchvision state_dict file; with an empty ``PRETRAIN_PATH``, torchvision's ``IMAGENET1K_V1``
  file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). Nothing is ever downloaded: a
  missing file raises ``FileNotFoundError`` saying how to fetch it. The attention starts random.
* ``MODEL.BACKBONE.FEAT_DIM`` must equal C (fast-reid's heads are built from it), and
  ``WITH_IBN`` / ``WITH_SE`` / ``WITH_NL`` (fast-reid's own ResNet options) must be off.

Every refusal is a ``ValueError`` naming the key, its value and what to set instead.

**Patches** (:func:`patch_for_torch2`, an explicit opt-in, undone by :func:`unpatch_for_torch2`):
what fast-reid 1.4.0 needs to run on torch 2 / Python >= 3.10, and on a machine without CUDA.
"""

from __future__ import annotations

import collections
import collections.abc
import importlib
import importlib.util
import logging
import math
import os
import subprocess
import sys
import types
import warnings
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .._extras import MissingExtraError, require

__all__ = [
    "BACKBONES",
    "NORMS",
    "PRESETS",
    "AttentionBackbone",
    "add_attention_config",
    "build_apnet_resnet50_backbone",
    "build_apnet_s_resnet50_backbone",
    "build_attention_backbone",
    "build_backbone",
    "build_cython_evaluator",
    "build_rga_c_resnet50_backbone",
    "build_rga_resnet50_backbone",
    "build_rga_s_resnet50_backbone",
    "input_size",
    "norm_layer",
    "patch_for_torch2",
    "prepare_output_dir",
    "register",
    "unpatch_for_torch2",
]

_EXTRA = "fastreid"
_INSTALL = f'pip install "reid-attention[{_EXTRA}]" && pip install --no-deps fastreid==1.4.0'
#: The preset builders (``MODEL.BACKBONE.NAME``) and the preset function and arguments each stands for.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "build_rga_resnet50_backbone": ("rga_resnet50", {}),
    "build_rga_s_resnet50_backbone": ("rga_resnet50", {"channel": False}),
    "build_rga_c_resnet50_backbone": ("rga_resnet50", {"spatial": False}),
    "build_apnet_resnet50_backbone": ("apnet_resnet50", {}),
    "build_apnet_s_resnet50_backbone": ("apnet_resnet50", {"variant": "s"}),
}
_GENERIC = "build_attention_backbone"
#: Every name :func:`register` puts in fast-reid's ``BACKBONE_REGISTRY``.
BACKBONES: tuple[str, ...] = (*PRESETS, _GENERIC)
#: fast-reid's ``MODEL.BACKBONE.NORM`` names that :func:`norm_layer` maps.
NORMS = ("BN", "syncBN", "FrozenBN", "GN")
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_log = logging.getLogger(__name__)


def _import(package: str, feature: str) -> types.ModuleType:
    """``package`` (fastreid or one of its modules), or a one-line MissingExtraError with the
    two-step install (the extra does not hold fastreid) or naming the dependency it lacks."""
    try:
        return require(package, feature=feature, extra=_EXTRA)
    except MissingExtraError:
        raise MissingExtraError(f"{feature} needs fastreid: {_INSTALL}", name="fastreid") from None
    except ModuleNotFoundError as err:  # fastreid is there, one of its dependencies not
        missing = (err.name or "a module").split(".")[0]
        if missing == "fastreid":
            raise MissingExtraError(f"{feature} needs fastreid: {_INSTALL}", name="fastreid") from None
        if missing == "torch":  # torch._six: fastreid.data imported before the patches
            raise ModuleNotFoundError(
                f"{feature}: fastreid 1.4.0 imports {err.name}, which torch 2 removed: call "
                "reid_attention.integrations.fastreid.patch_for_torch2() first", name=err.name
            ) from None
        raise MissingExtraError(
            f'{feature} needs {missing}, which fastreid imports: pip install "reid-attention[{_EXTRA}]"',
            name=missing,
        ) from None


# --------------------------------------------------------------------------------------------
# config -> arguments


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


def norm_layer(name: str) -> Optional[Callable[[int], nn.Module]]:
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

        return FrozenBatchNorm2d
    raise ValueError(
        f"MODEL.BACKBONE.NORM is {name!r}: the attention backbones take one of {', '.join(NORMS)}"
    )


def _depth(value: Any) -> int:
    text = str(value)
    digits = text.removesuffix("x")
    if not digits.isdigit():
        raise ValueError(f"MODEL.BACKBONE.DEPTH is {value!r}: expected fast-reid's form, e.g. '50x'")
    return int(digits)


def _attention_node(cfg: Any) -> Any:
    return getattr(cfg.MODEL.BACKBONE, "ATTENTION", None)


def _kwargs(cfg: Any) -> dict[str, Any]:
    node = _attention_node(cfg)
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


# --------------------------------------------------------------------------------------------
# the backbone


class AttentionBackbone(nn.Module):
    """A ResNet trunk (``conv1`` .. ``layer4``, attention inside) whose ``forward`` returns the
    layer4 map (B, ``num_features``, H, W): the backbone contract of fast-reid's heads. The
    state_dict keys are torchvision's (less ``fc.*``) plus the attention's, as in
    :mod:`reid_attention.presets`."""

    def __init__(self, trunk: nn.Module, num_features: int) -> None:
        super().__init__()
        for name in _TRUNK:
            self.add_module(name, getattr(trunk, name))
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        for name in _TRUNK:
            x = getattr(self, name)(x)
        return x


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


def _pretrained(cfg: Any, arch: str, norm: str) -> Optional[dict[str, Tensor]]:
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


def _freeze_norms(trunk: nn.Module) -> None:
    """Replace the BatchNorm2d modules of the trunk, not those of the inserted attention, by
    torchvision FrozenBatchNorm2d modules holding their statistics and affine parameters."""
    from torchvision.ops import FrozenBatchNorm2d

    from ..insert import fx_leaf_modules

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


def _check_common(cfg: Any, name: str) -> str:
    backbone = cfg.MODEL.BACKBONE
    for key in ("WITH_IBN", "WITH_SE", "WITH_NL"):
        if backbone.get(key, False):
            raise ValueError(f"MODEL.BACKBONE.{key} is on: fast-reid's own ResNet options; {name} builds a "
                             "torchvision ResNet with attention: set it False")
    stride = backbone.LAST_STRIDE
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE is {stride!r}: expected 1 or 2")
    norm = backbone.NORM
    norm_layer(norm)  # refuses unknown names
    return norm


def _check_feat_dim(cfg: Any, channels: int, what: str) -> None:
    if cfg.MODEL.BACKBONE.FEAT_DIM != channels:
        raise ValueError(
            f"MODEL.BACKBONE.FEAT_DIM is {cfg.MODEL.BACKBONE.FEAT_DIM}, but {what} ends in {channels} "
            f"channels: set MODEL.BACKBONE.FEAT_DIM: {channels} (fast-reid's heads are built from it)"
        )


def _build_preset(cfg: Any, name: str) -> AttentionBackbone:
    from .. import presets

    require("torchvision", feature=name, extra=_EXTRA)
    norm = _check_common(cfg, name)
    backbone = cfg.MODEL.BACKBONE
    if _depth(backbone.DEPTH) != 50:
        raise ValueError(f"MODEL.BACKBONE.DEPTH is {backbone.DEPTH!r}: {name} is a ResNet-50 (DEPTH: 50x); "
                         f"build_attention_backbone takes other depths")
    if backbone.LAST_STRIDE != 1:
        raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE is {backbone.LAST_STRIDE}: {name} is the paper's "
                         "network, last stride 1; build_attention_backbone takes LAST_STRIDE: 2")
    node = _attention_node(cfg)
    if node is not None and (node.KIND or node.ARCH or list(node.SITES)):
        raise ValueError("MODEL.BACKBONE.ATTENTION.KIND / ARCH / SITES are for build_attention_backbone; "
                         f"the preset {name} fixes all three (set them to '' / '' / [])")
    function, fixed = PRESETS[name]
    kwargs = {**_kwargs(cfg), **fixed}
    layer = norm_layer(norm)
    if layer is not None and norm != "FrozenBN":
        kwargs["norm_layer"] = layer
    weights = _pretrained(cfg, "resnet50", norm)  # loaded into BatchNorm2d norms, frozen after
    net = getattr(presets, function)(input_size=input_size(cfg), weights=weights, **kwargs)
    _check_feat_dim(cfg, net.num_features, name)
    if norm == "FrozenBN":
        _freeze_norms(net)
    return AttentionBackbone(net, net.num_features)


def _build_generic(cfg: Any) -> AttentionBackbone:
    from torchvision.models import ResNet, get_model

    import reid_attention as ra

    require("torchvision", feature=_GENERIC, extra=_EXTRA)
    norm = _check_common(cfg, _GENERIC)
    node = _attention_node(cfg)
    if node is None or not node.KIND:
        raise ValueError(
            f"{_GENERIC} reads the attention kind from MODEL.BACKBONE.ATTENTION.KIND: call "
            "reid_attention.integrations.fastreid.add_attention_config(cfg) before merging the config, and "
            f"set KIND to one of {', '.join(sorted(ra.list_attentions()))}"
        )
    kind = node.KIND
    if kind not in ra.list_attentions():
        raise ValueError(f"MODEL.BACKBONE.ATTENTION.KIND is {kind!r}: expected one of "
                         f"{', '.join(sorted(ra.list_attentions()))}")
    arch = node.ARCH or f"resnet{_depth(cfg.MODEL.BACKBONE.DEPTH)}"
    if arch not in _RESNETS:
        key = "MODEL.BACKBONE.ATTENTION.ARCH" if node.ARCH else "MODEL.BACKBONE.DEPTH"
        raise ValueError(f"{key} gives {arch!r}: {_GENERIC} builds a torchvision ResNet-family model, one of "
                         f"{', '.join(_RESNETS)}")
    size = input_size(cfg)
    layer = norm_layer(norm)
    custom = layer is not None and norm != "FrozenBN"  # FrozenBN: BatchNorm2d, frozen once built
    model = get_model(arch, weights=None, **({"norm_layer": layer} if custom else {}))
    assert isinstance(model, ResNet)
    weights = _pretrained(cfg, arch, norm)
    if weights is not None:
        model.load_state_dict(weights)
    ra.set_last_stride(model, cfg.MODEL.BACKBONE.LAST_STRIDE)
    sites = list(node.SITES) or None
    kwargs = _kwargs(cfg)
    if custom:
        kwargs.setdefault("norm_layer", layer)
    ra.insert_attention(model, kind, sites=sites, input_size=size, **kwargs)
    channels = model.fc.in_features
    _check_feat_dim(cfg, channels, f"{arch} with {kind}")
    if norm == "FrozenBN":
        _freeze_norms(model)
    return AttentionBackbone(model, channels)


def build_backbone(cfg: Any, name: Optional[str] = None) -> AttentionBackbone:
    """The backbone ``name`` (default ``cfg.MODEL.BACKBONE.NAME``; one of :data:`BACKBONES`) for
    a fast-reid config: what the registered builders call. Needs torchvision, not fastreid."""
    name = cfg.MODEL.BACKBONE.NAME if name is None else name
    if name == _GENERIC:
        return _build_generic(cfg)
    if name in PRESETS:
        return _build_preset(cfg, name)
    raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")


def build_rga_resnet50_backbone(cfg: Any) -> AttentionBackbone:
    """ResNet-50 with RGA-SC after layer1 .. layer4 (:func:`reid_attention.presets.rga_resnet50`)."""
    return build_backbone(cfg, "build_rga_resnet50_backbone")


def build_rga_s_resnet50_backbone(cfg: Any) -> AttentionBackbone:
    """ResNet-50 with RGA-S after layer1 .. layer4."""
    return build_backbone(cfg, "build_rga_s_resnet50_backbone")


def build_rga_c_resnet50_backbone(cfg: Any) -> AttentionBackbone:
    """ResNet-50 with RGA-C after layer1 .. layer4."""
    return build_backbone(cfg, "build_rga_c_resnet50_backbone")


def build_apnet_resnet50_backbone(cfg: Any) -> AttentionBackbone:
    """ResNet-50 with APNet-C after the stem and layer1 .. layer4
    (:func:`reid_attention.presets.apnet_resnet50`; ``KWARGS: {levels: 3}`` for another height)."""
    return build_backbone(cfg, "build_apnet_resnet50_backbone")


def build_apnet_s_resnet50_backbone(cfg: Any) -> AttentionBackbone:
    """ResNet-50 with APNet-S after the stem and layer1 .. layer4."""
    return build_backbone(cfg, "build_apnet_s_resnet50_backbone")


def build_attention_backbone(cfg: Any) -> AttentionBackbone:
    """A torchvision ResNet-family model with ``MODEL.BACKBONE.ATTENTION.KIND`` at
    ``ATTENTION.SITES`` (see :func:`add_attention_config`)."""
    return build_backbone(cfg, _GENERIC)


def register() -> list[str]:
    """Register :data:`BACKBONES` in fast-reid's ``BACKBONE_REGISTRY`` and return their names.
    Idempotent; a name fast-reid already has for something else is refused, never replaced.
    Needs fastreid (not :func:`patch_for_torch2`: ``fastreid.modeling`` imports on torch 2)."""
    backbones = _import("fastreid.modeling.backbones", "reid_attention.integrations.fastreid.register")
    registry = backbones.BACKBONE_REGISTRY
    functions = {name: globals()[name] for name in BACKBONES}
    taken = []
    for name, function in functions.items():
        try:
            present = registry.get(name)
        except KeyError:
            continue
        if present is not function:
            taken.append(name)
    if taken:
        raise ValueError(f"fast-reid's BACKBONE_REGISTRY already has {taken}; not replacing them")
    for name, function in functions.items():
        try:
            registry.get(name)
        except KeyError:
            registry.register(function)
    return list(BACKBONES)


def prepare_output_dir(cfg: Any) -> str:
    """Create ``cfg.OUTPUT_DIR`` and return it. fast-reid's ``default_setup`` (its
    ``tools/train_net.py``) does this; a ``DefaultTrainer(cfg)`` built without it fails writing
    ``OUTPUT_DIR/config.yaml`` when the directory is missing."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return cfg.OUTPUT_DIR


# --------------------------------------------------------------------------------------------
# patches


_undo: dict[str, Optional[Callable[[], None]]] = {}  # applied (or found unneeded) -> its undo
_settings = {"compile_evaluator": True}


def _shim_torch_six() -> Optional[Callable[[], None]]:
    """``torch._six`` (removed in torch 2.0), imported by ``fastreid.data.build`` for
    ``string_classes``: a module with what torch 1.x's held."""
    if "torch._six" in sys.modules:  # torch 1.x's, imported already, or someone else's stand-in
        return None
    try:
        native = importlib.util.find_spec("torch._six")
    except (ImportError, ValueError):
        native = None
    if native is not None:  # torch 1.x
        return None
    six = types.ModuleType("torch._six", "torch 1.x's torch._six for fastreid 1.4.0 (reid_attention)")
    six.string_classes = (str, bytes)
    six.int_classes = int
    six.inf, six.nan = math.inf, math.nan
    six.container_abcs = collections.abc
    sys.modules["torch._six"] = six

    def undo() -> None:
        if sys.modules.get("torch._six") is six:
            del sys.modules["torch._six"]
        if getattr(torch, "_six", None) is six:
            del torch._six

    return undo


def _alias_mapping() -> Optional[Callable[[], None]]:
    """``collections.Mapping`` (removed in Python 3.10), imported by ``fastreid.data.build`` and
    ``fastreid.evaluation.testing``: an alias of ``collections.abc.Mapping``."""
    if hasattr(collections, "Mapping"):
        return None
    collections.Mapping = collections.abc.Mapping

    def undo() -> None:
        if getattr(collections, "Mapping", None) is collections.abc.Mapping:
            del collections.Mapping

    return undo


def _cpu_safe(original: type) -> type:
    from torch.utils.data import DataLoader

    class DataLoaderX(original):
        """fast-reid's DataLoaderX where CUDA is available (a CUDA stream and a thread prefetch
        the batches onto the GPU); without CUDA, where it cannot even be built (it creates a
        ``torch.cuda.Stream``), a plain DataLoader with the same arguments (no pinned memory)."""

        def __init__(self, local_rank, **kwargs):
            if torch.cuda.is_available():
                super().__init__(local_rank, **kwargs)
                return
            kwargs["pin_memory"] = False
            DataLoader.__init__(self, **kwargs)
            self.stream = None
            self.local_rank = local_rank

        def __iter__(self):
            if self.stream is None:
                return DataLoader.__iter__(self)
            return super().__iter__()

        def shutdown(self):
            if self.stream is not None:
                super().shutdown()

    DataLoaderX.__qualname__ = f"cpu_safe({original.__qualname__})"
    return DataLoaderX


def _replace_data_loader() -> Callable[[], None]:
    """``fastreid.data``'s DataLoaderX (used by the train and test loaders) -> :func:`_cpu_safe`."""
    data_utils = _import("fastreid.data.data_utils", "patch_for_torch2")
    build = _import("fastreid.data.build", "patch_for_torch2")
    original = data_utils.DataLoaderX
    safe = _cpu_safe(original)
    data_utils.DataLoaderX = build.DataLoaderX = safe

    def undo() -> None:
        for module in (data_utils, build):
            if module.DataLoaderX is safe:
                module.DataLoaderX = original

    return undo


def build_cython_evaluator(directory: Optional[str] = None) -> bool:
    """Compile fast-reid's Cython rank evaluation (``fastreid/evaluation/rank_cylib``, or
    ``directory``) in place with this interpreter; whether it worked. fast-reid's own
    ``compile_helper`` runs ``make``, i.e. ``python3 setup.py build_ext`` with whatever
    ``python3`` is first on PATH, and ends the process (``sys.exit(1)``) when that fails."""
    if directory is None:
        cylib = _import("fastreid.evaluation.rank_cylib", "build_cython_evaluator")
        directory = os.path.dirname(cylib.__file__)
    if importlib.util.find_spec("Cython") is None:
        warnings.warn("fast-reid's Cython evaluation is not compiled and Cython is not installed: fast-reid "
                      'evaluates in Python (same results, slower); pip install "reid-attention[fastreid]"',
                      stacklevel=2)
        return False
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=directory,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        warnings.warn(f"compiling fast-reid's Cython evaluation in {directory} failed ({' / '.join(tail)}): "
                      "fast-reid evaluates in Python (same results, slower)", stacklevel=2)
        return False
    importlib.invalidate_caches()
    return True


def _compile_helper() -> None:
    """fast-reid's ``compile_helper``, without ending the process: compile (if enabled) or warn."""
    if _settings["compile_evaluator"]:
        build_cython_evaluator()
    else:
        _log.info("fast-reid's Cython evaluation is not compiled (compile_evaluator=False): "
                  "fast-reid evaluates in Python")


def _replace_compile_helper() -> Callable[[], None]:
    """``ReidEvaluator`` compiles the Cython evaluation at construction with ``compile_helper``,
    which calls ``sys.exit(1)`` on failure -> :func:`_compile_helper`."""
    evaluation = _import("fastreid.evaluation.reid_evaluation", "patch_for_torch2")
    original = evaluation.compile_helper
    evaluation.compile_helper = _compile_helper

    def undo() -> None:
        if evaluation.compile_helper is _compile_helper:
            evaluation.compile_helper = original

    return undo


_PATCHES = {
    "torch._six": _shim_torch_six,
    "collections.Mapping": _alias_mapping,
    "fastreid.data.DataLoaderX": _replace_data_loader,
    "fastreid.evaluation.compile_helper": _replace_compile_helper,
}


def patch_for_torch2(*, compile_evaluator: bool = True) -> list[str]:
    """Make fast-reid 1.4.0 run on torch 2, Python >= 3.10 and machines without CUDA; return the
    names of the patches this call applied (none when applied already: it is idempotent).

    fast-reid's release predates torch 2 and cannot be installed with its pins on Python 3.11, so
    this is an explicit opt-in, process-wide, undone by :func:`unpatch_for_torch2`. Call it before
    importing ``fastreid.data``, ``fastreid.engine`` or ``fastreid.evaluation``:

    * ``torch._six``: removed in torch 2.0, imported by ``fastreid.data.build``: a stand-in module
      (``string_classes``, ``int_classes``, ``inf``, ``nan``, ``container_abcs``) in
      ``sys.modules``. Skipped where torch has it.
    * ``collections.Mapping``: removed in Python 3.10, imported by ``fastreid.data.build`` and
      ``fastreid.evaluation.testing``: an alias of ``collections.abc.Mapping``. Skipped where
      present.
    * ``fastreid.data.DataLoaderX``: fast-reid's train and test loaders create a
      ``torch.cuda.Stream`` and a CUDA prefetch thread, which fail without CUDA: replaced by a
      subclass that is fast-reid's loader where CUDA is available and a plain DataLoader
      otherwise.
    * ``fastreid.evaluation.compile_helper``: ``ReidEvaluator`` compiles the Cython evaluation on
      first use by running ``make`` (``python3`` from PATH, which may lack Cython or numpy) and
      calls ``sys.exit(1)`` if that fails. Replaced by :func:`build_cython_evaluator` (this
      interpreter; a warning, not an exit, on failure) when ``compile_evaluator`` (default), or by
      nothing; either way a failed or skipped compile leaves fast-reid's Python evaluation, same
      CMC and mAP, slower. The compiled module is written into the installed fastreid package,
      once.

    Not patched: ``cfg.OUTPUT_DIR`` must exist before ``DefaultTrainer(cfg)`` (fast-reid's
    ``default_setup`` or :func:`prepare_output_dir` creates it), and ``MODEL.DEVICE: cpu`` is a
    config setting.
    """
    if not isinstance(compile_evaluator, bool):
        raise TypeError(f"compile_evaluator must be a bool, got {type(compile_evaluator).__name__}")
    _import("fastreid", "reid_attention.integrations.fastreid.patch_for_torch2")
    _settings["compile_evaluator"] = compile_evaluator
    applied = []
    for name, patch in _PATCHES.items():
        if name in _undo:
            continue
        _undo[name] = patch()
        if _undo[name] is not None:
            applied.append(name)
    return applied


def unpatch_for_torch2() -> list[str]:
    """Undo :func:`patch_for_torch2` (what it applied, in reverse order); return the names undone.
    fastreid modules imported meanwhile keep what they imported (their ``Mapping``,
    ``string_classes``): fastreid needs the patches for as long as it is used."""
    undone = []
    for name in reversed(list(_undo)):
        undo = _undo.pop(name)
        if undo is not None:
            undo()
            undone.append(name)
    return undone
