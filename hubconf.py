"""torch.hub entry points: the presets of reid-attention, without installing the package.

    model = torch.hub.load("path/to/reid-attention", "rga_resnet50", source="local", input_size=(256, 128))
    model = torch.hub.load("OWNER/reid-attention:REF", "apnet_resnet50")   # from GitHub

Each entry point is :mod:`reid_attention.presets` with the keyword arguments passed through
(``input_size``, ``weights``, ``impl``, ``levels`` ...) and returns a ``ReIDResNet``: images ->
(B, 2048) pooled features. ``torch.hub.help("OWNER/reid-attention", name)`` prints an entry
point's docstring.

The code is this repository's ``src/reid_attention``: it goes first on ``sys.path`` unless
``reid_attention`` is already imported (then that copy is used, with a warning if it is another).
"""

import os as _os
import sys as _sys
import warnings as _warnings

dependencies = ["torch", "torchvision", "einops"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
_HERE = _os.path.join(_SRC, "reid_attention")
if "reid_attention" not in _sys.modules and _os.path.isdir(_HERE) and _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import reid_attention as _ra  # noqa: E402

if _os.path.isdir(_HERE) and _os.path.realpath(_os.path.dirname(_ra.__file__)) != _os.path.realpath(_HERE):
    _warnings.warn(
        f"reid_attention was already imported from {_os.path.dirname(_ra.__file__)}; "
        f"torch.hub uses that copy, not the repository's {_HERE}",
        stacklevel=2,
    )


def _fixed(name, given, **fixed):
    for key, value in fixed.items():
        if given.pop(key, value) != value:
            raise ValueError(f"{name} is built with {key}={value!r}: use another entry point")
    return {**given, **fixed}


def rga_resnet50(**kwargs):
    """ResNet-50 (last stride 1) with RGA-SC after layer1 .. layer4, input 256x128 by default
    (Zhang et al., CVPR 2020): ``reid_attention.presets.rga_resnet50(**kwargs)``.

    input_size=(H, W) builds the size-tied attention for another image size; weights= takes a
    torchvision weights enum or its name ("IMAGENET1K_V1") for the trunk, or a state_dict.
    """
    return _ra.presets.rga_resnet50(**kwargs)


def rga_s_resnet50(**kwargs):
    """rga_resnet50 with RGA-S only (spatial relations; channel=False)."""
    return _ra.presets.rga_resnet50(**_fixed("rga_s_resnet50", kwargs, spatial=True, channel=False))


def rga_c_resnet50(**kwargs):
    """rga_resnet50 with RGA-C only (channel relations; spatial=False)."""
    return _ra.presets.rga_resnet50(**_fixed("rga_c_resnet50", kwargs, spatial=False, channel=True))


def apnet_resnet50(**kwargs):
    """ResNet-50 (last stride 1) with the APNet-C attention pyramid (levels=2, the official channel
    version) after the stem and layer1 .. layer4, input 384x192 by default (Chen et al., TIP 2021):
    ``reid_attention.presets.apnet_resnet50(**kwargs)``.
    """
    return _ra.presets.apnet_resnet50(**_fixed("apnet_resnet50", kwargs, variant="c"))


def apnet_s_resnet50(**kwargs):
    """apnet_resnet50 with APNet-S: an RGA-S agent per horizontal stripe (variant="s")."""
    return _ra.presets.apnet_resnet50(**_fixed("apnet_s_resnet50", kwargs, variant="s"))
