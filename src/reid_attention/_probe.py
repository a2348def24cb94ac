"""Where attention can go: a *shape probe* of a model on the meta device, and its stage ends.

**The probe.** Not a table of architectures: a copy of the model on the meta device (no memory, no
arithmetic) runs a batch of two images at ``input_size`` and at twice that size, with forward
hooks on that copy only. A module called once per forward whose output is 4-D, with two adjacent
dims that follow the input size, outputs a feature map: dims 2, 3 -> ``"NCHW"``, dims 1, 2 ->
``"NHWC"`` (Swin). Its reduction is the input height over the map height, rounded to a power of
two (unpadded convolutions make the exact ratio drift: Inception's 35x35 map of a 299x299 input
is stride 8). The probe sees through attention already in the model: in the copy, every inserted
module and every size-tied layer (one with a ``resized`` method: RGA, APNet-S) is an identity
(they keep the map's shape by construction), so a wrapped model lists its sites, takes a second
kind at other sites, and is probed at any input size. Normalisations, activations and dropout
also return a map of their input's shape without computing it (:class:`ShapeOnly`): on the meta
device their decompositions cost most of the probe's time. :class:`ShapeOnly` is also the seam
the tests use to run whole models shape-only on the meta device.

**Stage ends** (the default sites). Going down from the model, a child module whose own children's
maps span three or more reductions holds several stages (torchvision's ``features`` or RegNet's
``trunk_output``) and is looked into; any other child is one unit: a stage, a block, or a
downsampling unit whose children span two reductions (DenseNet's transition: norm/conv at stride 4,
pool at stride 8), never split. Among the units reached that output a feature map, the last one
(in execution order) at each reduction is a stage end: ResNet -> relu (the stem's stride-2 map),
layer1 .. layer4; MobileNet / EfficientNet / ConvNeXt / Swin -> ``features.<i>``; DenseNet ->
``features.relu0``, ``features.denseblock1`` ..; Inception -> ``Mixed_5d`` ... The default sites
are the stage ends at reduction 4 or more (:func:`default_sites`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import SITE_ATTR

__all__ = [
    "MIN_DEFAULT_REDUCTION", "PROBE_BATCH", "ShapeOnly", "Site", "check_model", "default_sites",
    "factory_kwargs_like", "inserted_names", "is_inserted", "meta_copy", "meta_output", "probe",
    "size_tied", "stage_ends",
]

PROBE_BATCH = 2
MIN_DEFAULT_REDUCTION = 4  # default sites: stage ends at this stride or more
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Site:
    """A place to insert attention: after module ``name``, whose output map is described here."""

    name: str
    channels: int
    feat_size: tuple[int, int]
    reduction: int
    layout: str  # "NCHW" or "NHWC"


def check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


class FactoryKwargs(TypedDict, total=False):
    """torch's factory keywords of a new module."""

    device: torch.device
    dtype: torch.dtype


def factory_kwargs_like(model: nn.Module) -> FactoryKwargs:
    """torch's factory keywords (``device``, ``dtype``) for new modules placed like the model's
    first floating tensor; empty for a model without one."""
    reference = next(
        (t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None
    )
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def is_inserted(module: nn.Module) -> bool:
    """Whether insertion placed ``module`` (it is tagged with the name of its site)."""
    return bool(getattr(module, SITE_ATTR, None))


def size_tied(module: nn.Module) -> bool:
    """Whether the module's weights are tied to one map size (it has ``resized``: RGA, APNet-S)."""
    return callable(getattr(module, "resized", None))


def _outermost(model: nn.Module, keep: Callable[[nn.Module], bool]) -> list[str]:
    """Qualified names (not the root) of the modules ``keep`` selects, less those inside one."""
    names: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)
        if name and not inside and keep(module):
            names.append(name)
    return names


def inserted_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules insertion added (an adapter, not also its layer)."""
    return _outermost(model, is_inserted)


# --------------------------------------------------------------------------- meta-device runs


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data is copied),
    without the module's forward hooks (the user's hooks must not see the probe)."""
    memo: dict[int, Tensor] = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta = copy.deepcopy(module, memo)
    for m in meta.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return meta


# Functions whose output has their input's shape, and whose meta-device decompositions cost most
# of a probe's time (normalisations ~1 ms a call, activations up to 1.5 ms, a convolution 25 us).
_SHAPE_KEEPING = frozenset(
    {F.batch_norm, torch.batch_norm, F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm,
     F.instance_norm, torch.instance_norm, F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid,
     F.gelu, F.silu, F.mish, F.elu, F.leaky_relu, F.dropout, F.dropout2d}
)


class ShapeOnly(TorchFunctionMode):
    """For meta-device runs: normalisations, activations and dropout return a copy of their input
    (the shape of their output, and differentiable, so a shape-only backward runs too) instead of
    running their meta-device decompositions."""

    def __torch_function__(
        self, func: Callable[..., Any], types: object, args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _SHAPE_KEEPING:
            return (args[0] if args else kwargs["input"]).clone()
        return func(*args, **kwargs)


def meta_output(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> object:
    """What a meta-device copy of ``module`` (eval mode) returns for a meta input of ``shape``."""
    with torch.no_grad(), ShapeOnly():
        return meta_copy(module).eval()(torch.empty(shape, device="meta", dtype=dtype))


# --------------------------------------------------------------------------- the probe


def _bypass_attention(meta: nn.Module) -> nn.Module:
    """Replace, in a probe's copy, inserted modules and size-tied layers by identities."""
    for name in _outermost(meta, lambda m: is_inserted(m) or size_tied(m)):
        parent, _, leaf = name.rpartition(".")
        meta.get_submodule(parent)._modules[leaf] = nn.Identity()
    return meta


def _run_meta(meta: nn.Module, size: tuple[int, int], dtype: torch.dtype) -> dict[str, list[Shape | None]]:
    """Output shapes of every call of every module (name -> list of shapes or None), in
    completion order of each module's first call."""
    shapes: dict[str, list[Shape | None]] = {}
    handles = []
    for name, module in meta.named_modules():

        def hook(_module: nn.Module, _args: object, out: object, name: str = name) -> None:
            shapes.setdefault(name, []).append(tuple(out.shape) if isinstance(out, Tensor) else None)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), ShapeOnly():
            meta(torch.empty(PROBE_BATCH, 3, *size, device="meta", dtype=dtype))
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


def _feature_map(
    name: str, small: list[Shape | None], large: list[Shape | None], input_height: int
) -> Site | None:
    """The Site of a module called once whose output follows the input size, else None."""
    if len(small) != 1 or len(large) != 1 or small[0] is None or large[0] is None:
        return None
    a, b = small[0], large[0]
    if len(a) != 4 or len(b) != 4 or a[0] != PROBE_BATCH:
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


def probe(model: nn.Module, input_size: tuple[int, int]) -> dict[str, Site]:
    """Every module (not the root, not an inserted one) that outputs a feature map once per
    forward, by name, in execution order."""
    meta = _bypass_attention(meta_copy(model)).eval()
    dtype = factory_kwargs_like(model).get("dtype", torch.float32)
    height, width = input_size
    small = _run_meta(meta, (height, width), dtype)
    large = _run_meta(meta, (2 * height, 2 * width), dtype)
    skip = tuple(f"{name}." for name in inserted_names(model))
    sites = {}
    for name, shapes in small.items():
        if name and not (name + ".").startswith(skip):
            site = _feature_map(name, shapes, large.get(name, []), height)
            if site is not None:
                sites[name] = site
    return sites


def stage_ends(model: nn.Module, maps: dict[str, Site]) -> list[Site]:
    """The last unit at each reduction, descending into containers of several stages (``maps``:
    what :func:`probe` found)."""
    units: list[Site] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = prefix + name
            if is_inserted(child):
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
    last: dict[int, Site] = {}
    for site in sorted(units, key=lambda s: order[s.name]):
        last[site.reduction] = site
    return sorted(last.values(), key=lambda s: order[s.name])


def default_sites(stage_ends: Sequence[Site]) -> list[Site]:
    """The sites :func:`reid_attention.insert_attention` uses when none are named: the stage ends
    (as :func:`reid_attention.list_sites` returns them) at reduction 4 or more (the stride-2 stem
    map is the largest of all, and the papers start at stride 4)."""
    return [site for site in stage_ends if site.reduction >= MIN_DEFAULT_REDUCTION]
