"""What fast-reid 1.4.0 needs to run on torch 2 / Python >= 3.10 and without CUDA: the opt-in
patches of :func:`patch_for_torch2` (see the package docstring)."""

from __future__ import annotations

import collections
import collections.abc
import importlib
import importlib.util
import logging
import math
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch

from ._deps import import_fastreid

__all__ = ["build_cython_evaluator", "patch_for_torch2", "unpatch_for_torch2"]

_log = logging.getLogger("reid_attention.integrations.fastreid")



_undo: dict[str, Callable[[], None] | None] = {}  # applied (or found unneeded) -> its undo
_settings = {"compile_evaluator": True}


def _shim_torch_six() -> Callable[[], None] | None:
    """``torch._six`` (removed in torch 2.0), imported by ``fastreid.data.build`` for
    ``string_classes``: a module with what torch 1.x's held."""
    if "torch._six" in sys.modules:  # torch 1.x's, imported already, or someone else's stand-in
        return None
    try:
        native = importlib.util.find_spec("torch._six")
    except (ImportError, ValueError):
        native = None
    if native is not None:  # torch 1.x
        return None
    six = types.ModuleType("torch._six", "torch 1.x's torch._six for fastreid 1.4.0 (reid_attention)")
    vars(six).update(string_classes=(str, bytes), int_classes=int, inf=math.inf, nan=math.nan,
                     container_abcs=collections.abc)
    sys.modules["torch._six"] = six

    def undo() -> None:
        if sys.modules.get("torch._six") is six:
            del sys.modules["torch._six"]
        if getattr(torch, "_six", None) is six:
            del torch._six  # type: ignore[attr-defined]  # the stand-in, set by importing it

    return undo


def _alias_mapping() -> Callable[[], None] | None:
    """``collections.Mapping`` (removed in Python 3.10), imported by ``fastreid.data.build`` and
    ``fastreid.evaluation.testing``: an alias of ``collections.abc.Mapping``."""
    if hasattr(collections, "Mapping"):
        return None
    collections.Mapping = collections.abc.Mapping  # type: ignore[attr-defined]  # the patch itself

    def undo() -> None:
        if getattr(collections, "Mapping", None) is collections.abc.Mapping:
            del collections.Mapping  # type: ignore[attr-defined]  # the patch's alias

    return undo


def _cpu_safe(original: type) -> type:
    from torch.utils.data import DataLoader

    class DataLoaderX(original):  # type: ignore[misc]  # a base known at run time (fast-reid's, untyped)
        """fast-reid's DataLoaderX where CUDA is available (a CUDA stream and a thread prefetch
        the batches onto the GPU); without CUDA, where it cannot even be built (it creates a
        ``torch.cuda.Stream``), a plain DataLoader with the same arguments (no pinned memory)."""

        def __init__(self, local_rank: int, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                super().__init__(local_rank, **kwargs)
                return
            kwargs["pin_memory"] = False
            DataLoader.__init__(self, **kwargs)
            self.stream = None
            self.local_rank = local_rank

        def __iter__(self) -> Iterator[Any]:
            if self.stream is None:
                return DataLoader.__iter__(self)
            return super().__iter__()

        def shutdown(self) -> None:
            if self.stream is not None:
                super().shutdown()

    DataLoaderX.__qualname__ = f"cpu_safe({original.__qualname__})"
    return DataLoaderX


def _replace_data_loader() -> Callable[[], None]:
    """``fastreid.data``'s DataLoaderX (used by the train and test loaders) -> :func:`_cpu_safe`."""
    data_utils = import_fastreid("fastreid.data.data_utils", "patch_for_torch2")
    build = import_fastreid("fastreid.data.build", "patch_for_torch2")
    original = data_utils.DataLoaderX
    safe = _cpu_safe(original)
    data_utils.DataLoaderX = build.DataLoaderX = safe  # type: ignore[attr-defined]  # monkeypatch

    def undo() -> None:
        for module in (data_utils, build):
            if module.DataLoaderX is safe:
                module.DataLoaderX = original  # type: ignore[attr-defined]  # monkeypatch

    return undo


def build_cython_evaluator(directory: str | None = None) -> bool:
    """Compile fast-reid's Cython rank evaluation (``fastreid/evaluation/rank_cylib``, or
    ``directory``) in place with this interpreter; whether it worked. fast-reid's own
    ``compile_helper`` runs ``make``, i.e. ``python3 setup.py build_ext`` with whatever
    ``python3`` is first on PATH, and ends the process (``sys.exit(1)``) when that fails."""
    if directory is None:
        cylib = import_fastreid("fastreid.evaluation.rank_cylib", "build_cython_evaluator")
        assert cylib.__file__ is not None  # a package with an __init__.py
        directory = os.path.dirname(cylib.__file__)
    if importlib.util.find_spec("Cython") is None:
        warnings.warn("fast-reid's Cython evaluation is not compiled and Cython is not installed: fast-reid "
                      'evaluates in Python (same results, slower); pip install "reid-attention[fastreid]"',
                      stacklevel=2)
        return False
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=directory,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        warnings.warn(f"compiling fast-reid's Cython evaluation in {directory} failed ({' / '.join(tail)}): "
                      "fast-reid evaluates in Python (same results, slower)", stacklevel=2)
        return False
    importlib.invalidate_caches()
    return True


def _compile_helper() -> None:
    """fast-reid's ``compile_helper``, without ending the process: compile (if enabled) or warn."""
    if _settings["compile_evaluator"]:
        build_cython_evaluator()
    else:
        _log.info("fast-reid's Cython evaluation is not compiled (compile_evaluator=False): "
                  "fast-reid evaluates in Python")


def _replace_compile_helper() -> Callable[[], None]:
    """``ReidEvaluator`` compiles the Cython evaluation at construction with ``compile_helper``,
    which calls ``sys.exit(1)`` on failure -> :func:`_compile_helper`."""
    evaluation = import_fastreid("fastreid.evaluation.reid_evaluation", "patch_for_torch2")
    original = evaluation.compile_helper
    evaluation.compile_helper = _compile_helper  # type: ignore[attr-defined]  # monkeypatch

    def undo() -> None:
        if evaluation.compile_helper is _compile_helper:
            evaluation.compile_helper = original  # type: ignore[attr-defined]  # monkeypatch

    return undo


_PATCHES = {
    "torch._six": _shim_torch_six,
    "collections.Mapping": _alias_mapping,
    "fastreid.data.DataLoaderX": _replace_data_loader,
    "fastreid.evaluation.compile_helper": _replace_compile_helper,
}


def patch_for_torch2(*, compile_evaluator: bool = True) -> list[str]:
    """Make fast-reid 1.4.0 run on torch 2, Python >= 3.10 and machines without CUDA; return the
    names of the patches this call applied (none when applied already: it is idempotent).

    fast-reid's release predates torch 2 and cannot be installed with its pins on Python 3.11, so
    this is an explicit opt-in, process-wide, undone by :func:`unpatch_for_torch2`. Call it before
    importing ``fastreid.data``, ``fastreid.engine`` or ``fastreid.evaluation``:

    * ``torch._six``: removed in torch 2.0, imported by ``fastreid.data.build``: a stand-in module
      (``string_classes``, ``int_classes``, ``inf``, ``nan``, ``container_abcs``) in
      ``sys.modules``. Skipped where torch has it.
    * ``collections.Mapping``: removed in Python 3.10, imported by ``fastreid.data.build`` and
      ``fastreid.evaluation.testing``: an alias of ``collections.abc.Mapping``. Skipped where
      present.
    * ``fastreid.data.DataLoaderX``: fast-reid's train and test loaders create a
      ``torch.cuda.Stream`` and a CUDA prefetch thread, which fail without CUDA: replaced by a
      subclass that is fast-reid's loader where CUDA is available and a plain DataLoader
      otherwise.
    * ``fastreid.evaluation.compile_helper``: ``ReidEvaluator`` compiles the Cython evaluation on
      first use by running ``make`` (``python3`` from PATH, which may lack Cython or numpy) and
      calls ``sys.exit(1)`` if that fails. Replaced by :func:`build_cython_evaluator` (this
      interpreter; a warning, not an exit, on failure) when ``compile_evaluator`` (default), or by
      nothing; either way a failed or skipped compile leaves fast-reid's Python evaluation, same
      CMC and mAP, slower. The compiled module is written into the installed fastreid package,
      once.

    Not patched: ``cfg.OUTPUT_DIR`` must exist before ``DefaultTrainer(cfg)`` (fast-reid's
    ``default_setup`` or :func:`prepare_output_dir` creates it), and ``MODEL.DEVICE: cpu`` is a
    config setting.
    """
    if not isinstance(compile_evaluator, bool):
        raise TypeError(f"compile_evaluator must be a bool, got {type(compile_evaluator).__name__}")
    import_fastreid("fastreid", "reid_attention.integrations.fastreid.patch_for_torch2")
    _settings["compile_evaluator"] = compile_evaluator
    applied = []
    for name, patch in _PATCHES.items():
        if name in _undo:
            continue
        _undo[name] = patch()
        if _undo[name] is not None:
            applied.append(name)
    return applied


def unpatch_for_torch2() -> list[str]:
    """Undo :func:`patch_for_torch2` (what it applied, in reverse order); return the names undone.
    fastreid modules imported meanwhile keep what they imported (their ``Mapping``,
    ``string_classes``): fastreid needs the patches for as long as it is used."""
    undone = []
    for name in reversed(list(_undo)):
        undo = _undo.pop(name)
        if undo is not None:
            undo()
            undone.append(name)
    return undone
