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
its class swapped too, for a cached subclass (:class:`AttentionSequential`) whose forward runs
every child in ``_modules`` order, attention included, while its sequence protocol (``len``,
iteration, ``[i]``, slices, edits) sees the original children only: ``model.layer4[-1]`` is the
last block and ``len(model.layer4)`` its block count, as before insertion, so Grad-CAM's
``target_layers=[model.layer4[-1]]`` and index-based surgery mean what they meant. The swapped
classes pickle as "base class + mixin", so ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep
working.

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

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import SITE_ATTR, ArgumentError, SizeLike, pair
from ._probe import (
    MIN_DEFAULT_REDUCTION,
    PROBE_BATCH,
    Site,
    check_model,
    default_sites,
    factory_kwargs_like,
    is_inserted,
    meta_output,
    probe,
    stage_ends,
)
from .registry import create_attention, needs_feat_size

__all__ = [
    "INSERT_CALL", "AttentionSequential", "AttentionSite", "AttentionSpec", "NHWCAdapter", "attach",
    "attach_mode", "new_site",
]

AttentionSpec = Union[str, Callable[..., nn.Module]]
INSERT_CALL = "insert_attention(..., **kwargs)"
# Keyword arguments insertion adds to a registry kind unless the user passes them (module docstring).
_INSERTION_DEFAULTS: Dict[str, Dict[str, object]] = {"pfsa": {"preserve_scale": True}}
# Arguments insertion passes itself, from the site's map: an error about one is the site's.
_SITE_ARGUMENTS = ("channels", "feat_size")


class NHWCAdapter(nn.Module):
    """Runs an NCHW attention on a (B, H, W, C) map and returns (B, H, W, C) (e.g. Swin stages)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- joining the model


class _Swapped:
    """Base of the mixins insertion swaps into an instance's class (``(mixin, its class)``,
    made at run time and cached per class): such a class cannot be found by name, so an instance
    pickles (and deep-copies) as "an empty instance of the cached subclass of this base, then
    this state" (:func:`new_site`)."""

    _site_base: type

    def __reduce_ex__(self, protocol):
        return new_site, (self._site_base,), self.__dict__


class AttentionSite(_Swapped):
    """Mixin of a module whose output goes through its ``attention`` child.

    An instance's class is swapped for the cached subclass ``(AttentionSite, its class)``, so
    parameters, buffers, hooks and names stay where they were.
    """

    def forward(self, *args, **kwargs):
        return self.attention(super().forward(*args, **kwargs))


class AttentionSequential(_Swapped):
    """Mixin of an ``nn.Sequential`` (or a subclass that keeps its forward) holding inserted
    attention among its children, as ``"append"`` (``attention``, on the container's output)
    and ``"sibling"`` (``<child>_attention``, on that child's output) place it.

    The attention is a real child: ``_modules``, ``children()``, ``named_modules()``,
    ``state_dict()`` and ``repr`` show it, and :meth:`forward` runs every child in ``_modules``
    order, attention included (torch.fx traces it, so ``create_feature_extractor`` sees it).
    The *sequence* protocol sees the original children only, as in the plain model: ``len``,
    iteration, ``in``, ``container[i]`` (so ``layer4[-1]`` is the last block, the Grad-CAM
    target, whose output is the map *before* the attention), assignment, deletion,
    ``append`` / ``insert`` / ``extend`` / ``pop`` / ``+=`` / ``*=`` (edits keep each sibling
    attention after its child and the container's own attention last), and ``+`` / ``*``
    (plain containers of the original children, as nn.Sequential builds them). A slice
    ``container[a:b]`` holds the original children it selects and, after each, the sibling
    attention of that child (a stretch of the model computes what it computes in the model);
    the container's own ``attention`` runs on the whole container's output and is in no slice.
    """

    _attention_keys: Tuple[str, ...]  # the inserted children's names (instance attribute)
    _output_key: Optional[str]  # the one on the container's own output (instance attribute)

    def forward(self, input):
        for module in self._modules.values():
            input = module(input)
        return input

    # --- the original children

    def _original_items(self) -> List[Tuple[str, nn.Module]]:
        return [(k, m) for k, m in self._modules.items() if k not in self._attention_keys]

    def __len__(self) -> int:
        return len(self._original_items())

    def __iter__(self):
        return iter([m for _, m in self._original_items()])

    def __getitem__(self, idx):
        items = self._original_items()
        if isinstance(idx, slice):
            return self._slice(items[idx])
        return nn.Sequential._get_item_by_idx(self, [m for _, m in items], idx)

    def __setitem__(self, idx, module: nn.Module) -> None:
        key = nn.Sequential._get_item_by_idx(self, [k for k, _ in self._original_items()], idx)
        setattr(self, key, module)  # in place: a sibling attention stays after the new child

    def __delitem__(self, idx) -> None:
        self._edit(lambda view: nn.Sequential.__delitem__(view, idx))

    def append(self, module: nn.Module):
        self._edit(lambda view: nn.Sequential.append(view, module))
        return self

    def insert(self, index: int, module: nn.Module):
        self._edit(lambda view: nn.Sequential.insert(view, index, module))
        return self

    def __iadd__(self, other):
        self._edit(lambda view: nn.Sequential.__iadd__(view, other))
        return self

    def __imul__(self, other: int):
        self._edit(lambda view: nn.Sequential.__imul__(view, other))
        return self

    # --- keeping the inserted children in place

    def _siblings(self) -> Tuple[Dict[int, List[Tuple[str, nn.Module]]], list]:
        """The sibling attention after each original child (by the child's id; one before any
        child in the second list) and the container's own attention entry (a list of 0 or 1)."""
        after: Dict[int, List[Tuple[str, nn.Module]]] = {}
        own, anchor = [], None
        for key, module in self._modules.items():
            if key not in self._attention_keys:
                anchor = id(module)
            elif key == self._output_key:
                own.append((key, module))
            else:
                after.setdefault(anchor, []).append((key, module))
        return after, own

    def _edit(self, change: Callable[[nn.Sequential], object]) -> None:
        """Apply nn.Sequential's own ``change`` to a plain container of the original children
        (so keys, checks and errors are nn.Sequential's), then put the inserted children back:
        each sibling attention after its child (that of a removed child after the nearest kept
        child before it), the container's own attention last."""
        originals = self._original_items()
        view = nn.Sequential()
        view._modules.update(originals)
        change(view)
        after, own = self._siblings()
        kept = {id(m) for m in view._modules.values()}
        anchor = None
        for _, module in originals:
            if id(module) in kept:
                anchor = id(module)
            elif id(module) in after:
                after.setdefault(anchor, []).extend(after.pop(id(module)))
        entries = list(after.pop(None, []))
        for key, module in view._modules.items():
            entries.append((key, module))
            entries.extend(after.pop(id(module), []))
        self._modules.clear()
        self._modules.update(entries + own)

    def _slice(self, chosen: List[Tuple[str, nn.Module]]) -> nn.Sequential:
        """The plain container's slice (``type(container)(OrderedDict(items))``) with the sibling
        attention of the children it holds."""
        out = self._site_base(OrderedDict(chosen))
        after, _ = self._siblings()
        carried = [entry for _, module in chosen for entry in after.get(id(module), [])]
        if carried:
            _adopt(out)
            entries = [e for key, module in chosen for e in [(key, module)] + after.get(id(module), [])]
            out._modules.clear()
            out._modules.update(entries)
            out._attention_keys = tuple(key for key, _ in carried)
        return out


_SITE_CLASSES: Dict[type, type] = {}


def _with_attention(cls: type) -> type:
    """The cached subclass ``(AttentionSequential, cls)`` of an ``nn.Sequential`` class, else
    ``(AttentionSite, cls)``."""
    if cls not in _SITE_CLASSES:
        mixin = AttentionSequential if issubclass(cls, nn.Sequential) else AttentionSite
        _SITE_CLASSES[cls] = type(
            f"{cls.__name__}WithAttention", (mixin, cls), {"_site_base": cls, "__module__": __name__}
        )
    return _SITE_CLASSES[cls]


def new_site(base: type) -> nn.Module:
    """Unpickling helper: an empty instance of ``base`` with attention (state is set after)."""
    cls = _with_attention(base)
    return cls.__new__(cls)


def _adopt(container: nn.Sequential) -> AttentionSequential:
    """Swap a Sequential's class for its :class:`AttentionSequential` subclass (once)."""
    if not isinstance(container, AttentionSequential):
        container.__class__ = _with_attention(type(container))
        container._attention_keys, container._output_key = (), None
    return container


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


def _attention_after(model: nn.Module, name: str) -> Optional[str]:
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
        site.__class__ = _with_attention(type(site))
        site.add_module("attention", attention)
        return
    if mode == "append":
        _adopt(site).add_module("attention", attention)  # last in _modules: runs on the output
        site._attention_keys += ("attention",)
        site._output_key = "attention"
        return
    parent_name, _, leaf = name.rpartition(".")
    parent = _adopt(model.get_submodule(parent_name))
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
    attention: AttentionSpec, kwargs: Dict[str, object], factory_kwargs: Dict[str, object]
) -> Callable[[int, Tuple[int, int]], nn.Module]:
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


def _build(make: Callable, site: Site, factory_kwargs: Dict[str, object], call: str) -> nn.Module:
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
    model: nn.Module, maps: Dict[str, Site], sites: Optional[Union[str, Sequence[str]]]
) -> List[Site]:
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
    sites: Optional[Union[str, Sequence[str]]],
    input_size: SizeLike,
    kwargs: Dict[str, object],
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
