"""Attaching attention after probed sites: choosing the sites, building one attention module per
site, and joining each to the model as a real child module.

**How a module joins the model** (:func:`attach_mode`). The attention is a real child module (no
forward hooks: torch.fx, and so ``create_feature_extractor``, silently drops them), no existing
module is moved or renamed, so every original state_dict key is unchanged and a checkpoint of the
unwrapped model loads with ``strict=False`` reporting only the new attention keys as missing:

* ``"append"``: a plain ``nn.Sequential`` site (ResNet's ``layer1``, EfficientNet's stages) gets
  the attention appended as a child named ``attention``, last in its ``_modules``;
* ``"sibling"``: a site whose forward iterates its children in its own way (``nn.ModuleDict`` /
  ``nn.ModuleList`` / a Sequential with its own forward: DenseNet's dense blocks) gets the
  attention as the next sibling, ``<site>_attention``, in its parent, which must be a plain
  Sequential;
* ``"swap"``: any other module's class is swapped for a cached subclass (:class:`AttentionSite`)
  whose forward calls the original forward, then the ``attention`` child.

A Sequential that receives attention (the site in ``"append"``, the parent in ``"sibling"``) has
its class swapped too (:mod:`reid_attention._swapped`): its forward runs the attention in place,
its sequence protocol sees the original children only.

On an NHWC site the attention is wrapped in :class:`NHWCAdapter`, so it sees (B, C, H, W) and the
stage's (B, H, W, C) layout is restored. Every inserted module (the layer, and its adapter) is
tagged with the name of its site (attribute ``_checks.SITE_ATTR``): a second insertion at the same
site is refused, probes see through it, ``resize_attention`` finds its site, and the layers'
errors name it.

**What is built.** A registry name is built with the registry's defaults, except where a layer's
own default is meant for another place: PFSA is built with ``preserve_scale=True`` (its official
map sums to 1 and would divide a main-path map by H*W; the official form is for side branches
right before pooling: pass ``preserve_scale=False``). A build refused because of one argument
(:class:`~reid_attention._checks.ArgumentError`) names the site and says to pass that argument
through the call the user made (``insert_attention(..., **kwargs)`` or a preset's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Union, cast

import torch
from torch import Tensor, nn

from ._checks import SITE_ATTR, ArgumentError, SizeLike, pair
from ._probe import (
    MIN_DEFAULT_REDUCTION,
    PROBE_BATCH,
    FactoryKwargs,
    Site,
    check_model,
    default_sites,
    factory_kwargs_like,
    is_inserted,
    meta_output,
    probe,
    stage_ends,
)
from ._swapped import AttentionSequential, adopt, with_attention
from .registry import create_attention, needs_feat_size

__all__ = ["INSERT_CALL", "AttentionSpec", "NHWCAdapter", "attach", "attach_mode"]

AttentionSpec = Union[str, Callable[..., nn.Module]]
INSERT_CALL = "insert_attention(..., **kwargs)"
# Keyword arguments insertion adds to a registry kind unless the user passes them (module docstring).
_INSERTION_DEFAULTS: dict[str, dict[str, object]] = {"pfsa": {"preserve_scale": True}}
# Arguments insertion passes itself, from the site's map: an error about one is the site's.
_SITE_ARGUMENTS = ("channels", "feat_size")


class NHWCAdapter(nn.Module):
    """Runs an NCHW attention on a (B, H, W, C) map and returns (B, H, W, C) (e.g. Swin stages)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.attention(x.permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- joining the model


def _iterates_children(module: nn.Module) -> bool:
    """Whether the module's forward may call every child (so an extra child cannot be added)."""
    if isinstance(module, AttentionSequential):  # runs its children, inserted ones in their places
        return False
    if isinstance(module, nn.Sequential):
        return type(module).forward is not nn.Sequential.forward
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def attach_mode(model: nn.Module, name: str) -> str:
    """How attention joins the model after module ``name``: ``"append"``, ``"sibling"`` or
    ``"swap"`` (module docstring); a ValueError where none can."""
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


def _attention_after(model: nn.Module, name: str) -> str | None:
    """The qualified name of the attention already inserted after site ``name``, if any."""
    parent, _, leaf = name.rpartition(".")
    modules = dict(model.named_modules())
    for candidate in (f"{name}.attention", f"{parent}.{leaf}_attention" if parent else f"{leaf}_attention"):
        if candidate in modules and is_inserted(modules[candidate]):
            return candidate
    return None


def _join(model: nn.Module, name: str, attention: nn.Module) -> None:
    """Make ``attention`` run on the output of module ``name``, as :func:`attach_mode` says."""
    site = model.get_submodule(name)
    mode = attach_mode(model, name)
    if mode == "swap":
        site.__class__ = with_attention(type(site))
        site.add_module("attention", attention)
        return
    if mode == "append":  # site is a plain nn.Sequential (attach_mode)
        container = adopt(cast(nn.Sequential, site))
        container.add_module("attention", attention)  # last in _modules: runs on the output
        container._attention_keys += ("attention",)
        container._output_key = "attention"
        return
    parent_name, _, leaf = name.rpartition(".")
    parent = adopt(cast(nn.Sequential, model.get_submodule(parent_name)))  # (attach_mode)
    key = f"{leaf}_attention"
    children = list(parent._modules.items())
    parent._modules.clear()
    for child_name, child in children:
        parent._modules[child_name] = child
        if child_name == leaf:
            parent._modules[key] = attention
    parent._attention_keys += (key,)


# --------------------------------------------------------------------------- building


def _attention_factory(
    attention: AttentionSpec, kwargs: dict[str, Any], factory_kwargs: FactoryKwargs
) -> Callable[[int, tuple[int, int]], object]:
    """``(channels, feat_size) -> module`` for a registry name (with the insertion defaults, built
    directly with ``factory_kwargs``: the model's device and dtype) or a user's factory."""
    if isinstance(attention, str):
        needs_feat_size(attention)  # ValueError listing the registered names if unknown
        kwargs = {**factory_kwargs, **_INSERTION_DEFAULTS.get(attention, {}), **kwargs}
        return lambda channels, feat_size: create_attention(attention, channels, feat_size, **kwargs)
    if callable(attention):
        return lambda channels, feat_size: attention(channels, feat_size, **kwargs)
    raise TypeError(
        "attention must be a registered name (see reid_attention.list_attentions()) or a factory "
        f"(channels, feat_size) -> nn.Module, got {type(attention).__name__}"
    )


def _remedy(err: ValueError, call: str) -> str:
    """Where to change what a build error refused, from the error's data: the argument an
    :class:`ArgumentError` names (unless the site gave it), passed through ``call``."""
    argument = err.argument.partition("[")[0] if isinstance(err, ArgumentError) else None
    if argument is None or argument in _SITE_ARGUMENTS:
        return f"the attention's arguments pass through {call}"
    return f"pass {argument}= through {call}"


def _build(
    make: Callable[[int, tuple[int, int]], object], site: Site, factory_kwargs: FactoryKwargs, call: str
) -> nn.Module:
    """Build the attention for ``site``, check on the meta device that it maps the site's
    (B, C, H, W) map to the same shape, and place it like the model (``factory_kwargs``: device,
    dtype). Build errors name the site and the argument to pass through ``call``."""
    what = f"site {site.name!r} ({site.channels} channels, feat_size {site.feat_size})"
    try:
        module = make(site.channels, site.feat_size)
    except ValueError as err:  # a width or divisibility the map does not allow
        message = f"the attention cannot be built for {what}: {err}; {_remedy(err, call)}"
        if isinstance(err, ArgumentError):
            raise ArgumentError(err.argument, err.value, message) from err
        raise ValueError(message) from err
    except TypeError as err:  # e.g. a keyword the layer does not take
        raise TypeError(f"the attention cannot be built for {what}: {err}") from err
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"the attention factory must return an nn.Module, got {type(module).__name__} for {what}"
        )
    shape = (PROBE_BATCH, site.channels, *site.feat_size)
    try:
        out = meta_output(module, shape, factory_kwargs.get("dtype", torch.float32))
    except Exception as err:  # a foreign factory may fail in any way: report it at the boundary
        raise ValueError(f"the attention cannot take the map of {what}: {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the attention must keep the map's shape {shape} at {what}, got {got}")
    module = module.to(**factory_kwargs)  # a user's factory builds on the default device
    setattr(module, SITE_ATTR, site.name)
    if site.layout == "NHWC":
        module = NHWCAdapter(module)
        setattr(module, SITE_ATTR, site.name)
    return module


def _choose_sites(
    model: nn.Module, maps: dict[str, Site], sites: str | Sequence[str] | None
) -> list[Site]:
    """Validate ``sites`` against the probe's ``maps`` (None: the default sites) and check that
    attention can join the model after each, before anything is built."""
    ends = stage_ends(model, maps)
    listing = (
        f"stage ends: {', '.join(f'{s.name} (stride {s.reduction})' for s in ends)}; any of the "
        f"{len(maps)} modules that output a feature map once per forward is accepted "
        "(list_sites(model, input_size, stages_only=False))"
    )
    if sites is None:
        chosen = default_sites(ends)
        if not chosen:
            raise ValueError(
                f"no stage end at reduction >= {MIN_DEFAULT_REDUCTION} was found; {listing}. Attention "
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
        existing = _attention_after(model, site.name)
        if existing is not None:
            free = [s.name for s in ends if _attention_after(model, s.name) is None]
            raise ValueError(
                f"site {site.name!r} already has attention ({existing}); stage ends without attention: {free}"
            )
        attach_mode(model, site.name)
    return chosen


def attach(
    model: nn.Module,
    attention: AttentionSpec,
    *,
    sites: str | Sequence[str] | None,
    input_size: SizeLike,
    kwargs: dict[str, object],
    call: str = INSERT_CALL,
) -> nn.Module:
    """The work of :func:`reid_attention.insert_attention` (see it), with build errors saying to
    pass arguments through ``call``: the text of the call the user made (a preset passes its own).
    Everything is validated and built before the model changes."""
    check_model(model)
    factory_kwargs = factory_kwargs_like(model)
    make = _attention_factory(attention, kwargs, factory_kwargs)
    maps = probe(model, pair("input_size", input_size))
    chosen = _choose_sites(model, maps, sites)
    built = [_build(make, site, factory_kwargs, call) for site in chosen]
    if len({id(m) for m in built}) != len(built):
        raise ValueError(
            "the attention factory returned the same module for two sites; it must build a new one"
        )
    for site, module in zip(chosen, built):
        module.train(model.get_submodule(site.name).training)
        _join(model, site.name, module)
    return model
