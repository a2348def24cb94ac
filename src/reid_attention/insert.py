"""The public entry points for putting attention layers into existing backbones (torchvision, timm
or any nn.Module that takes (B, 3, H, W) images):

* :func:`list_sites` finds where attention can go by a *shape probe* of the model on the meta
  device (no memory, no arithmetic), not by a table of architectures: every module called once
  per forward whose output is a feature map that follows the input size, NCHW or NHWC (Swin).
  The **stage ends** are the last such unit at each reduction: ResNet -> relu (the stem's
  stride-2 map), layer1 .. layer4; MobileNet / EfficientNet / ConvNeXt / Swin -> ``features.<i>``;
  DenseNet -> ``features.relu0``, ``features.denseblock1`` ..; Inception -> ``Mixed_5d`` ...
* :func:`insert_attention` adds one attention module after each chosen site; by default after
  the stage ends at reduction 4 or more (:func:`default_sites`). Any module that outputs a
  feature map once per forward may be named (``list_sites(model, size, stages_only=False)``):
  with last stride 1 (:func:`set_last_stride`) ResNet's layer3 and layer4 share stride 16, so
  only layer4 is a stage end, and the papers' sites are named explicitly (as the presets do).
* :func:`resize_attention` rebuilds every inserted size-tied layer for another input size.
* :func:`fx_leaf_modules` lists the inserted classes for torch.fx tracing.
* :func:`set_last_stride` turns a ResNet's last downsampling off (the re-id "last stride 1").

The attention is a real child module (never a forward hook, which torch.fx silently drops) and no
existing module is moved or renamed, so every original state_dict key is unchanged and a
checkpoint of the unwrapped model loads with ``strict=False`` reporting only the new attention
keys as missing. A plain ``nn.Sequential`` site gets a child named ``attention``; a site that runs
its own children (DenseNet's dense blocks) gets the sibling ``<site>_attention``; any other
module's class is swapped for a subclass (:class:`AttentionSite`) that runs its ``attention``
child after the original forward (``copy.deepcopy``, ``pickle`` and ``torch.save`` keep working).
An NHWC site's attention is wrapped in :class:`NHWCAdapter`. Probes see through inserted
attention, so a wrapped model lists the sites of the plain one and takes a second kind elsewhere.

A registry name is built with the registry's defaults, except PFSA, built with
``preserve_scale=True`` here (its official map sums to 1 and would divide a main-path map by
H*W; the official form is for side branches right before pooling: pass ``preserve_scale=False``).

The work is done in two private modules: ``_probe`` (the shape probe, :class:`Site`, stage ends)
``_attach`` (choosing the sites, building and joining the attention) and ``_swapped`` (the
classes swapped in so attention runs as a child).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ._attach import AttentionSpec, NHWCAdapter, attach
from ._checks import SITE_ATTR, SizeLike, pair
from ._probe import (
    Site,
    check_model,
    default_sites,
    inserted_names,
    is_inserted,
    probe,
    size_tied,
    stage_ends,
)
from ._resnet import set_last_stride
from ._swapped import AttentionSite
from ._swapped import new_site as _new_site  # noqa: F401 -- whole-model pickles of 0.1.0 name it here

__all__ = [
    "AttentionSite",
    "NHWCAdapter",
    "Site",
    "default_sites",
    "fx_leaf_modules",
    "insert_attention",
    "list_sites",
    "resize_attention",
    "set_last_stride",
]


def list_sites(
    model: nn.Module, input_size: SizeLike = (256, 128), *, stages_only: bool = True
) -> list[Site]:
    """Candidate insertion sites of ``model`` for (B, 3, *input_size) images, in execution order.

    ``stages_only=True`` (default): the stage ends (see the module docstring), including the
    stride-2 stem map; ``False``: every module that outputs a feature map once per forward.
    The model is not run: a meta-device copy is probed. Attention already inserted is seen
    through (a wrapped model lists the sites of the plain one; inserted modules are not sites).
    """
    check_model(model)
    maps = probe(model, pair("input_size", input_size))
    return stage_ends(model, maps) if stages_only else list(maps.values())


def insert_attention(
    model: nn.Module,
    attention: AttentionSpec,
    *,
    sites: str | Sequence[str] | None = None,
    input_size: SizeLike = (256, 128),
    **kwargs: Any,
) -> nn.Module:
    """Insert attention after ``sites`` of ``model`` (in place) and return the model.

    Args:
        model: any nn.Module taking (B, 3, H, W) images (torchvision backbones, timm models, ...),
            also one that already has attention (kinds can be mixed, at different sites).
        attention: a registry name (``"rga_sc"``, ``"pfsa"``, ``"apnet_c"``, ...: see
            :func:`reid_attention.list_attentions`) or a factory ``(channels, feat_size) -> nn.Module``
            that returns a module keeping its (B, C, H, W) input's shape.
        sites: module names (see :func:`list_sites`); default: :func:`default_sites`, the stage
            ends at reduction >= 4.
        input_size: (H, W) of the images the model will get; size-dependent attentions (RGA,
            APNet-S) are built for the maps of this size (:func:`resize_attention` changes it).
        **kwargs: passed to every attention's constructor (e.g. ``channel_ratio=4``, ``levels=1``).
            ``"pfsa"`` is built with ``preserve_scale=True`` unless given (module docstring).

    The new modules are on the device and dtype of the model's parameters and in the training
    mode of their site. Unknown sites, maps an attention cannot take (the error names the site
    and the argument to change) and sites that already have attention raise before anything
    is changed.
    """
    return attach(model, attention, sites=sites, input_size=input_size, kwargs=kwargs)


def resize_attention(model: nn.Module, input_size: SizeLike, *, mode: str = "bilinear") -> nn.Module:
    """Rebuild every size-tied layer inserted in ``model`` for (B, 3, *input_size) images, in
    place, and return the model.

    The size-tied layers are those with a ``resized`` method (RGA, APNet-S), placed by
    :func:`insert_attention` or a preset, also inside an :class:`NHWCAdapter`. Each one's site
    is probed at the new input size and the layer is replaced by ``layer.resized(map size,
    mode=mode)`` (see :meth:`reid_attention.RGA.resized`: exact for nearest upsampling by an
    integer factor, an approximation otherwise), keeping its site, impl, training mode, device
    and dtype; layers already built for their new map are kept. The state_dict keys do not
    change (the position-indexed weights change shape), so a model trained at 256x128 is
    loaded as built for 256x128, then resized to run at 384x128; a checkpoint of the resized
    model loads into another one resized alike. Every new layer is built before any is
    replaced.
    """
    check_model(model)
    size = pair("input_size", input_size)
    layers = [(name, m) for name, m in model.named_modules() if is_inserted(m) and size_tied(m)]
    if not layers:
        return model
    maps = probe(model, size)
    replacements = []
    for name, layer in layers:
        site = getattr(layer, SITE_ATTR)
        if site not in maps:
            raise ValueError(
                f"the site {site!r} of {name} outputs no feature map for a {size[0]}x{size[1]} input, "
                "so its attention cannot be resized"
            )
        new_size = maps[site].feat_size
        if tuple(layer.feat_size) != new_size:
            resized = layer.resized(new_size, mode=mode)
            setattr(resized, SITE_ATTR, site)
            replacements.append((name, resized))
    for name, resized in replacements:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, resized)
    return model


def fx_leaf_modules(model: nn.Module) -> list[type]:
    """Classes of the attention modules inserted in ``model``, for torch.fx tracing.

    The layers validate their input in Python, which a symbolic trace cannot do; as leaves they
    are recorded as one call each (run for real at execution)::

        create_feature_extractor(model, {"layer3": "feat"},
                                 tracer_kwargs={"leaf_modules": fx_leaf_modules(model)})
    """
    leaves = []
    for name in inserted_names(model):
        module = model.get_submodule(name)
        cls = type(module.attention if isinstance(module, NHWCAdapter) else module)
        if cls not in leaves:
            leaves.append(cls)
    return leaves
