"""Drop-in insertion of attention layers into existing backbones (torchvision or any nn.Module).

Three entry points:

* :func:`list_sites` finds where attention can go by a *shape probe*, not a table of
  architectures: a copy of the model on the meta device (no memory, no arithmetic) runs a batch
  of two images at ``input_size`` and at twice that size, with forward hooks on that copy only.
  A module called once per forward whose output is 4-D, with two adjacent dims that follow the
  input size, outputs a feature map: dims 2, 3 -> ``"NCHW"``, dims 1, 2 -> ``"NHWC"`` (Swin).
  Its reduction is the input height over the map height, rounded to a power of two (unpadded
  convolutions make the exact ratio drift: Inception's 35x35 map of a 299x299 input is stride 8).
* :func:`insert_attention` adds one attention module after each chosen site.
* :func:`set_last_stride` turns a ResNet's last downsampling off (the re-id "last stride 1").

**Stage ends** (the default sites). Going down from the model, a child module whose own children's
maps span three or more reductions holds several stages (torchvision's ``features`` or RegNet's
``trunk_output``) and is looked into; any other child is one unit: a stage, a block, or a
downsampling unit whose children span two reductions (DenseNet's transition: norm/conv at stride 4,
pool at stride 8), never split. Among the units reached that output a feature map, the last one
(in execution order) at each reduction is a stage end: ResNet -> relu (the stem's stride-2 map),
layer1 .. layer4; MobileNet / EfficientNet / ConvNeXt / Swin -> ``features.<i>``; DenseNet ->
``features.relu0``, ``features.denseblock1`` ..; Inception -> ``Mixed_5d`` ... When ``sites`` is not
given, attention goes after the stage ends at reduction 4 or more (the stride-2 stem map is the
largest of all and the papers start at stride 4). Any module that outputs a feature map once
per forward may be named explicitly (``list_sites(model, size, stages_only=False)`` lists them):
with last stride 1 (:func:`set_last_stride`) ResNet's layer3 and layer4 share stride 16, so only
layer4 is a stage end, and the papers' sites are named explicitly (as the presets do).

**Insertion mechanism.** The attention is a real child module (no forward hooks: torch.fx, and so
``create_feature_extractor``, silently drops them), no existing module is moved or renamed, so
every original state_dict key is unchanged and a checkpoint of the unwrapped model loads with
``strict=False`` reporting only the new attention keys as missing:

* a plain ``nn.Sequential`` site (ResNet's ``layer1``, EfficientNet's stages) gets the attention
  appended as a child named ``attention`` (its forward runs the children in order; indexing
  ``site[i]`` of existing children is unchanged);
* a site whose forward iterates its children in its own way (``nn.ModuleDict`` /
  ``nn.ModuleList`` / a Sequential with its own forward: DenseNet's dense blocks) gets the
  attention as the next sibling, ``<site>_attention``, in its parent, which must be a plain
  Sequential;
* any other module's class is swapped for a cached subclass whose forward calls the original
  forward, then the ``attention`` child. The subclass pickles as "base class + this mixin", so
  ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep working.

On an NHWC site the attention is wrapped in :class:`NHWCAdapter`, so it sees (B, C, H, W) and the
stage's (B, H, W, C) layout is restored. Every inserted module is tagged (an attribute) so that a
second insertion at the same site is refused and probes skip it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._common import SizeLike, pair
from .registry import create_attention, needs_feat_size

__all__ = ["NHWCAdapter", "Site", "fx_leaf_modules", "insert_attention", "list_sites", "set_last_stride"]

AttentionSpec = Union[str, Callable[..., nn.Module]]
_TAG = "_reid_attention_inserted"  # set on every inserted module
_PROBE_BATCH = 2


@dataclass(frozen=True)
class Site:
    """A place to insert attention: after module ``name``, whose output map is described here."""

    name: str
    channels: int
    feat_size: Tuple[int, int]
    reduction: int
    layout: str  # "NCHW" or "NHWC"


class NHWCAdapter(nn.Module):
    """Runs an NCHW attention on a (B, H, W, C) map and returns (B, H, W, C) (e.g. Swin stages)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- shape probe


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data is copied),
    without the module's forward hooks (the user's hooks must not see the probe)."""
    memo = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in module.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    meta = copy.deepcopy(module, memo)
    for m in meta.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return meta


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point tensor (float32 if it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _inserted_names(model: nn.Module) -> List[str]:
    """Qualified names of the modules insert_attention added."""
    return [name for name, m in model.named_modules() if getattr(m, _TAG, False)]


def _run_meta(meta: nn.Module, size: Tuple[int, int], dtype: torch.dtype) -> Dict[str, list]:
    """Output shapes of every call of every module (name -> list of shapes or None), in
    completion order of each module's first call."""
    shapes: Dict[str, list] = {}
    handles = []
    for name, module in meta.named_modules():

        def hook(_module, _args, out, name=name):
            shapes.setdefault(name, []).append(tuple(out.shape) if isinstance(out, Tensor) else None)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            meta(torch.empty(_PROBE_BATCH, 3, *size, device="meta", dtype=dtype))
    except Exception as err:  # any failure of a foreign model is reported as a probe failure
        raise ValueError(
            f"the shape probe could not run {type(meta).__name__} on a (B, 3, {size[0]}, {size[1]}) "
            f"input on the meta device: {type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _feature_map(name: str, small: list, large: list, input_height: int) -> Optional[Site]:
    """The Site of a module called once whose output follows the input size, else None."""
    if len(small) != 1 or len(large) != 1 or small[0] is None or large[0] is None:
        return None
    a, b = small[0], large[0]
    if len(a) != 4 or len(b) != 4 or a[0] != _PROBE_BATCH:
        return None
    follows = [dim for dim in (1, 2, 3) if a[dim] != b[dim]]
    if follows == [2, 3]:
        layout, channels, height, width = "NCHW", a[1], a[2], a[3]
    elif follows == [1, 2]:
        layout, channels, height, width = "NHWC", a[3], a[1], a[2]
    else:
        return None
    reduction = max(1, 2 ** round(math.log2(input_height / height)))
    return Site(name, channels, (height, width), reduction, layout)


def _probe(model: nn.Module, input_size: Tuple[int, int]) -> Dict[str, Site]:
    """Every module (not the root, not an inserted one) that outputs a feature map once per
    forward, in execution order."""
    meta = _meta_copy(model).eval()
    dtype = _float_dtype(model)
    height, width = input_size
    small = _run_meta(meta, (height, width), dtype)
    large = _run_meta(meta, (2 * height, 2 * width), dtype)
    skip = tuple(f"{name}." for name in _inserted_names(model))
    sites = {}
    for name, shapes in small.items():
        if name and not (name + ".").startswith(skip):
            site = _feature_map(name, shapes, large.get(name, []), height)
            if site is not None:
                sites[name] = site
    return sites


def _stage_ends(model: nn.Module, maps: Dict[str, Site]) -> List[Site]:
    """The last unit at each reduction, descending into containers of several stages."""
    units: List[Site] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = prefix + name
            if getattr(child, _TAG, False):
                continue
            spanned = {
                maps[f"{qual}.{n}"].reduction for n, _ in child.named_children() if f"{qual}.{n}" in maps
            }
            if len(spanned) >= 3:
                visit(child, qual + ".")
            elif qual in maps:
                units.append(maps[qual])

    visit(model, "")
    order = {name: i for i, name in enumerate(maps)}
    last: Dict[int, Site] = {}
    for site in sorted(units, key=lambda s: order[s.name]):
        last[site.reduction] = site
    return sorted(last.values(), key=lambda s: order[s.name])


def list_sites(
    model: nn.Module, input_size: SizeLike = (256, 128), *, stages_only: bool = True
) -> List[Site]:
    """Candidate insertion sites of ``model`` for (B, 3, *input_size) images, in execution order.

    ``stages_only=True`` (default): the stage ends (see the module docstring), including the
    stride-2 stem map; ``False``: every module that outputs a feature map once per forward.
    The model is not run: a meta-device copy is probed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    maps = _probe(model, pair("input_size", input_size))
    return _stage_ends(model, maps) if stages_only else list(maps.values())


# --------------------------------------------------------------------------- insertion


class AttentionSite:
    """Mixin of a module whose output goes through its ``attention`` child.

    ``_with_attention(cls)`` returns the cached subclass ``(AttentionSite, cls)``; an instance's
    class is swapped for it, so parameters, buffers, hooks and names stay where they were.
    """

    _site_base: type

    def forward(self, *args, **kwargs):
        return self.attention(super().forward(*args, **kwargs))

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time and cannot be found by name: rebuild it from its base.
        return _new_site, (self._site_base,), self.__dict__


_SITE_CLASSES: Dict[type, type] = {}


def _with_attention(cls: type) -> type:
    if cls not in _SITE_CLASSES:
        _SITE_CLASSES[cls] = type(
            f"{cls.__name__}WithAttention", (AttentionSite, cls), {"_site_base": cls, "__module__": __name__}
        )
    return _SITE_CLASSES[cls]


def _new_site(base: type) -> nn.Module:
    """Unpickling helper: an empty instance of ``base`` with attention (state is set after)."""
    cls = _with_attention(base)
    return cls.__new__(cls)


def _iterates_children(module: nn.Module) -> bool:
    """Whether the module's forward may call every child (so an extra child cannot be added)."""
    if isinstance(module, nn.Sequential):
        return type(module).forward is not nn.Sequential.forward
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _placement(model: nn.Module, name: str) -> str:
    """How attention is attached after module ``name``: "append", "sibling" or "swap"."""
    site = model.get_submodule(name)
    if _iterates_children(site):
        parent = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(parent, nn.Sequential) or _iterates_children(parent):
            raise ValueError(
                f"cannot insert after {name!r}: a {type(site).__name__} runs its own children, so the "
                f"attention must follow it in its parent, and its parent ({type(parent).__name__}) is "
                "not a plain nn.Sequential; choose another site"
            )
        if hasattr(parent, f"{name.rpartition('.')[2]}_attention"):
            raise ValueError(
                f"cannot insert after {name!r}: its parent already has a '<site>_attention' child"
            )
        return "sibling"
    if hasattr(site, "attention"):
        raise ValueError(f"cannot insert after {name!r}: it already has an attribute named 'attention'")
    return "append" if isinstance(site, nn.Sequential) else "swap"


def _wrapped_by(model: nn.Module, name: str) -> Optional[str]:
    """The qualified name of the attention already inserted after site ``name``, if any."""
    parent, _, leaf = name.rpartition(".")
    modules = dict(model.named_modules())
    for candidate in (f"{name}.attention", f"{parent}.{leaf}_attention" if parent else f"{leaf}_attention"):
        if getattr(modules.get(candidate), _TAG, False):
            return candidate
    return None


def _attach(model: nn.Module, name: str, attention: nn.Module) -> None:
    """Make ``attention`` run on the output of module ``name`` (see the module docstring)."""
    site = model.get_submodule(name)
    placement = _placement(model, name)
    if placement == "sibling":
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        children = list(parent._modules.items())
        parent._modules.clear()
        for child_name, child in children:
            parent._modules[child_name] = child
            if child_name == leaf:
                parent._modules[f"{leaf}_attention"] = attention
        return
    if placement == "swap":
        site.__class__ = _with_attention(type(site))
    site.add_module("attention", attention)


def _factory(attention: AttentionSpec, kwargs: dict) -> Callable[[int, Tuple[int, int]], nn.Module]:
    if isinstance(attention, str):
        needs_feat_size(attention)  # ValueError listing the registered names if unknown
        return lambda channels, feat_size: create_attention(attention, channels, feat_size, **kwargs)
    if callable(attention):
        return lambda channels, feat_size: attention(channels, feat_size, **kwargs)
    raise TypeError(
        "attention must be a registered name (see reid_attention.list_attentions()) or a factory "
        f"(channels, feat_size) -> nn.Module, got {type(attention).__name__}"
    )


def _build(make: Callable, site: Site, device_of: nn.Module) -> nn.Module:
    """Build the attention for ``site``, place it like the model, and check on the meta device
    that it maps the site's (B, C, H, W) map to the same shape."""
    what = f"site {site.name!r} ({site.channels} channels, feat_size {site.feat_size})"
    try:
        module = make(site.channels, site.feat_size)
    except ValueError as err:
        raise ValueError(f"the attention cannot be built for {what}: {err}") from err
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"the attention factory must return an nn.Module, got {type(module).__name__} for {what}"
        )
    shape = (_PROBE_BATCH, site.channels, *site.feat_size)
    try:
        with torch.no_grad():
            out = _meta_copy(module).eval()(torch.empty(shape, device="meta", dtype=_float_dtype(device_of)))
    except Exception as err:  # a foreign factory may fail in any way: report it at the boundary
        raise ValueError(f"the attention cannot take the map of {what}: {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the attention must keep the map's shape {shape} at {what}, got {got}")
    reference = next(
        (t for t in list(device_of.parameters()) + list(device_of.buffers()) if t.is_floating_point()), None
    )
    if reference is not None:
        module = module.to(device=reference.device, dtype=reference.dtype)
    return NHWCAdapter(module) if site.layout == "NHWC" else module


def _choose(
    model: nn.Module, maps: Dict[str, Site], sites: Optional[Union[str, Sequence[str]]]
) -> List[Site]:
    """Validate ``sites`` against the probe (None: stage ends at reduction >= 4)."""
    stage_ends = _stage_ends(model, maps)
    listing = (
        f"stage ends: {', '.join(f'{s.name} (stride {s.reduction})' for s in stage_ends)}; any of the "
        f"{len(maps)} modules that output a feature map once per forward is accepted "
        "(list_sites(model, input_size, stages_only=False))"
    )
    if sites is None:
        chosen = [s for s in stage_ends if s.reduction >= 4]
        if not chosen:
            raise ValueError(f"no stage end at reduction >= 4 was found; {listing}")
    else:
        names = [sites] if isinstance(sites, str) else list(sites)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"sites must be a module name or a non-empty sequence of names, got {sites!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"sites lists a module twice: {names}")
        unknown = [n for n in names if n not in maps]
        if unknown:
            raise ValueError(f"unknown site(s) {unknown} for a {type(model).__name__}; {listing}")
        chosen = [maps[n] for n in names]
    for site in chosen:
        existing = _wrapped_by(model, site.name)
        if existing is not None:
            free = [s.name for s in stage_ends if _wrapped_by(model, s.name) is None]
            raise ValueError(
                f"site {site.name!r} already has attention ({existing}); stage ends without attention: {free}"
            )
        _placement(model, site.name)
    return chosen


def insert_attention(
    model: nn.Module,
    attention: AttentionSpec,
    *,
    sites: Optional[Union[str, Sequence[str]]] = None,
    input_size: SizeLike = (256, 128),
    **kwargs,
) -> nn.Module:
    """Insert attention after ``sites`` of ``model`` (in place) and return the model.

    Args:
        model: any nn.Module taking (B, 3, H, W) images (torchvision backbones, timm models, ...).
        attention: a registry name (``"rga_sc"``, ``"pfsa"``, ``"apnet_c"``, ...: see
            :func:`reid_attention.list_attentions`) or a factory ``(channels, feat_size) -> nn.Module``
            that returns a module keeping its (B, C, H, W) input's shape.
        sites: module names (see :func:`list_sites`); default: the stage ends at reduction >= 4.
        input_size: (H, W) of the images the model will get; size-dependent attentions (RGA,
            APNet-S) are built for the maps of this size.
        **kwargs: passed to every attention's constructor (e.g. ``channel_ratio=4``, ``levels=3``).

    The new modules are on the device and dtype of the model's parameters and in the training
    mode of their site. Unknown sites, maps an attention cannot take and sites that already have
    attention raise ValueError before anything is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    make = _factory(attention, kwargs)
    maps = _probe(model, pair("input_size", input_size))
    chosen = _choose(model, maps, sites)
    built = [_build(make, site, model) for site in chosen]
    if len({id(m) for m in built}) != len(built):
        raise ValueError(
            "the attention factory returned the same module for two sites; it must build a new one"
        )
    for site, module in zip(chosen, built):
        setattr(module, _TAG, True)
        module.train(model.get_submodule(site.name).training)
        _attach(model, site.name, module)
    return model


def fx_leaf_modules(model: nn.Module) -> List[type]:
    """Classes of the attention modules inserted in ``model``, for torch.fx tracing.

    The layers validate their input in Python, which a symbolic trace cannot do; as leaves they
    are recorded as one call each (run for real at execution)::

        create_feature_extractor(model, {"layer3": "feat"},
                                 tracer_kwargs={"leaf_modules": fx_leaf_modules(model)})
    """
    leaves = []
    for name in _inserted_names(model):
        module = model.get_submodule(name)
        cls = type(module.attention if isinstance(module, NHWCAdapter) else module)
        if cls not in leaves:
            leaves.append(cls)
    return leaves


# --------------------------------------------------------------------------- last stride


def set_last_stride(model: nn.Module, stride: int = 1) -> nn.Module:
    """Set the stride of a ResNet-family model's last stage (in place) and return the model.

    The strided convolutions of ``layer4[0]`` (Bottleneck: ``conv2`` and ``downsample.0``, as in
    torchvision's ResNet v1.5; BasicBlock: ``conv1`` and ``downsample.0``) get ``stride``, so
    ``stride=1`` doubles the final map (256x128 input -> 16x8), as re-id models do. Call it
    before :func:`insert_attention`: attention built for the old layer4 map is refused.
    """
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    layer4 = getattr(model, "layer4", None)
    first = layer4[0] if isinstance(layer4, nn.Sequential) and len(layer4) else None
    downsample = getattr(first, "downsample", None)
    if not isinstance(downsample, nn.Sequential) or not isinstance(downsample[0], nn.Conv2d):
        raise ValueError(
            "set_last_stride expects a ResNet-family model (torchvision ResNet / ResNeXt / Wide "
            f"ResNet: layer4[0] with a downsample convolution), got {type(model).__name__}"
        )
    inserted = _inserted_names(layer4)
    if inserted:
        raise ValueError(
            f"layer4 already has attention ({', '.join('layer4.' + n for n in inserted)}) built for "
            "the current map size; call set_last_stride before insert_attention"
        )
    main = getattr(first, "conv2" if hasattr(first, "conv3") else "conv1")  # Bottleneck / BasicBlock
    for conv in (main, downsample[0]):
        conv.stride = (stride, stride)
    return model
