"""Optional dependencies: imported where a feature needs them, failing with the command to run.

The core (``import reid_attention``, the layers, insertion) needs torch and einops only.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def require(package: str, *, feature: str, extra: str | None = None) -> ModuleType:
    """Import ``package`` for ``feature``, or raise MissingExtraError naming both and the
    ``pip install`` command (of the ``reid-attention[extra]`` that holds it, else of the package)."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as err:
        if err.name != package:  # the package is there but broken: its own error says more
            raise
        target = f'"reid-attention[{extra}]"' if extra else package
        raise MissingExtraError(f"{feature} needs {package}: pip install {target}", name=package) from None
