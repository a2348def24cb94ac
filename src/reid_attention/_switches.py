"""The two run-time switches of the layers: ``impl`` (every layer) and ``memory`` (RGA, APNet-S)."""

from __future__ import annotations

import warnings
from typing import NoReturn

from ._checks import ArgumentError

IMPLS = ("reference", "fused")
MEMORY_MODES = ("auto", "full", "lean")
# memory="auto" takes the lean form for a call whose relation embedding holds at least this many values
# (batch x agents x n/s x n); below it the full form is faster (benchmarks/lean_vs_default.py, settled rows:
# lean 1.03x-1.51x of full's time below the line, 0.46x-1.07x at or above it; 2026-12-07, AMD EPYC).
AUTO_LEAN_ELEMENTS = 1 << 22


def check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ArgumentError("impl", impl, f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class ImplSwitch:
    """Mixin of every layer: the ``impl`` attribute ("reference" | "fused"), validated on every
    assignment, and a clear refusal of ``torch.jit.script``.

    TorchScript (in maintenance in PyTorch) cannot compile the layers' Python-level dispatch
    (the impl switch, norm routing, autograd Functions); ``torch.jit.trace``, ``torch.export``
    and ONNX export record the computation instead and are supported.
    """

    _impl: str

    def __prepare_scriptable__(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} does not support torch.jit.script; record it with "
            "torch.jit.trace(model, example), torch.export.export(model, (example,)) or "
            "torch.onnx.export instead (all supported)"
        )

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = check_impl(value)
        self._impl_changed(self._impl)

    def _impl_changed(self, impl: str) -> None:
        """Called after every valid ``impl`` assignment; a layer that holds other layers
        overrides it to pass the value on (APNet-S to its stripe agents)."""


class MemorySwitch:
    """Mixin of the relation layers: ``memory`` ("auto" | "full" | "lean"), validated on assignment.

    ``"full"``: the fused path keeps what autograd keeps, the relation embedding included.

    ``"lean"``: the fused path keeps, of each agent's computation after its projection GEMM,
    only that GEMM's output (3d' x n per sample) and a few small results (the relation
    embedding's statistics, factors and its product with W's first conv) for backward, and
    recomputes the norms and the W network there; the relation embedding, the largest
    activation of a training step (n/s x n per sample), is computed in batch chunks and never
    held whole (:mod:`reid_attention._relation.lean`). Same gradients and statistics. Without a
    gradient (eager inference) only the chunked embedding remains, which is also faster once
    the embedding outgrows the cache; an exported, traced or compiled inference program takes
    the full form. Exact BatchNorms and plain ReLUs only (a module must not run twice); other
    norms keep the full path.

    ``"auto"`` (the default): per call, the lean form where the call's relation embedding holds
    at least :data:`AUTO_LEAN_ELEMENTS` values (large maps, large batches: there it is as fast or
    faster, and it is where the memory goes), the full form below. Same results either way.
    ``"default"``, this switch's name for ``"full"`` in 0.1.0, is accepted with a
    DeprecationWarning.
    """

    _memory: str = "auto"

    @property
    def memory(self) -> str:
        return self._memory

    @memory.setter
    def memory(self, value: str) -> None:
        if value == "default":
            warnings.warn(
                'memory="default" is deprecated: the mode that keeps every activation is now called '
                '"full", and the default is "auto"', DeprecationWarning, stacklevel=3,
            )
            value = "full"
        if not isinstance(value, str) or value not in MEMORY_MODES:
            raise ArgumentError("memory", value, f"memory must be one of {MEMORY_MODES}, got {value!r}")
        self._memory = value

    def _wants_lean(self, embedding_elements: int) -> bool:
        """Whether a call whose relation embedding holds ``embedding_elements`` values takes the
        lean form (where it applies: :func:`reid_attention._relation.lean_applies`). Under
        ``"auto"`` a symbolic size (``torch.export`` or ``torch.compile`` with a dynamic batch)
        takes the full form: comparing it would tie the traced program to one side of the line."""
        if self._memory == "auto":
            return isinstance(embedding_elements, int) and embedding_elements >= AUTO_LEAN_ELEMENTS
        return self._memory == "lean"
