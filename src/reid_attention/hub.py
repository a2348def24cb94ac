"""Save a preset to a folder or the Hugging Face Hub and load it back: :class:`ReIDModel`.

Needs huggingface_hub and safetensors (``pip install "reid-attention[hf]"``); ``import
reid_attention`` alone never imports them. ::

    model = ReIDModel(preset="rga_resnet50", input_size=(256, 128))
    model.save_pretrained("rga-market")              # config.json + model.safetensors
    model = ReIDModel.from_pretrained("rga-market")  # or a Hub id: "user/rga-market"
    model.push_to_hub("user/rga-market")             # (after huggingface-cli login)

``config.json`` holds the preset's name and its arguments; ``model.safetensors`` the preset's
state_dict under its own keys, so it also loads with
``ra.presets.rga_resnet50(weights=safetensors.torch.load_file(path))`` or into timm
(:mod:`reid_attention.timm_models`, ``pretrained_cfg_overlay=dict(file=path)``). Loading is strict:
a file that does not fit the config fails. The same on every huggingface_hub from 0.20 on.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import presets
from ._extras import require

if TYPE_CHECKING:
    from huggingface_hub.hub_mixin import DataclassInstance

require("huggingface_hub", feature="reid_attention.hub", extra="hf")
require("safetensors", feature="reid_attention.hub", extra="hf")

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

__all__ = ["ReIDModel"]

_PRESETS = {"rga_resnet50": presets.rga_resnet50, "apnet_resnet50": presets.apnet_resnet50}
WEIGHTS_NAME = "model.safetensors"
# from_pretrained's keyword arguments that are about the download, not the model
_DOWNLOAD_ARGS = ("revision", "cache_dir", "force_download", "proxies", "resume_download", "token",
                  "local_files_only")


def _card_info() -> dict[str, Any]:
    """Model-card metadata for huggingface_hub versions that take it (>= 0.22) as class arguments."""
    info = dict(library_name="reid-attention", tags=["person-reid", "image-feature-extraction"],
                pipeline_tag="image-feature-extraction")
    try:
        accepted = inspect.signature(PyTorchModelHubMixin.__mro__[1].__init_subclass__).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in info.items() if k in accepted}


def _json_value(name: str, value: Any) -> Any:
    """``value`` as it is written to config.json (tuples as lists), or TypeError."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        if json.loads(json.dumps(value)) == value:
            return value
    except (TypeError, ValueError):
        pass
    raise TypeError(f"ReIDModel saves its arguments in config.json: {name}={value!r} is not a JSON value "
                    "(build the preset with reid_attention.presets for other arguments)")


class ReIDModel(presets.ReIDResNet, PyTorchModelHubMixin, **_card_info()):
    """A preset of :mod:`reid_attention.presets` that saves as config.json + model.safetensors.

    ``ReIDModel(preset="rga_resnet50", input_size=(256, 128), channel=False)`` builds
    ``ra.presets.rga_resnet50(input_size=(256, 128), channel=False)``; ``preset`` is
    ``"rga_resnet50"`` or ``"apnet_resnet50"``, every other argument the preset's and a JSON value
    (``spatial``, ``channel``, ``levels``, ``variant``, ``impl``, ``channel_ratio`` ...), kept in
    :attr:`config`. ``weights`` (a torchvision weights enum or name, or a state_dict) initialises
    this instance only and is not saved: the saved weights are the model's.

    The module is the preset's: ``conv1`` .. ``layer4`` under their torchvision names (the same
    state_dict keys), ``forward`` -> (B, 2048) pooled features, ``forward_features`` -> the map.

    Methods from huggingface_hub's ``PyTorchModelHubMixin``: ``save_pretrained(folder)``,
    ``from_pretrained(folder or Hub id, strict=True, map_location="cpu")``, ``push_to_hub(repo_id)``.
    """

    def __init__(self, config: dict[str, Any] | None = None, *, weights: object | None = None,
                 **options: Any) -> None:
        given = {**(config or {}), **options}
        preset = given.pop("preset", None)
        if preset not in _PRESETS:
            raise ValueError(f"ReIDModel needs preset= one of {sorted(_PRESETS)}, got {preset!r}")
        if "weights" in given:  # initialisation only, never saved
            weights = given.pop("weights") if weights is None else weights
        given.setdefault("input_size", inspect.signature(_PRESETS[preset]).parameters["input_size"].default)
        arguments = {name: _json_value(name, value) for name, value in given.items()}
        config_json: dict[str, Any] = {"preset": preset, **arguments}
        if "input_size" in arguments and isinstance(arguments["input_size"], list):
            arguments["input_size"] = tuple(arguments["input_size"])
        super().__init__(_PRESETS[preset](weights=weights, **arguments))  # the preset's trunk
        #: the preset's name and arguments, as written to config.json
        self.config = config_json
        self._hub_mixin_config = self.config  # huggingface_hub >= 0.21 saves this as config.json

    def save_pretrained(self, save_directory: str | Path, *,
                        config: dict[str, Any] | DataclassInstance | None = None,
                        **kwargs: Any) -> str | None:
        """Write ``config.json`` (:attr:`config`) and ``model.safetensors`` to ``save_directory``
        (and push them with ``push_to_hub=True, repo_id=...``)."""
        if config is not None and config != self.config:
            raise ValueError("ReIDModel saves its own config; build the model you want to save instead")
        return super().save_pretrained(save_directory, config=self.config, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True,
                         **kwargs: Any) -> ReIDModel:
        download = {k: kwargs.pop(k) for k in _DOWNLOAD_ARGS if k in kwargs}
        if os.path.isdir(model_id):
            path = os.path.join(model_id, WEIGHTS_NAME)
        else:
            path = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME,
                                   **{k: v for k, v in download.items() if v is not None})
        if "config" not in kwargs and "preset" not in kwargs:
            raise ValueError(f"{model_id} has no config.json: save with ReIDModel.save_pretrained, or pass "
                             "the preset's arguments to from_pretrained (preset=..., input_size=...)")
        model = cls(**kwargs)  # config=... (and its entries, on newer huggingface_hub)
        model.load_state_dict(load_file(path, device=str(map_location)), strict=strict)
        return model.eval()
