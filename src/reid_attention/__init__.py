"""reid-attention: plug-and-play attention layers for person re-identification.

Layers: :class:`RGA` (RGA-S / RGA-C / RGA-SC), :class:`ParameterFreeSpatialAttention`,
:class:`APNetC` and :class:`APNetS`, each with a ``reference`` and a ``fused`` path.
"""

from importlib import metadata as _metadata

from . import convert, presets
from .apnet_c import APNetC
from .apnet_s import APNetS
from .inference import fold_batchnorm_scales
from .insert import insert_attention, list_sites, resize_attention, set_last_stride
from .pfsa import ParameterFreeSpatialAttention
from .recalibrate import recalibrate_norms
from .registry import create_attention, list_attentions, register_attention
from .rga import RGA

__all__ = [
    "APNetC",
    "APNetS",
    "ParameterFreeSpatialAttention",
    "RGA",
    "convert",
    "create_attention",
    "fold_batchnorm_scales",
    "insert_attention",
    "list_attentions",
    "list_sites",
    "presets",
    "recalibrate_norms",
    "register_attention",
    "resize_attention",
    "set_last_stride",
]
try:
    __version__ = _metadata.version("reid-attention")
except _metadata.PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"
