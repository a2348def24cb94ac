"""torchreid's checkpoints on torch >= 2.6: numpy scalars allowed, anything else only when trusted."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

__all__ = ["load_checkpoint"]


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling numpy scalars needs (numpy 1 and 2): the scalar constructor, ``dtype`` and
    the dtype classes of the scalar types."""
    try:
        import numpy as np
    except ImportError:  # no numpy: no numpy scalars in any file this process could have written
        return []
    types = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [np.float32(0).__reduce__()[0], np.dtype] + [type(np.dtype(t)) for t in types]


def load_checkpoint(path: str | os.PathLike[str], *, trusted: bool = False, map_location: Any = "cpu") -> Any:
    """Load a torchreid checkpoint (``torchreid.utils.save_checkpoint``, or the engines'
    ``model/model.pth.tar-<epoch>``) on any torch >= 2.1, safely by default.

    The file is read with ``torch.load(weights_only=True)``, numpy scalars allowed (the ``rank1``
    torchreid saves is a ``numpy.float32``; torch >= 2.5 only). A file holding anything else --
    a class, a function, an array -- is refused with ``pickle.UnpicklingError`` unless
    ``trusted=True``, which unpickles it completely (``weights_only=False``): unpickling runs code
    the file names, so pass it only for files you trust.

    Returns the saved object, e.g. ``{"state_dict", "epoch", "rank1", "optimizer", "scheduler"}``:
    ``model.load_state_dict(load_checkpoint(path)["state_dict"])``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allowed is None:
            return torch.load(path, map_location=map_location, weights_only=True)
        with allowed(_numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise pickle.UnpicklingError(
            f"{path} holds more than tensors, containers and numpy scalars ({reason}); "
            "load_checkpoint(path, trusted=True) unpickles it completely: only for files you trust"
        ) from None
