"""The papers' networks on a torchvision ResNet-50 (torchvision, the ``vision`` extra, is
imported when one is built).

* :func:`rga_resnet50`: RGA (Zhang et al., CVPR 2020, arXiv:1904.02998) after layer1 .. layer4,
  last stride 1, input 256x128, as in the paper and the official RGA_Branch.
* :func:`apnet_resnet50`: APNet (Chen et al., TIP 2021, arXiv:2108.05340): an attention pyramid
  after the stem (conv1-bn1-maxpool; the official code drops the stem ReLU) and after layer1 ..
  layer4, last stride 1, input 384x192, as in the official ``Baseline``.

Both are built by :func:`reid_attention.insert_attention` on ``torchvision.models.resnet50`` and
returned as a :class:`ReIDResNet`: the ResNet's own modules under their torchvision names
(``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` .. ``layer4``; no ``avgpool``/``fc``), so
the state_dict keys are torchvision's (less ``fc.*``) plus the attention's:

* RGA: ``layer{i}.attention.<official RGA_Module names>`` (``theta_spatial.0.weight`` ...);
* APNet-C: ``maxpool.attention.*`` and ``layer{i}.attention.*`` with :class:`~reid_attention.APNetC`
  names (``se.fc.0.weight``, ``split.0.fc1.weight`` ...); APNet-S: :class:`~reid_attention.APNetS`
  names (``levels.1.0.theta_spatial.0.weight`` ...).

Heads (BNNeck, classifier) are left to the user: ``forward`` returns pooled (B, 2048) features.
Official checkpoints convert with :mod:`reid_attention.convert`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, cast

from torch import Tensor, nn

from ._attach import attach
from ._checks import SizeLike
from ._extras import require
from ._probe import inserted_names
from ._resnet import set_last_stride
from .convert import describe_keys

__all__ = ["VARIANTS", "ReIDResNet", "apnet_resnet50", "rga_resnet50"]

#: The papers' named networks, as the toolbox integrations (timm, torchreid, fast-reid) register
#: them: name -> (preset function, the arguments that name fixes).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rga_resnet50": ("rga_resnet50", {"spatial": True, "channel": True}),
    "rga_s_resnet50": ("rga_resnet50", {"spatial": True, "channel": False}),
    "rga_c_resnet50": ("rga_resnet50", {"spatial": False, "channel": True}),
    "apnet_resnet50": ("apnet_resnet50", {"variant": "c"}),
    "apnet_s_resnet50": ("apnet_resnet50", {"variant": "s"}),
}

_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_LAYERS = ["layer1", "layer2", "layer3", "layer4"]


class ReIDResNet(nn.Module):
    """A ResNet trunk (``conv1`` .. ``layer4``, attention inside) with global average pooling.

    ``forward_features(x)`` -> the layer4 map (B, C, H, W); ``forward(x)`` -> (B, C) features,
    its spatial mean. ``num_features`` is C (2048 for ResNet-50).
    """

    def __init__(self, resnet: nn.Module) -> None:
        """Take the trunk of a torchvision ResNet (or of another ReIDResNet, sharing it)."""
        super().__init__()
        for name in _TRUNK:
            self.add_module(name, getattr(resnet, name))
        self.num_features: int = (
            resnet.num_features if isinstance(resnet, ReIDResNet) else cast(nn.Linear, resnet.fc).in_features
        )

    def forward_features(self, x: Tensor) -> Tensor:
        for name in _TRUNK:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean((2, 3))


def _resnet50(weights: object, norm_layer: Callable[[int], nn.Module] | None) -> nn.Module:
    """torchvision's ResNet-50 with last stride 1: ImageNet weights from a torchvision weights
    enum (or its name), random init for None or a state_dict (loaded into the finished preset)."""
    from torchvision.models import WeightsEnum, resnet50

    if weights is not None and not isinstance(weights, (Mapping, WeightsEnum, str)):
        raise TypeError(
            "weights must be None, a torchvision weights enum (e.g. ResNet50_Weights.IMAGENET1K_V2) "
            f"or a state_dict, got {type(weights).__name__}"
        )
    norm = {} if norm_layer is None else {"norm_layer": norm_layer}  # torchvision's default otherwise
    model = resnet50(weights=None if isinstance(weights, Mapping) else weights, **norm)
    return set_last_stride(model, 1)


def _load(model: ReIDResNet, state_dict: Mapping[str, Tensor]) -> None:
    """Load a torchvision ResNet-50 state_dict (``fc.*`` ignored) or a full preset state_dict:
    every backbone key is required, attention keys are optional (random init where absent)."""
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    attention = tuple(f"{name}." for name in inserted_names(model))
    problems = {
        "unexpected keys": [k for k in state if k not in expected],
        "missing backbone keys": [
            k
            for k in expected
            if k not in state and not k.startswith(attention) and not k.endswith("num_batches_tracked")
        ],
    }
    if any(problems.values()):
        raise ValueError("weights do not fit the preset: " + describe_keys(problems))
    model.load_state_dict(state, strict=False)


def _finish(
    model: nn.Module, weights: object, attention: str, sites: Sequence[str], input_size: SizeLike, call: str,
    **kwargs: Any,
) -> ReIDResNet:
    """Insert the attention (build errors say to pass arguments through ``call``, the preset's
    own call), wrap, load a state_dict."""
    attach(model, attention, sites=sites, input_size=input_size, kwargs=kwargs, call=call)
    net = ReIDResNet(model)
    if isinstance(weights, Mapping):
        _load(net, weights)
    return net


def rga_resnet50(
    *,
    input_size: SizeLike = (256, 128),
    spatial: bool = True,
    channel: bool = True,
    weights: object | None = None,
    **rga_kwargs: Any,
) -> ReIDResNet:
    """ResNet-50 (last stride 1) with RGA after layer1 .. layer4: the RGA paper's network.

    Args:
        input_size: (H, W) of the images; the RGA weights depend on it (paper: 256x128, maps
            64x32, 32x16, 16x8, 16x8). Any size builds (inner widths have a floor); for another
            size later, :func:`reid_attention.resize_attention` resamples the built weights.
        spatial / channel: RGA-S, RGA-C or both (RGA-SC, the paper's main model).
        weights: None (random init), a torchvision weights enum for the ResNet-50 (ImageNet), or a
            state_dict: a torchvision ResNet-50's (``fc.*`` ignored) or this model's, e.g. from
            :func:`reid_attention.convert.from_official_rga`.
        **rga_kwargs: channel_ratio, spatial_ratio, down_ratio, impl, memory (see
            :class:`~reid_attention.RGA`); ``norm_layer`` is used by the ResNet-50 too.
    """
    require("torchvision", feature="ra.presets.rga_resnet50", extra="vision")
    kind = {(True, True): "rga_sc", (True, False): "rga_s", (False, True): "rga_c"}.get(
        (bool(spatial), bool(channel))
    )
    if kind is None:
        raise ValueError("rga_resnet50 needs spatial=True, channel=True or both")
    call = "ra.presets.rga_resnet50(..., **rga_kwargs)"
    model = _resnet50(weights, rga_kwargs.get("norm_layer"))
    return _finish(model, weights, kind, _LAYERS, input_size, call, **rga_kwargs)


def apnet_resnet50(
    *,
    levels: int = 2,
    input_size: SizeLike = (384, 192),
    variant: str = "c",
    stem_relu: bool = False,
    weights: object | None = None,
    level: int | None = None,
    **attention_kwargs: Any,
) -> ReIDResNet:
    """ResNet-50 (last stride 1) with an attention pyramid after the stem and layer1 .. layer4.

    Args:
        levels: pyramid height (official: 2), as :class:`~reid_attention.APNetC` and
            :class:`~reid_attention.APNetS` name it.
        input_size: (H, W) of the images (official 384x192); APNet-S weights depend on it
            (:func:`reid_attention.resize_attention` moves them to another size).
        variant: ``"c"`` (:class:`~reid_attention.APNetC`, the official channel version) or ``"s"``
            (:class:`~reid_attention.APNetS`, RGA-S agents per stripe).
        stem_relu: keep the stem's ReLU; the official model has none (conv1-bn1-maxpool).
        weights: None, a torchvision weights enum, or a state_dict (torchvision's or this model's,
            e.g. from :func:`reid_attention.convert.from_official_apnet`).
        level: the deprecated name of ``levels`` (works for one more release, with a
            ``DeprecationWarning``).
        **attention_kwargs: passed to every APNetC / APNetS (e.g. ``impl``, ``se_hidden``);
            ``norm_layer`` is used by the ResNet-50 too.
    """
    if level is not None:
        if levels not in (2, level):  # 2: the default, so levels was not given (or agrees)
            raise TypeError(
                f"apnet_resnet50 got levels={levels} and level={level}: pass levels only (level is "
                "its deprecated name)"
            )
        warnings.warn(
            "apnet_resnet50(level=...) is deprecated and will be removed in the next release: pass "
            "levels=... (the name APNetC and APNetS use)",
            DeprecationWarning,
            stacklevel=2,
        )
        levels = level
    require("torchvision", feature="ra.presets.apnet_resnet50", extra="vision")
    names = {"c": "apnet_c", "s": "apnet_s"}
    if variant not in names:
        raise ValueError(f"variant must be 'c' or 's', got {variant!r}")
    if not isinstance(stem_relu, bool):
        raise TypeError(f"stem_relu must be a bool, got {type(stem_relu).__name__}")
    model = _resnet50(weights, attention_kwargs.get("norm_layer"))
    if not stem_relu:
        model.relu = nn.Identity()
    call = "ra.presets.apnet_resnet50(..., **attention_kwargs)"
    return _finish(
        model, weights, names[variant], ["maxpool"] + _LAYERS, input_size, call, levels=levels,
        **attention_kwargs
    )
