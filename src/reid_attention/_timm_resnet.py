"""The timm model class of :mod:`reid_attention.timm_models`: a preset with timm's model interface
(classifier, ``features_only``, ``forward_head``) and loading of torchvision ResNet-50 files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import presets
from ._extras import require

require("timm", feature="reid_attention.timm_models", extra="timm")

from timm.layers.adaptive_avgmax_pool import SelectAdaptivePool2d  # noqa: E402

__all__ = ["DEFAULT_SIZE", "TimmReIDResNet", "filter_state_dict", "img_pair", "map_size"]

#: The image size each preset is built for unless ``img_size`` says otherwise (the papers').
DEFAULT_SIZE = {"rga_resnet50": (256, 128), "apnet_resnet50": (384, 192)}
_PRESETS = {"rga_resnet50": presets.rga_resnet50, "apnet_resnet50": presets.apnet_resnet50}
_STAGES = ("layer1", "layer2", "layer3", "layer4")
# (module, channels, reduction) of the five maps: stem (before the max-pool), layer1 .. layer4.
_FEATURES = (
    ("relu", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 16)
)


def img_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"img_size must be (H, W) or an int, got {size!r}")
    return (int(size[0]), int(size[1]))


def map_size(size: tuple[int, int]) -> tuple[int, int]:
    """The layer4 map of a last-stride-1 ResNet-50: four halvings, each rounding up."""
    return (-(-size[0] // 16), -(-size[1] // 16))


class TimmReIDResNet(nn.Module):
    """A preset (:mod:`reid_attention.presets`) with timm's model interface.

    Built by ``timm.create_model`` (the names in :mod:`reid_attention.timm_models`); direct use:
    ``TimmReIDResNet("rga_resnet50", num_classes=751, img_size=(256, 128), channel=False)``.

    Args:
        preset: ``"rga_resnet50"`` or ``"apnet_resnet50"``.
        num_classes: width of the linear classifier ``fc``; 0 (default): no classifier, the
            pooled (B, 2048) features.
        in_chans: image channels; only 3 (the ResNet-50 stem).
        img_size: (H, W) (or an int: square) of the images the size-tied attention is built for;
            default the preset's (256x128 RGA, 384x192 APNet).
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``...; ``""``: none).
        drop_rate: dropout before ``fc``.
        **preset_kwargs: passed to the preset (``spatial``, ``channel``, ``levels``, ``variant``,
            ``impl``, ``norm_layer``, ``weights``...).
    """

    # the submodules the methods call (conv1 .. layer4 come from the preset)
    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    global_pool: SelectAdaptivePool2d
    fc: nn.Module

    def __init__(
        self,
        preset: str = "rga_resnet50",
        *,
        num_classes: int = 0,
        in_chans: int = 3,
        img_size: int | Sequence[int] | None = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **preset_kwargs: Any,
    ) -> None:
        super().__init__()
        if preset not in _PRESETS:
            raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {preset!r}")
        if in_chans != 3:
            raise ValueError(f"{preset} takes RGB images (in_chans=3), got in_chans={in_chans}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if num_classes and not global_pool:
            raise ValueError("a classifier (num_classes > 0) needs a global_pool, got global_pool=''")
        size = DEFAULT_SIZE[preset] if img_size is None else img_pair(img_size)
        net = _PRESETS[preset](input_size=size, **preset_kwargs)
        for name, module in net.named_children():  # conv1 .. layer4 under their torchvision names
            self.add_module(name, module)
        self.preset = preset
        self.img_size = size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = net.num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for m, c, r in _FEATURES]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    # --- timm's model interface -------------------------------------------------------------

    @torch.jit.ignore  # type: ignore[untyped-decorator]  # torch.jit.ignore is unannotated
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem (with APNet's stem
        attention), then each stage's blocks, each stage's attention after its last block."""
        if coarse:
            return dict(stem=r"^conv1|^bn1|^maxpool", blocks=r"^layer(\d+)")
        return dict(
            stem=r"^conv1|^bn1|^maxpool",
            blocks=[(r"^layer(\d+)\.(\d+)", None), (r"^layer(\d+)\.attention", (99999,))],
        )

    @torch.jit.ignore  # type: ignore[untyped-decorator]  # torch.jit.ignore is unannotated
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute layer1 .. layer4 in the backward pass instead of storing their activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore  # type: ignore[untyped-decorator]  # torch.jit.ignore is unannotated
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new random ``fc`` for ``num_classes`` (0: none); ``global_pool`` changes the pooling."""
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        # timm's SelectAdaptivePool2d.is_identity is unannotated
        if num_classes and self.global_pool.is_identity():  # type: ignore[no-untyped-call]
            raise ValueError("a classifier (num_classes > 0) needs a global_pool, got global_pool=''")
        self.num_classes = num_classes
        like = next(self.parameters())
        self.fc = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                   if num_classes else nn.Identity())

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) at ``img_size`` -> the layer4 map (B, 2048, H/16, W/16)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = [getattr(self, name) for name in _STAGES]
        # torch.jit.is_scripting is public API, missing from torch.jit.__all__
        if self.grad_checkpointing and not torch.jit.is_scripting():  # type: ignore[attr-defined]
            from timm.models import checkpoint_seq

            out: Tensor = checkpoint_seq(stages, x)
            return out
        for stage in stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate-feature API (timm >= 1.0): the maps of ``feature_info`` (stem,
        layer1 .. layer4) picked by ``indices`` (None: all; an int n: the last n)."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, last = feature_take_indices(len(_FEATURES), indices)
        intermediates = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        for i, name in enumerate(_STAGES[:last] if stop_early else _STAGES, 1):
            x = getattr(self, name)(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last map ``indices`` asks for (and the head)."""
        from timm.models._features import feature_take_indices

        take, last = feature_take_indices(len(_FEATURES), indices)
        for name in _STAGES[last:]:
            setattr(self, name, nn.Identity())
        if last < 1:
            self.maxpool = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def load_pretrained(self, checkpoint_path: str, prefix: str = "") -> None:
        """Load a checkpoint file (timm calls this for ``pretrained=True``): see the module."""
        from timm.models import load_state_dict

        self.load_state_dict(_complete(load_state_dict(str(checkpoint_path)), self))


def _attention_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``<site>.attention.`` for every attention inserted in the trunk."""
    return tuple(f"{name}." for name, _ in model.named_modules() if name.split(".")[-1] == "attention")


def _short(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _complete(state_dict: Mapping[str, Tensor], model: TimmReIDResNet) -> dict[str, Tensor]:
    """``state_dict`` checked against ``model`` and completed with the model's own tensors where it
    may lack them (attention, ``fc``, ``num_batches_tracked``): a dict that loads with strict=True."""
    own = model.state_dict()
    state = dict(state_dict)
    for key in ("fc.weight", "fc.bias"):  # another task's classifier: keep the model's
        if key in state and (key not in own or state[key].shape != own[key].shape):
            del state[key]
    optional = _attention_prefixes(model) + ("fc.",)
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(optional)
               and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
              for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if missing:
        problems.append(f"missing trunk keys: {_short(missing)}")
    if shapes:
        problems.append(f"other shapes: {_short(shapes, 3)}")
    if problems:
        hints = []
        if shapes:
            hints.append(f"the attention is built for img_size={model.img_size}: build the model at the "
                         "size the weights were trained for")
        if unexpected:
            hints.append("an official checkpoint converts with reid_attention.convert.from_official_rga / "
                         "from_official_apnet")
        raise ValueError(f"weights do not fit {model.preset}: " + "; ".join(problems)
                         + "".join(f" ({hint})" for hint in hints))
    return {k: state.get(k, v) for k, v in own.items()}


def filter_state_dict(state_dict: Mapping[str, Tensor], model: TimmReIDResNet) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn`` for weights that do not come from a file or URL
    (``pretrained_cfg_overlay=dict(state_dict=...)``, a Hugging Face Hub id)."""
    return _complete(state_dict, model)
