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

import os
from typing import Any

from torch import Tensor, nn

from ..._extras import require
from ...presets import VARIANTS
from ._config import (
    NORMS,
    add_attention_config,
    attention_kwargs,
    attention_node,
    depth,
    input_size,
    norm_layer,
)
from ._deps import EXTRA, import_fastreid
from ._patches import build_cython_evaluator, patch_for_torch2, unpatch_for_torch2
from ._weights import freeze_norms, pretrained_weights

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
    f"build_{name}_backbone": variant for name, variant in VARIANTS.items()
}
_GENERIC = "build_attention_backbone"
#: Every name :func:`register` puts in fast-reid's ``BACKBONE_REGISTRY``.
BACKBONES: tuple[str, ...] = (*PRESETS, _GENERIC)
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


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


def _check_common(cfg: Any, name: str) -> str:
    backbone = cfg.MODEL.BACKBONE
    for key in ("WITH_IBN", "WITH_SE", "WITH_NL"):
        if backbone.get(key, False):
            raise ValueError(f"MODEL.BACKBONE.{key} is on: fast-reid's own ResNet options; {name} builds a "
                             "torchvision ResNet with attention: set it False")
    stride = backbone.LAST_STRIDE
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE is {stride!r}: expected 1 or 2")
    norm: str = backbone.NORM
    norm_layer(norm)  # refuses unknown names
    return norm


def _check_feat_dim(cfg: Any, channels: int, what: str) -> None:
    if cfg.MODEL.BACKBONE.FEAT_DIM != channels:
        raise ValueError(
            f"MODEL.BACKBONE.FEAT_DIM is {cfg.MODEL.BACKBONE.FEAT_DIM}, but {what} ends in {channels} "
            f"channels: set MODEL.BACKBONE.FEAT_DIM: {channels} (fast-reid's heads are built from it)"
        )


def _build_preset(cfg: Any, name: str) -> AttentionBackbone:
    from ... import presets

    require("torchvision", feature=name, extra=EXTRA)
    norm = _check_common(cfg, name)
    backbone = cfg.MODEL.BACKBONE
    if depth(backbone.DEPTH) != 50:
        raise ValueError(f"MODEL.BACKBONE.DEPTH is {backbone.DEPTH!r}: {name} is a ResNet-50 (DEPTH: 50x); "
                         f"build_attention_backbone takes other depths")
    if backbone.LAST_STRIDE != 1:
        raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE is {backbone.LAST_STRIDE}: {name} is the paper's "
                         "network, last stride 1; build_attention_backbone takes LAST_STRIDE: 2")
    node = attention_node(cfg)
    if node is not None and (node.KIND or node.ARCH or list(node.SITES)):
        raise ValueError("MODEL.BACKBONE.ATTENTION.KIND / ARCH / SITES are for build_attention_backbone; "
                         f"the preset {name} fixes all three (set them to '' / '' / [])")
    function, fixed = PRESETS[name]
    kwargs = {**attention_kwargs(cfg), **fixed}
    layer = norm_layer(norm)
    if layer is not None and norm != "FrozenBN":
        kwargs["norm_layer"] = layer
    weights = pretrained_weights(cfg, "resnet50", norm)  # loaded into BatchNorm2d norms, frozen after
    net = getattr(presets, function)(input_size=input_size(cfg), weights=weights, **kwargs)
    _check_feat_dim(cfg, net.num_features, name)
    if norm == "FrozenBN":
        freeze_norms(net)
    return AttentionBackbone(net, net.num_features)


def _build_generic(cfg: Any) -> AttentionBackbone:
    from torchvision.models import ResNet, get_model

    import reid_attention as ra

    require("torchvision", feature=_GENERIC, extra=EXTRA)
    norm = _check_common(cfg, _GENERIC)
    node = attention_node(cfg)
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
    arch = node.ARCH or f"resnet{depth(cfg.MODEL.BACKBONE.DEPTH)}"
    if arch not in _RESNETS:
        key = "MODEL.BACKBONE.ATTENTION.ARCH" if node.ARCH else "MODEL.BACKBONE.DEPTH"
        raise ValueError(f"{key} gives {arch!r}: {_GENERIC} builds a torchvision ResNet-family model, one of "
                         f"{', '.join(_RESNETS)}")
    size = input_size(cfg)
    layer = norm_layer(norm)
    custom = layer is not None and norm != "FrozenBN"  # FrozenBN: BatchNorm2d, frozen once built
    model = get_model(arch, weights=None, **({"norm_layer": layer} if custom else {}))
    assert isinstance(model, ResNet)
    weights = pretrained_weights(cfg, arch, norm)
    if weights is not None:
        model.load_state_dict(weights)
    ra.set_last_stride(model, cfg.MODEL.BACKBONE.LAST_STRIDE)
    sites = list(node.SITES) or None
    kwargs = attention_kwargs(cfg)
    if custom:
        kwargs.setdefault("norm_layer", layer)
    ra.insert_attention(model, kind, sites=sites, input_size=size, **kwargs)
    channels = model.fc.in_features
    _check_feat_dim(cfg, channels, f"{arch} with {kind}")
    if norm == "FrozenBN":
        freeze_norms(model)
    return AttentionBackbone(model, channels)


def build_backbone(cfg: Any, name: str | None = None) -> AttentionBackbone:
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
    backbones = import_fastreid("fastreid.modeling.backbones",
                                "reid_attention.integrations.fastreid.register")
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
    output_dir: str = cfg.OUTPUT_DIR
    return output_dir
