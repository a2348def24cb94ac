"""A CPU-side view of what a step costs a GPU: the kernels it launches and the bytes they move.

On a GPU, a small layer's step is bound by how many kernels it launches (each costs a few
microseconds of launch and synchronisation however little it computes) or by the bytes its
kernels read and write (HBM bandwidth), not by its FLOPs. Neither depends on the device the
step runs on, so they can be counted on the CPU: :func:`count_dispatch` runs a step once under a
``TorchDispatchMode`` that sees every ATen operation after autograd, forward and backward, and
counts those that compute, i.e. all but views (which only re-describe a tensor) and ``empty``
allocations, and the bytes of their tensor inputs and outputs.

The counts are a proxy: a GPU backend may fuse ops (``torch.compile``) or split one into
several kernels (cuBLAS, cuDNN), and bytes in caches are not HBM traffic. For eager PyTorch,
one ATen op is one kernel launch or close to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["DispatchCounter", "count_dispatch"]


def _nbytes(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(values)[0] if isinstance(t, Tensor))


class DispatchCounter(TorchDispatchMode):
    """Counts computing ATen ops (``kernels``) and their tensor bytes in and out (``moved``)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode.__init__
        self.kernels = 0
        self.moved = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith("empty"):
            self.kernels += 1
            self.moved += _nbytes((args, kwargs)) + _nbytes(out)
        return out


def count_dispatch(step: Callable[[], Any]) -> dict[str, Any]:
    """Run ``step`` once (warm) under a :class:`DispatchCounter`: ``{"kernels", "moved_mib"}``."""
    step()  # warm: lazy state (optimizer buffers) is created outside the count
    with DispatchCounter() as counter:
        step()
    return {"kernels": counter.kernels, "moved_mib": counter.moved / 2**20}
