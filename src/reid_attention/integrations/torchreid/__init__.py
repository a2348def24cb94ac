"""deep-person-reid (``torchreid``) models with attention, and its checkpoints on torch >= 2.6.

Needs the ``torchreid`` extra (``pip install "reid-attention[torchreid]"``: torchreid 0.2.5 from
PyPI, the dependencies its wheel does not declare -- scipy, opencv-python-headless, gdown,
tensorboard -- and torchvision). Tested with torchreid 0.2.5, torch 2.14, torchvision 0.29.

Recipe (``docs/integrations.md`` has the whole script)::

    import torchreid
    from reid_attention.integrations.torchreid import register_models

    register_models(input_size=(256, 128))        # = ImageDataManager(height=256, width=128)
    datamanager = torchreid.data.ImageDataManager(root="reid-data", sources="market1501",
                                                  height=256, width=128)
    model = torchreid.models.build_model("rga_resnet50", datamanager.num_train_pids,
                                         loss="softmax", pretrained=True)

**Names** (:func:`model_names`): the presets ``rga_resnet50`` (RGA-SC), ``rga_s_resnet50``,
``rga_c_resnet50``, ``apnet_resnet50`` (APNet-C), ``apnet_s_resnet50`` (see
:mod:`reid_attention.presets`), and ``<backbone>_<kind>`` for every torchvision classification
model and every attention kind of :func:`reid_attention.list_attentions`: ``resnet50_rga_sc``,
``resnet50_pfsa``, ``resnet101_apnet_c``, ``densenet121_apnet_s`` ... (attention after the
default sites of :func:`reid_attention.insert_attention`; a backbone without 2-D feature maps,
such as ViT, fails when built, with the shape probe's message).

**The model** (:class:`TorchreidModel`) follows torchreid's contract: built as
``fn(num_classes, loss="softmax", pretrained=True, use_gpu=True, **kwargs)`` (the keyword
arguments torchreid's ``build_model`` passes); in training mode ``forward`` returns the logits for
``loss="softmax"`` and ``(logits, features)`` for ``loss="triplet"`` (what ``ImageSoftmaxEngine``
and ``ImageTripletEngine`` unpack); in eval mode it returns the BNNeck features that torchreid's
evaluator ranks. The head is a BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep
Person Re-identification", CVPRW 2019, arXiv:1903.07071): global average pooling, a BatchNorm1d
whose bias is fixed at zero, a bias-free classifier; the triplet loss takes the features before
the BatchNorm, the classifier and evaluation those after it.

**Input size.** RGA and APNet-S weights are built for one feature-map size, so the model is built
for one image size: ``input_size=(H, W)`` (default 256x128, torchreid's default) must equal the
data manager's ``ImageDataManager(height=H, width=W)``. torchreid's ``build_model`` passes no
extra arguments, so :func:`register_models` takes the size once for every name it registers;
another size is refused at the first forward with the layer's message naming both sizes
(:func:`reid_attention.resize_attention` moves a built model to another size).

**Pretrained weights** are torchvision's ImageNet weights (``IMAGENET1K_V1`` where the
architecture has them, its default weights otherwise), read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``). Nothing is downloaded unless asked (``download=True``): a
missing file raises ``FileNotFoundError`` naming the file and the one call that fetches it. The
attention layers and the head start from random weights either way.

**Checkpoints.** torchreid's ``utils.load_checkpoint`` (so ``resume_from_checkpoint`` and
``load_pretrained_weights`` too) calls ``torch.load`` without ``weights_only``; since torch 2.6
that means ``weights_only=True``, which refuses the numpy scalar (``rank1``) torchreid's engines
save. :func:`load_checkpoint` loads those files safely.
"""


from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..._checks import SizeLike, pair
from ..._extras import require
from ._checkpoint import load_checkpoint
from ._names import EXTRA, PRESETS, import_torchreid, model_names, parse_name

__all__ = [
    "PRESETS",
    "TorchreidModel",
    "create_model",
    "load_checkpoint",
    "model_names",
    "parse_name",
    "register_models",
]

LOSSES = ("softmax", "triplet")


# --------------------------------------------------------------------------------------------
# the model


class _BNNeck(nn.BatchNorm1d):
    """BatchNorm1d with its bias fixed at zero (BNNeck). The bias is a buffer, not a frozen
    parameter, so torchreid's ``open_all_layers`` (run at every epoch) cannot make it trainable;
    the state_dict keys stay a BatchNorm1d's."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        del self.bias
        self.register_buffer("bias", torch.zeros(num_features))


class _PooledMap(nn.Module):
    """A torchvision backbone cut after its last feature map (torch.fx, torchvision's
    ``create_feature_extractor``), then global average pooling: images -> (B, C)."""

    def __init__(self, body: nn.Module, node: str, layout: str) -> None:
        super().__init__()
        self.body = body
        self.node = node
        self.dims = (1, 2) if layout == "NHWC" else (2, 3)

    def forward(self, x: Tensor) -> Tensor:
        maps: dict[str, Tensor] = self.body(x)
        return maps[self.node].mean(self.dims)


class TorchreidModel(nn.Module):
    """A re-ID network in torchreid's contract: ``backbone`` (images -> (B, ``feature_dim``)
    pooled features), ``bnneck`` (BatchNorm1d, bias fixed at zero), ``classifier`` (bias-free
    linear; the name torchreid's ``open_layers="classifier"`` and ``count_num_param`` expect).

    ``forward(x)``: training mode -> logits (``loss="softmax"``) or ``(logits, features)``
    (``loss="triplet"``, features before the BNNeck); eval mode -> the BNNeck's output, the
    features torchreid's evaluator ranks.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 loss: str = "softmax") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} (torchreid's engines), got {loss!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.loss = loss
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.bnneck = _BNNeck(feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        features: Tensor = self.backbone(x)
        neck: Tensor = self.bnneck(features)
        if not self.training:
            return neck
        logits: Tensor = self.classifier(neck)
        return logits if self.loss == "softmax" else (logits, features)


def _imagenet_weights(arch: str, download: bool) -> Any:
    """torchvision's ImageNet weights enum member for ``arch``, checked to be in the torch hub
    cache unless ``download`` (torchvision then fetches a missing file)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    weights = getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not download and not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained=True reads the ImageNet weights of {arch} ({weights}) from the torch hub cache, "
            f"not found at {path}: fetch them once with torchvision.models.get_model({arch!r}, "
            f"weights={weights.name!r}), or register_models(download=True), or pass pretrained=False"
        )
    return weights


def _leaf_modules(model: nn.Module) -> list[type]:
    """Classes torch.fx must not trace into: the inserted layers (they validate their input in
    Python), and any site module that calls its attention from its own forward (DenseNet's
    ``norm5``); Sequential sites are traced as usual."""
    from ...insert import fx_leaf_modules

    leaves = list(fx_leaf_modules(model))
    for module in model.modules():
        if (isinstance(getattr(module, "attention", None), nn.Module)
                and not isinstance(module, nn.Sequential)
                and not isinstance(module, tuple(leaves))):
            leaves.append(type(module))
    return leaves


def _backbone(
    arch: str, kind: str, input_size: tuple[int, int], pretrained: bool, download: bool,
    last_stride: int | None, sites: Sequence[str] | None, kwargs: dict[str, Any],
) -> tuple[nn.Module, int]:
    """torchvision ``arch`` with ``kind`` inserted, cut after its last feature map, pooled."""
    from torchvision.models import get_model
    from torchvision.models.feature_extraction import create_feature_extractor

    import reid_attention as ra

    model = get_model(arch, weights=_imagenet_weights(arch, download) if pretrained else None)
    if last_stride is not None:
        ra.set_last_stride(model, last_stride)
    last = ra.list_sites(model, input_size)[-1]  # stage ends in execution order: the final map
    ra.insert_attention(model, kind, sites=sites, input_size=input_size, **kwargs)
    body = create_feature_extractor(model, {last.name: "map"},
                                    tracer_kwargs={"leaf_modules": _leaf_modules(model)})
    return _PooledMap(body, "map", last.layout), last.channels


def create_model(
    name: str,
    num_classes: int,
    loss: str = "softmax",
    pretrained: bool = True,
    use_gpu: bool = True,
    *,
    input_size: SizeLike = (256, 128),
    download: bool = False,
    last_stride: int | None = None,
    sites: Sequence[str] | None = None,
    **kwargs: Any,
) -> TorchreidModel:
    """Build the model ``name`` (see :func:`model_names`) as torchreid's factories do; the
    functions :func:`register_models` registers call this. Needs torchvision, not torchreid.

    Args:
        name: a preset (``"rga_resnet50"``) or ``"<torchvision backbone>_<kind>"``.
        num_classes: training identities (torchreid: ``datamanager.num_train_pids``).
        loss: ``"softmax"`` or ``"triplet"``: what forward returns in training (module docstring).
        pretrained: ImageNet weights for the backbone from the torch hub cache (module docstring).
        use_gpu: accepted for torchreid's signature and ignored: torchreid's scripts move the model.
        input_size: (H, W) of the images, equal to ``ImageDataManager(height=H, width=W)``.
        download: let torchvision download missing ImageNet weights (``pretrained=True`` only).
        last_stride: torchvision backbones of the ResNet family only: 1 for the re-ID "last
            stride 1" (:func:`reid_attention.set_last_stride`); None keeps torchvision's. The
            presets always use last stride 1, as the papers do.
        sites: torchvision backbones only: where the attention goes (default: the stage ends,
            see :func:`reid_attention.insert_attention`).
        **kwargs: passed to the preset function or to :func:`reid_attention.insert_attention`
            (e.g. ``impl``, ``memory``, ``channel_ratio``, ``levels`` for the APNet presets).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} (torchreid's engines), got {loss!r}")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be a bool, got {type(pretrained).__name__}")
    size = pair("input_size", input_size)
    require("torchvision", feature=f"model {name!r}", extra=EXTRA)
    arch, kind = parse_name(name)
    if arch == "preset":
        from ... import presets

        if last_stride is not None or sites is not None:
            raise TypeError(f"last_stride and sites are for torchvision backbones; "
                            f"the preset {name!r} fixes both")
        function, fixed = PRESETS[name]
        weights = _imagenet_weights("resnet50", download) if pretrained else None
        backbone = getattr(presets, function)(input_size=size, weights=weights, **fixed, **kwargs)
        feature_dim = backbone.num_features
    else:
        backbone, feature_dim = _backbone(arch, kind, size, pretrained, download, last_stride, sites, kwargs)
    return TorchreidModel(backbone, feature_dim, num_classes, loss)


# --------------------------------------------------------------------------------------------
# registration


class _Factory:
    """A torchreid model factory for one name, with the registration's defaults."""

    def __init__(self, name: str, input_size: tuple[int, int], download: bool) -> None:
        self.name, self.input_size, self.download = name, input_size, download

    def __call__(self, num_classes: int, loss: str = "softmax", pretrained: bool = True, use_gpu: bool = True,
                 **kwargs: Any) -> TorchreidModel:
        kwargs.setdefault("input_size", self.input_size)
        kwargs.setdefault("download", self.download)
        return create_model(self.name, num_classes, loss, pretrained, use_gpu, **kwargs)

    def __repr__(self) -> str:
        return f"reid_attention torchreid factory {self.name!r} (input_size={self.input_size})"


def register_models(
    names: Sequence[str] | None = None, *, input_size: SizeLike = (256, 128), download: bool = False
) -> list[str]:
    """Register models in torchreid's model factory (``torchreid.models.build_model(name, ...)``)
    and return their names.

    Args:
        names: what to register (default: every name of :func:`model_names`); each is checked.
        input_size: (H, W) every registered model is built for; must equal the data manager's
            ``height``/``width`` (module docstring). A call again with another size re-registers.
        download: let ``pretrained=True`` download missing ImageNet weights (default: the torch
            hub cache only).

    Names torchreid already has (its own ``resnet50`` ...) are refused, never replaced.
    """
    feature = "reid_attention.integrations.torchreid.register_models"
    torchreid = import_torchreid(feature)
    size = pair("input_size", input_size)
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {type(download).__name__}")
    if names is None:
        names = model_names()
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    for name in names:
        parse_name(name)
    factory = vars(torchreid.models)["__model_factory"]  # the dict build_model looks names up in
    taken = [n for n in names if n in factory and not isinstance(factory[n], _Factory)]
    if taken:
        raise ValueError(f"torchreid already has models named {taken}; not replacing them")
    for name in names:
        factory[name] = _Factory(name, size, download)
    return names
