"""The presets as timm models: ``import reid_attention.timm_models`` registers them with timm.

Importing this module (timm and torchvision needed: ``pip install "reid-attention[timm]"``) is the
registration; there is no separate call. ``import reid_attention`` alone never imports timm. Then::

    timm.create_model("rga_resnet50", num_classes=751)        # (B, 751) logits
    timm.create_model("rga_resnet50")                          # num_classes=0: (B, 2048) features
    timm.create_model("rga_resnet50", features_only=True)      # 5 maps, reductions 2, 4, 8, 16, 16

* ``rga_resnet50``: RGA-SC after layer1 .. layer4 (:func:`~reid_attention.presets.rga_resnet50`);
* ``rga_s_resnet50``: RGA-S only (``channel=False``); ``rga_c_resnet50``: RGA-C only (``spatial=False``);
* ``apnet_resnet50``: APNet-C, levels=2 (:func:`~reid_attention.presets.apnet_resnet50`);
* ``apnet_s_resnet50``: APNet-S, levels=2 (``variant="s"``).

Every model is a :class:`TimmReIDResNet`: the preset's trunk (torchvision names: ``conv1``, ``bn1``,
``relu``, ``maxpool``, ``layer1`` .. ``layer4``, the attention inside), then ``global_pool`` and
``fc``, so its state_dict is the preset's plus ``fc.*``, the keys of a torchvision ResNet-50.

* ``img_size=(H, W)`` builds the size-tied attention for that input (default: the paper's size,
  256x128 for RGA, 384x192 for APNet, the default cfg's ``input_size``); the model's
  ``pretrained_cfg`` then names that size, so timm's data config follows it.
* ``num_classes`` defaults to 0 (pooled features, as the presets return); ``global_pool=""`` with
  ``num_classes=0`` gives the layer4 map; ``drop_rate`` is dropout before ``fc``.
* Other keyword arguments go to the preset: ``levels=3``, ``impl="reference"``, ``channel_ratio``...
* ``pretrained=True`` loads torchvision's ImageNet ResNet-50 into the trunk (tags ``tv_in1k``,
  IMAGENET1K_V1, the default, and ``tv2_in1k``, IMAGENET1K_V2); the attention and ``fc`` start
  random. ``pretrained_cfg_overlay=dict(file=path)`` loads a local file instead: a torchvision
  ResNet-50 state_dict, a preset's state_dict (e.g. from :mod:`reid_attention.convert`) or this
  model's; ``.pth``/``.safetensors``, wrapped in ``{"state_dict": ...}`` or not. Every trunk key
  must be there; attention keys are optional (random where absent); ``fc`` loads where its shape
  fits the model's. A file that does not fit is refused with the keys that differ.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ._extras import require
from ._timm_resnet import DEFAULT_SIZE, TimmReIDResNet, filter_state_dict, img_pair, map_size
from .presets import VARIANTS

require("timm", feature="reid_attention.timm_models", extra="timm")

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model  # noqa: E402

# register_model appends every entry point's name to this list.
__all__ = ["TimmReIDResNet"]

_TORCHVISION_URLS = {  # torchvision's ResNet50_Weights
    "tv_in1k": "https://download.pytorch.org/models/resnet50-0676ba61.pth",  # IMAGENET1K_V1
    "tv2_in1k": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",  # IMAGENET1K_V2
}


def _cfg(tag: str, size: tuple[int, int], paper: tuple[str, str]) -> dict[str, Any]:
    return dict(
        url=_TORCHVISION_URLS[tag],
        custom_load=True,  # the file goes to TimmReIDResNet.load_pretrained
        num_classes=1000,  # the torchvision checkpoint's fc; the models default to num_classes=0
        input_size=(3, *size),
        pool_size=map_size(size),
        fixed_input_size=True,  # the attention's weights are tied to the map size
        crop_pct=1.0,  # re-id resizes the whole person box, no centre crop
        crop_mode="center",
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="conv1",
        classifier="fc",
        license="bsd-3-clause",  # torchvision's weights
        origin_url="https://github.com/pytorch/vision",
        paper_name=paper[0],
        paper_ids=paper[1],
        notes=("ImageNet weights for the ResNet-50 trunk only; the attention and fc start random",),
    )


_RGA = ("Relation-Aware Global Attention for Person Re-identification", "arXiv:1904.02998")
_APNET = ("Person Re-identification via Attention Pyramid", "arXiv:2108.05340")
_PAPERS = {"rga_resnet50": _RGA, "apnet_resnet50": _APNET}  # preset function -> its paper

# timm reads the pretrained cfgs of an entry point from its module's ``default_cfgs`` when the
# entry point is registered, so this comes before the @register_model functions.
default_cfgs = generate_default_cfgs({
    f"{arch}.{tag}": _cfg(tag, DEFAULT_SIZE[preset], _PAPERS[preset])
    for arch, (preset, _) in VARIANTS.items()
    for tag in _TORCHVISION_URLS
})


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    preset, fixed = VARIANTS[variant]
    for key, value in fixed.items():
        given = kwargs.pop(key, value)
        if given != value:
            raise ValueError(f"{variant} is built with {key}={value!r}, got {key}={given!r}")
    kwargs.setdefault("num_classes", 0)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if kwargs.get("img_size") is not None:  # the cfg names the size the model is built for
        size = img_pair(kwargs["img_size"])
        overlay = dict(input_size=(3, *size), pool_size=map_size(size), **overlay)
    if overlay.get("file") or overlay.get("url"):  # every file goes to TimmReIDResNet.load_pretrained
        overlay.setdefault("custom_load", True)  # (recent timm resets it for an overlay source)
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    # bound here: the preset's own ``variant`` would clash with build_model_with_cfg's
    build = functools.partial(TimmReIDResNet, preset, **fixed)
    return build_model_with_cfg(build, variant, pretrained, pretrained_filter_fn=filter_state_dict,
                                **kwargs)


@register_model
def rga_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (last stride 1) with RGA-SC after layer1 .. layer4, 256x128 (Zhang et al., CVPR 2020)."""
    return _create("rga_resnet50", pretrained, kwargs)


@register_model
def rga_s_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (last stride 1) with RGA-S (spatial only) after layer1 .. layer4, 256x128."""
    return _create("rga_s_resnet50", pretrained, kwargs)


@register_model
def rga_c_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (last stride 1) with RGA-C (channel only) after layer1 .. layer4, 256x128."""
    return _create("rga_c_resnet50", pretrained, kwargs)


@register_model
def apnet_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (last stride 1) with APNet-C (``levels=2``) after the stem and layer1 .. layer4, 384x192
    (Chen et al., TIP 2021; the official channel version)."""
    return _create("apnet_resnet50", pretrained, kwargs)


@register_model
def apnet_s_resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (last stride 1) with APNet-S (``levels=2``, RGA-S agents per stripe) after the stem and
    layer1 .. layer4, 384x192."""
    return _create("apnet_s_resnet50", pretrained, kwargs)
