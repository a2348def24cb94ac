"""Importing fast-reid with one clear message for what is missing (its install takes two steps)."""

from __future__ import annotations

import types

from ..._extras import MissingExtraError, require

__all__ = ["EXTRA", "INSTALL", "import_fastreid"]

EXTRA = "fastreid"
INSTALL = f'pip install "reid-attention[{EXTRA}]" && pip install --no-deps fastreid==1.4.0'


def import_fastreid(package: str, feature: str) -> types.ModuleType:
    """``package`` (fastreid or one of its modules), or a one-line MissingExtraError with the
    two-step install (the extra does not hold fastreid) or naming the dependency it lacks."""
    try:
        return require(package, feature=feature, extra=EXTRA)
    except MissingExtraError:
        raise MissingExtraError(f"{feature} needs fastreid: {INSTALL}", name="fastreid") from None
    except ModuleNotFoundError as err:  # fastreid is there, one of its dependencies not
        missing = (err.name or "a module").split(".")[0]
        if missing == "fastreid":
            raise MissingExtraError(f"{feature} needs fastreid: {INSTALL}", name="fastreid") from None
        if missing == "torch":  # torch._six: fastreid.data imported before the patches
            raise ModuleNotFoundError(
                f"{feature}: fastreid 1.4.0 imports {err.name}, which torch 2 removed: call "
                "reid_attention.integrations.fastreid.patch_for_torch2() first", name=err.name
            ) from None
        raise MissingExtraError(
            f'{feature} needs {missing}, which fastreid imports: pip install "reid-attention[{EXTRA}]"',
            name=missing,
        ) from None
