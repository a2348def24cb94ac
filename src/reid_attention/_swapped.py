"""The classes insertion swaps into a module's class, so attention runs as a real child.

* :class:`AttentionSite`: a module whose output goes through its ``attention`` child (the
  ``"swap"`` mode of :func:`reid_attention._attach.attach_mode`).
* :class:`AttentionSequential`: a Sequential holding inserted attention among its children (the
  ``"append"`` and ``"sibling"`` modes).

A Sequential that receives attention (the site in ``"append"``, the parent in ``"sibling"``) has
its class swapped too, for a cached subclass (:class:`AttentionSequential`) whose forward runs
every child in ``_modules`` order, attention included, while its sequence protocol (``len``,
iteration, ``[i]``, slices, edits) sees the original children only: ``model.layer4[-1]`` is the
last block and ``len(model.layer4)`` its block count, as before insertion, so Grad-CAM's
``target_layers=[model.layer4[-1]]`` and index-based surgery mean what they meant. The swapped
classes pickle as "base class + mixin", so ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep
working.

Each is a mixin: an instance's class becomes the cached subclass ``(mixin, its class)``
(:func:`with_attention`), so parameters, buffers, hooks and names stay where they were.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, SupportsIndex, TypeVar, cast, overload

from torch import nn

__all__ = ["AttentionSequential", "AttentionSite", "adopt", "new_site", "with_attention"]

if TYPE_CHECKING:  # the mixins only ever join these classes (with_attention)
    from typing_extensions import Self

    _ModuleBase = nn.Module
    _SequentialBase = nn.Sequential
else:
    _ModuleBase = _SequentialBase = object


class _Swapped:
    """Base of the mixins insertion swaps into an instance's class (``(mixin, its class)``,
    made at run time and cached per class): such a class cannot be found by name, so an instance
    pickles (and deep-copies) as "an empty instance of the cached subclass of this base, then
    this state" (:func:`new_site`)."""

    _site_base: type[nn.Module]

    def __reduce_ex__(
        self, protocol: SupportsIndex
    ) -> tuple[Callable[[type[nn.Module]], nn.Module], tuple[type[nn.Module]], dict[str, Any]]:
        return new_site, (self._site_base,), self.__dict__


class AttentionSite(_Swapped, _ModuleBase):
    """Mixin of a module whose output goes through its ``attention`` child.

    An instance's class is swapped for the cached subclass ``(AttentionSite, its class)``, so
    parameters, buffers, hooks and names stay where they were.
    """

    attention: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.attention(super().forward(*args, **kwargs))


class AttentionSequential(_Swapped, _SequentialBase):
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

    _site_base: type[nn.Sequential]
    _attention_keys: tuple[str, ...]  # the inserted children's names (instance attribute)
    _output_key: str | None  # the one on the container's own output (instance attribute)

    def forward(self, input: Any) -> Any:
        for module in self._modules.values():
            input = module(input)
        return input

    # --- the original children

    def _original_items(self) -> list[tuple[str, nn.Module]]:
        return [(k, m) for k, m in self._modules.items() if k not in self._attention_keys]

    def __len__(self) -> int:
        return len(self._original_items())

    def __iter__(self) -> Iterator[nn.Module]:
        return iter([m for _, m in self._original_items()])

    @overload
    def __getitem__(self, idx: slice) -> nn.Sequential: ...

    @overload
    def __getitem__(self, idx: int) -> nn.Module: ...

    def __getitem__(self, idx: int | slice) -> nn.Module:
        items = self._original_items()
        if isinstance(idx, slice):
            return self._slice(items[idx])
        return nn.Sequential._get_item_by_idx(self, [m for _, m in items], idx)

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        key = nn.Sequential._get_item_by_idx(self, [k for k, _ in self._original_items()], idx)
        setattr(self, key, module)  # in place: a sibling attention stays after the new child

    def __delitem__(self, idx: int | slice) -> None:
        self._edit(lambda view: nn.Sequential.__delitem__(view, idx))

    def append(self, module: nn.Module) -> Self:
        self._edit(lambda view: nn.Sequential.append(view, module))
        return self

    def insert(self, index: int, module: nn.Module) -> Self:
        self._edit(lambda view: nn.Sequential.insert(view, index, module))
        return self

    def __iadd__(self, other: Any) -> Self:
        self._edit(lambda view: nn.Sequential.__iadd__(view, other))
        return self

    def __imul__(self, other: int) -> Self:
        self._edit(lambda view: nn.Sequential.__imul__(view, other))
        return self

    # --- keeping the inserted children in place

    def _siblings(self) -> tuple[dict[int | None, list[tuple[str, nn.Module]]], list[tuple[str, nn.Module]]]:
        """The sibling attention after each original child (by the child's id; one before any
        child in the second list) and the container's own attention entry (a list of 0 or 1)."""
        after: dict[int | None, list[tuple[str, nn.Module]]] = {}
        own: list[tuple[str, nn.Module]] = []
        anchor: int | None = None
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
        anchor: int | None = None
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

    def _slice(self, chosen: list[tuple[str, nn.Module]]) -> nn.Sequential:
        """The plain container's slice (``type(container)(OrderedDict(items))``) with the sibling
        attention of the children it holds."""
        out = self._site_base(OrderedDict(chosen))
        after, _ = self._siblings()
        carried = [entry for _, module in chosen for entry in after.get(id(module), [])]
        if carried:
            adopted = adopt(out)
            entries = [e for key, module in chosen for e in [(key, module)] + after.get(id(module), [])]
            adopted._modules.clear()
            adopted._modules.update(entries)
            adopted._attention_keys = tuple(key for key, _ in carried)
        return out


_M = TypeVar("_M", bound=nn.Module)
_SITE_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def with_attention(cls: type[_M]) -> type[_M]:
    """The cached subclass ``(AttentionSequential, cls)`` of an ``nn.Sequential`` class, else
    ``(AttentionSite, cls)``."""
    if cls not in _SITE_CLASSES:
        mixin = AttentionSequential if issubclass(cls, nn.Sequential) else AttentionSite
        _SITE_CLASSES[cls] = type(
            f"{cls.__name__}WithAttention", (mixin, cls), {"_site_base": cls, "__module__": __name__}
        )
    return cast("type[_M]", _SITE_CLASSES[cls])


def new_site(base: type[nn.Module]) -> nn.Module:
    """Unpickling helper: an empty instance of ``base`` with attention (state is set after)."""
    cls = with_attention(base)
    return cls.__new__(cls)


def adopt(container: nn.Sequential) -> AttentionSequential:
    """Swap a Sequential's class for its :class:`AttentionSequential` subclass (once)."""
    if isinstance(container, AttentionSequential):
        return container
    container.__class__ = with_attention(type(container))
    adopted = cast(AttentionSequential, container)
    adopted._attention_keys, adopted._output_key = (), None
    return adopted
