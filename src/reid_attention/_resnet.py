"""ResNet surgery for re-id: :func:`set_last_stride` turns a ResNet's last downsampling off (the
re-id "last stride 1"), as the presets' backbones do. Exported as ``reid_attention.set_last_stride``.
"""

from __future__ import annotations

from torch import nn

from ._checks import ArgumentError
from ._probe import inserted_names

__all__ = ["set_last_stride"]


def set_last_stride(model: nn.Module, stride: int = 1) -> nn.Module:
    """Set the stride of a ResNet-family model's last stage (in place) and return the model.

    The strided convolutions of ``layer4[0]`` (Bottleneck: ``conv2`` and ``downsample.0``, as in
    torchvision's ResNet v1.5; BasicBlock: ``conv1`` and ``downsample.0``) get ``stride``, so
    ``stride=1`` doubles the final map (256x128 input -> 16x8), as re-id models do. Call it
    before :func:`reid_attention.insert_attention`: attention built for the old layer4 map is
    refused.
    """
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ArgumentError("stride", stride, f"stride must be 1 or 2, got {stride!r}")
    layer4 = getattr(model, "layer4", None)
    first = layer4[0] if isinstance(layer4, nn.Sequential) and len(layer4) else None
    downsample = getattr(first, "downsample", None)
    if not (isinstance(layer4, nn.Sequential) and isinstance(downsample, nn.Sequential)
            and isinstance(downsample[0], nn.Conv2d)):
        raise ValueError(
            "set_last_stride expects a ResNet-family model (torchvision ResNet / ResNeXt / Wide "
            f"ResNet: layer4[0] with a downsample convolution), got {type(model).__name__}"
        )
    inserted = inserted_names(layer4)
    if inserted:
        raise ValueError(
            f"layer4 already has attention ({', '.join('layer4.' + n for n in inserted)}) built for "
            "the current map size; call set_last_stride before insert_attention"
        )
    main = getattr(first, "conv2" if hasattr(first, "conv3") else "conv1")  # Bottleneck / BasicBlock
    for conv in (main, downsample[0]):
        conv.stride = (stride, stride)
    return model
