"""Drop-in insertion of attention layers into existing backbones (torchvision or any nn.Module).

Four entry points:

* :func:`list_sites` finds where attention can go by a *shape probe*, not a table of
  architectures: a copy of the model on the meta device (no memory, no arithmetic) runs a batch
  of two images at ``input_size`` and at twice that size, with forward hooks on that copy only.
  A module called once per forward whose output is 4-D, with two adjacent dims that follow the
  input size, outputs a feature map: dims 2, 3 -> ``"NCHW"``, dims 1, 2 -> ``"NHWC"`` (Swin).
  Its reduction is the input height over the map height, rounded to a power of two (unpadded
  convolutions make the exact ratio drift: Inception's 35x35 map of a 299x299 input is stride 8).
  The probe sees through attention already in the model: in the copy, every inserted module
  and every size-tied layer (one with a ``resized`` method: RGA, APNet-S) is an identity (they
  keep the map's shape by construction), so a wrapped model lists its sites, takes a second
  kind at other sites, and is probed at any input size. Normalisations, activations and dropout
  also return a map of their input's shape without computing it: on the meta device their
  decompositions cost most of the probe's time.
* :func:`insert_attention` adds one attention module after each chosen site.
* :func:`resize_attention` rebuilds every inserted size-tied layer for another input size.
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
stage's (B, H, W, C) layout is restored. Every inserted module (the layer, and its adapter) is
tagged with the name of its site (attribute ``_checks.SITE_ATTR``): a second insertion at the same
site is refused, probes see through it, :func:`resize_attention` finds its site, and the layers'
errors name it.

**What insertion builds.** A registry name is built with the registry's defaults, except where a
layer's own default is meant for another place: PFSA is built with ``preserve_scale=True`` (its
official map sums to 1 and would divide a main-path map by H*W; the official form is for side
branches right before pooling: pass ``preserve_scale=False``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import SITE_ATTR, SizeLike, pair
from .registry import create_attention, needs_feat_size

__all__ = [
    "NHWCAdapter",
    "Site",
    "default_sites",
    "fx_leaf_modules",
    "insert_attention",
    "list_sites",
    "resize_attention",
    "set_last_stride",
]

AttentionSpec = Union[str, Callable[..., nn.Module]]
_PROBE_BATCH = 2
_DEFAULT_MIN_REDUCTION = 4  # default sites: stage ends at this stride or more
# Keyword arguments insertion adds to a registry kind unless the user passes them (module docstring).
_INSERTION_DEFAULTS: Dict[str, Dict[str, object]] = {"pfsa": {"preserve_scale": True}}


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


def _placement_of(model: nn.Module) -> Dict[str, object]:
    """torch's factory keywords for new modules placed like the model's first floating tensor."""
    reference = next(
        (t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None
    )
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def _is_inserted(module: nn.Module) -> bool:
    return bool(getattr(module, SITE_ATTR, None))


def _size_tied(module: nn.Module) -> bool:
    """Whether the module's weights are tied to one map size (it has ``resized``: RGA, APNet-S)."""
    return callable(getattr(module, "resized", None))


def _outermost(model: nn.Module, keep: Callable[[nn.Module], bool]) -> List[str]:
    """Qualified names (not the root) of the modules ``keep`` selects, less those inside one."""
    names: List[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if name and not inside and keep(module):
            names.append(name)
    return names


def _inserted_names(model: nn.Module) -> List[str]:
    """Qualified names of the modules insert_attention added (an adapter, not also its layer)."""
    return _outermost(model, _is_inserted)


def _bypass_attention(meta: nn.Module) -> nn.Module:
    """Replace, in a probe's copy, inserted modules and size-tied layers by identities."""
    for name in _outermost(meta, lambda m: _is_inserted(m) or _size_tied(m)):
        parent, _, leaf = name.rpartition(".")
        meta.get_submodule(parent)._modules[leaf] = nn.Identity()
    return meta


# Functions whose output has their input's shape, and whose meta-device decompositions cost most
# of a probe's time (normalisations ~1 ms a call, activations up to 1.5 ms, a convolution 25 us).
_SHAPE_KEEPING = frozenset(
    {F.batch_norm, torch.batch_norm, F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm,
     F.instance_norm, torch.instance_norm, F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid,
     F.gelu, F.silu, F.mish, F.elu, F.leaky_relu, F.dropout, F.dropout2d}
)


class _ShapeOnly(TorchFunctionMode):
    """For meta-device runs: the shape-keeping functions above return a copy of their input (the
    shape of their output, and differentiable, so a shape-only backward runs too) instead of
    running their meta-device decompositions."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHAPE_KEEPING:
            return (args[0] if args else kwargs["input"]).clone()
        return func(*args, **kwargs)


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
        with torch.no_grad(), _ShapeOnly():
            meta(torch.empty(_PROBE_BATCH, 3, *size, device="meta", dtype=dtype))
    except Exception as err:  # any failure of a foreign model is reported as a probe failure
        raise ValueError(
            f"the shape probe could not run {type(meta).__name__} on a (B, 3, {size[0]}, {size[1]}) "
            f"input on the meta device: {type(err).__name__}: {err} (the probe runs the model at "
            "the input size and at twice that size: the model must take images of both sizes)"
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
    meta = _bypass_attention(_meta_copy(model)).eval()
    dtype = _placement_of(model).get("dtype", torch.float32)
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
            if _is_inserted(child):
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
    The model is not run: a meta-device copy is probed. Attention already inserted is seen
    through (a wrapped model lists the sites of the plain one; inserted modules are not sites).
    """
    _check_model(model)
    maps = _probe(model, pair("input_size", input_size))
    return _stage_ends(model, maps) if stages_only else list(maps.values())


def default_sites(stage_ends: Sequence[Site]) -> List[Site]:
    """The sites :func:`insert_attention` uses when none are named: the stage ends (as
    :func:`list_sites` returns them) at reduction 4 or more (the stride-2 stem map is the largest
    of all, and the papers start at stride 4)."""
    return [site for site in stage_ends if site.reduction >= _DEFAULT_MIN_REDUCTION]


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


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
        if candidate in modules and _is_inserted(modules[candidate]):
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


class _Caller(NamedTuple):
    """The call through which a user passes the attention's arguments, for error messages:
    its text and its names for the layers' arguments (a preset's ``level`` is ``levels``)."""

    call: str = "insert_attention(..., **kwargs)"
    names: Mapping[str, str] = {}

    def argument(self, name: str) -> str:
        return self.names.get(name, name)


def _tunable_arguments() -> List[str]:
    """The layers' keyword-only int arguments (ratios, width floors, levels): what a width or
    divisibility error may ask to change."""
    from .pyramid import APNetC, APNetS
    from .rga import RGA

    names: List[str] = []
    for cls in (RGA, APNetC, APNetS):
        for param in inspect.signature(cls).parameters.values():
            if param.kind is param.KEYWORD_ONLY and type(param.default) is int and param.name not in names:
                names.append(param.name)
    return names


def _remedy(message: str, kwargs: Mapping[str, object], caller: _Caller) -> str:
    """How to change what a build error complains about: the arguments it names, and where they go."""
    candidates = list(dict.fromkeys([*kwargs, *_tunable_arguments()]))
    named = [n for n in candidates if re.search(rf"\b{n}\b", message)]
    if not named:
        return f"the attention's arguments pass through {caller.call}"
    return f"pass {' / '.join(caller.argument(n) + '=' for n in named)} through {caller.call}"


def _factory(
    attention: AttentionSpec, kwargs: dict, placement: Dict[str, object]
) -> Callable[[int, Tuple[int, int]], nn.Module]:
    """``(channels, feat_size) -> module`` for a registry name (with the insertion defaults, built
    directly on the model's device and dtype) or a user's factory."""
    if isinstance(attention, str):
        needs_feat_size(attention)  # ValueError listing the registered names if unknown
        kwargs = {**placement, **_INSERTION_DEFAULTS.get(attention, {}), **kwargs}
        return lambda channels, feat_size: create_attention(attention, channels, feat_size, **kwargs)
    if callable(attention):
        return lambda channels, feat_size: attention(channels, feat_size, **kwargs)
    raise TypeError(
        "attention must be a registered name (see reid_attention.list_attentions()) or a factory "
        f"(channels, feat_size) -> nn.Module, got {type(attention).__name__}"
    )


def _build(
    make: Callable, site: Site, placement: Dict[str, object], remedy: Callable[[str], str]
) -> nn.Module:
    """Build the attention for ``site``, check on the meta device that it maps the site's
    (B, C, H, W) map to the same shape, and place it (``placement``: device, dtype) like the
    model. ``remedy(message)`` says how to change the arguments a build error complains about."""
    what = f"site {site.name!r} ({site.channels} channels, feat_size {site.feat_size})"
    try:
        module = make(site.channels, site.feat_size)
    except ValueError as err:  # a width or divisibility the map does not allow
        raise ValueError(f"the attention cannot be built for {what}: {err}; {remedy(str(err))}") from err
    except TypeError as err:  # e.g. a keyword the layer does not take
        raise TypeError(f"the attention cannot be built for {what}: {err}") from err
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"the attention factory must return an nn.Module, got {type(module).__name__} for {what}"
        )
    shape = (_PROBE_BATCH, site.channels, *site.feat_size)
    try:
        with torch.no_grad(), _ShapeOnly():
            dtype = placement.get("dtype", torch.float32)
            out = _meta_copy(module).eval()(torch.empty(shape, device="meta", dtype=dtype))
    except Exception as err:  # a foreign factory may fail in any way: report it at the boundary
        raise ValueError(f"the attention cannot take the map of {what}: {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the attention must keep the map's shape {shape} at {what}, got {got}")
    module = module.to(**placement)  # a user's factory builds on the default device
    setattr(module, SITE_ATTR, site.name)
    if site.layout == "NHWC":
        module = NHWCAdapter(module)
        setattr(module, SITE_ATTR, site.name)
    return module


def _choose(
    model: nn.Module, maps: Dict[str, Site], sites: Optional[Union[str, Sequence[str]]]
) -> List[Site]:
    """Validate ``sites`` against the probe (None: :func:`default_sites`)."""
    stage_ends = _stage_ends(model, maps)
    listing = (
        f"stage ends: {', '.join(f'{s.name} (stride {s.reduction})' for s in stage_ends)}; any of the "
        f"{len(maps)} modules that output a feature map once per forward is accepted "
        "(list_sites(model, input_size, stages_only=False))"
    )
    if sites is None:
        chosen = default_sites(stage_ends)
        if not chosen:
            raise ValueError(
                f"no stage end at reduction >= {_DEFAULT_MIN_REDUCTION} was found; {listing}. Attention "
                "goes on 4-D feature maps, (B, C, H, W) or (B, H, W, C): token-sequence models such as "
                "ViT have none"
            )
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
    return _insert(model, attention, sites, input_size, kwargs, _Caller())


def _insert(
    model: nn.Module,
    attention: AttentionSpec,
    sites: Optional[Union[str, Sequence[str]]],
    input_size: SizeLike,
    kwargs: Dict[str, object],
    caller: _Caller,
) -> nn.Module:
    """:func:`insert_attention`, with build errors pointing at ``caller`` (presets pass theirs)."""
    _check_model(model)
    placement = _placement_of(model)
    make = _factory(attention, kwargs, placement)
    maps = _probe(model, pair("input_size", input_size))
    chosen = _choose(model, maps, sites)
    remedy = functools.partial(_remedy, kwargs=kwargs, caller=caller)
    built = [_build(make, site, placement, remedy) for site in chosen]
    if len({id(m) for m in built}) != len(built):
        raise ValueError(
            "the attention factory returned the same module for two sites; it must build a new one"
        )
    for site, module in zip(chosen, built):
        module.train(model.get_submodule(site.name).training)
        _attach(model, site.name, module)
    return model


# --------------------------------------------------------------------------- resolution transfer


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
    _check_model(model)
    size = pair("input_size", input_size)
    layers = [(name, m) for name, m in model.named_modules() if _is_inserted(m) and _size_tied(m)]
    if not layers:
        return model
    maps = _probe(model, size)
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
