"""Name -> constructor registry: ``create_attention(name, channels, feat_size=None, **kw)``.

Every entry is called as ``factory(channels, feat_size, **kw)``; entries whose weights depend on
the map size (RGA, APNet-S) refuse a missing ``feat_size``, the others ignore it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, cast

from torch import nn

from ._checks import ArgumentError, SizeLike, check_positive_int, feat_pair

__all__ = ["create_attention", "list_attentions", "register_attention"]

Factory = Callable[..., nn.Module]


class _Entry(NamedTuple):
    factory: Factory
    needs_feat_size: bool
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register_attention(name: str, factory: Factory, *, needs_feat_size: bool, summary: str = "") -> None:
    """Register ``factory(channels, feat_size, **kw) -> nn.Module`` under ``name``."""
    if name in _REGISTRY:
        raise ArgumentError("name", name, f"attention {name!r} is already registered")
    _REGISTRY[name] = _Entry(factory, needs_feat_size, summary)


def list_attentions() -> list[str]:
    """Registered attention names, sorted."""
    return sorted(_REGISTRY)


def needs_feat_size(name: str) -> bool:
    """Whether the attention's weights depend on the feature-map size."""
    return _entry(name).needs_feat_size


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        available = ", ".join(list_attentions())
        raise ArgumentError("name", name, f"unknown attention {name!r}; available: {available}")
    return _REGISTRY[name]


def create_attention(name: str, channels: int, feat_size: SizeLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered attention for a (B, channels, *feat_size) feature map."""
    entry = _entry(name)
    check_positive_int("channels", channels)  # also for kinds without weights (pfsa)
    if entry.needs_feat_size and feat_size is None:
        message = f"attention {name!r} depends on the map size: pass feat_size=(H, W)"
        raise ArgumentError("feat_size", feat_size, message)
    return entry.factory(channels, feat_size, **kwargs)


def _rga(spatial: bool, channel: bool) -> Factory:
    def make(channels: int, feat_size: SizeLike, **kw: Any) -> nn.Module:
        from .rga import RGA

        size = cast("tuple[int, int]", feat_size)  # RGA checks it (an int is refused there)
        return RGA(channels, size, spatial=spatial, channel=channel, **kw)

    return make


def _pfsa(channels: int, feat_size: SizeLike | None, **kw: Any) -> nn.Module:
    from .pfsa import ParameterFreeSpatialAttention

    return ParameterFreeSpatialAttention(channels, **kw)


def _apnet_c(channels: int, feat_size: SizeLike | None, **kw: Any) -> nn.Module:
    from .apnet_c import APNetC

    return APNetC(channels, **kw)


def _apnet_s(channels: int, feat_size: SizeLike, *, levels: int | None = None, **kw: Any) -> nn.Module:
    """APNet-S; without ``levels``: 2, or 1 where the map height is odd (e.g. a 7x7 stage end)."""
    from ._checks import max_levels
    from .apnet_s import APNetS

    feat_size = feat_pair("APNetS", feat_size)
    if levels is None:
        levels = min(2, max_levels(feat_size[0]))
    return APNetS(channels, feat_size, levels=levels, **kw)


register_attention("rga_s", _rga(True, False), needs_feat_size=True, summary="RGA spatial (CVPR 2020)")
register_attention("rga_c", _rga(False, True), needs_feat_size=True, summary="RGA channel (CVPR 2020)")
register_attention("rga_sc", _rga(True, True), needs_feat_size=True, summary="RGA spatial then channel")
register_attention("pfsa", _pfsa, needs_feat_size=False, summary="parameter-free spatial attention")
register_attention("apnet_c", _apnet_c, needs_feat_size=False, summary="APNet channel pyramid (TIP 2021)")
register_attention("apnet_s", _apnet_s, needs_feat_size=True, summary="APNet spatial pyramid, RGA-S agents")
