"""reid-attention: plug-and-play attention layers for person re-identification."""

from .rga import RGA

__all__ = ["RGA"]
__version__ = "0.1.0"
