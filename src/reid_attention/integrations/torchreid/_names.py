"""The model names of the torchreid integration: the presets and ``<backbone>_<kind>``."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ..._extras import MissingExtraError, require
from ...presets import VARIANTS

__all__ = ["EXTRA", "PRESETS", "import_torchreid", "kinds", "model_names", "parse_name", "torchvision_models"]

EXTRA = "torchreid"
#: The preset names, each the preset function and the arguments it fixes (``presets.VARIANTS``).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = VARIANTS


def import_torchreid(feature: str) -> ModuleType:
    """torchreid, or a one-line MissingExtraError (also for the dependencies its wheel omits)."""
    try:
        return require("torchreid", feature=feature, extra=EXTRA)
    except MissingExtraError:
        raise
    except ModuleNotFoundError as err:  # torchreid is there, one of its undeclared dependencies not
        package = (err.name or "a module").split(".")[0]
        raise MissingExtraError(
            f"{feature} needs {package}, which torchreid imports: pip install \"reid-attention[{EXTRA}]\"",
            name=package,
        ) from None


def torchvision_models(feature: str) -> list[str]:
    require("torchvision", feature=feature, extra=EXTRA)
    return list(_classification_models())


@functools.cache
def _classification_models() -> tuple[str, ...]:
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def kinds() -> list[str]:
    from ... import list_attentions

    return sorted(list_attentions(), key=len, reverse=True)  # "rga_sc" is tried before "rga_s"


def parse_name(name: str) -> tuple[str, str]:
    """``(backbone, kind)`` for a ``<backbone>_<kind>`` name (``"resnet50_rga_sc"`` ->
    ``("resnet50", "rga_sc")``), ``("preset", name)`` for a preset name; ``ValueError`` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name in PRESETS:
        return "preset", name
    for kind in kinds():
        backbone = name[: -len(kind) - 1]
        if name.endswith("_" + kind) and backbone in torchvision_models(f"model {name!r}"):
            return backbone, kind
    raise ValueError(
        f"unknown model {name!r}: expected a preset ({', '.join(PRESETS)}) or "
        f"'<torchvision backbone>_<kind>' with kind in ({', '.join(sorted(kinds()))}), "
        "e.g. 'resnet50_rga_sc'"
    )


def model_names() -> list[str]:
    """Every name :func:`register_models` registers by default: the presets, then
    ``<backbone>_<kind>`` for every torchvision classification model and attention kind."""
    backbones = torchvision_models("reid_attention.integrations.torchreid.model_names")
    return list(PRESETS) + [f"{b}_{k}" for b in backbones for k in sorted(kinds())]
