"""Official checkpoints -> state_dicts that load strictly into :mod:`reid_attention.presets`.

* :func:`from_official_rga`: microsoft/Relation-Aware-Global-Attention-Networks
  (``reid/models/rga_model.py``: ``backbone`` = ``RGA_Branch`` with ``conv1``, ``bn1``,
  ``layer1..4``, ``rga_att1..4``; head ``feat_bn``, ``cls``) -> :func:`~reid_attention.presets.rga_resnet50`.
  ``rga_att{i}.*`` become ``layer{i}.attention.*`` (the RGA module names are the official ones);
  backbone keys are unchanged; the head is dropped.
* :func:`from_official_apnet`: CHENGY12/APNet (``modeling/baseline.py``) ->
  :func:`~reid_attention.presets.apnet_resnet50` (variant "c"). The official model holds every
  backbone tensor twice, as ``base.*`` and in the stage views ``base_1.0`` (conv1), ``base_1.1``
  (bn1), ``base_2.0`` .. ``base_5.0`` (layer1 .. layer4): one copy is kept (they must agree).
  Site k = 1 .. 5 (stem, layer1 .. layer4) maps as

  ==============================  ============================================
  official                        preset (``<site>.attention.`` + ...)
  ==============================  ============================================
  ``att{k}.fc.0/2.weight``        ``se.fc.0/2.weight`` (level 1, SE gate)
  ``att_s{k}.fc1/bn1/fc2.*``      ``split.0.fc1/bn1/fc2.*`` (level 2)
  ``BN{k}.bottleneck2.*``         ``split.0.norm.*`` (level 2)
  ==============================  ============================================

  and the head (``bottleneck``, ``classifier``) is dropped. Official level 3 (``att_ss``, ``BN_``)
  cannot run (3 groups do not divide 64 channels) and is refused.

Both accept a bare state_dict or a checkpoint dict holding it under ``"state_dict"``, with or
without the ``module.`` prefix of nn.DataParallel, and raise ValueError naming unexpected and
missing keys. The backbone key list is torchvision's ResNet-50 (torchvision, the ``vision``
extra, is imported when converting).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._extras import require

__all__ = ["from_official_apnet", "from_official_rga"]

_APNET_SITES = {1: "maxpool", 2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}
_APNET_VIEWS = {
    "base_1.0.": "conv1.",
    "base_1.1.": "bn1.",
    "base_2.0.": "layer1.",
    "base_3.0.": "layer2.",
    "base_4.0.": "layer3.",
    "base_5.0.": "layer4.",
}


def describe_keys(problems: dict[str, list[str]]) -> str:
    """'unexpected keys [...], missing keys [...]': the non-empty lists, at most 8 keys each."""

    def show(keys: list[str]) -> str:
        return f"{keys[:8]}{f' ... ({len(keys)} in all)' if len(keys) > 8 else ''}"

    return ", ".join(f"{what} {show(keys)}" for what, keys in problems.items() if keys)


def _unwrap(checkpoint: Mapping[Any, Any]) -> dict[str, Tensor]:
    """The state_dict of a checkpoint, without the DataParallel ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"expected a state_dict (a mapping of names to tensors), got {type(checkpoint).__name__}"
        )
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint['state_dict'] must be a mapping, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"a state_dict maps str names to tensors; these entries do not: {bad[:5]}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _backbone_keys() -> list[str]:
    """torchvision ResNet-50's state_dict keys without ``fc.*`` (built on the meta device)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        return [k for k in resnet50(weights=None).state_dict() if not k.startswith("fc.")]


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]


def _check(what: str, out: dict[str, Tensor], unexpected: list[str], attention_keys: list[str]) -> None:
    """Raise a ValueError naming unexpected keys and missing backbone / attention keys
    (num_batches_tracked is optional: older checkpoints lack it)."""
    required = [k for k in _backbone_keys() if not k.endswith("num_batches_tracked")] + attention_keys
    problems = {"unexpected keys": unexpected, "missing keys": [k for k in required if k not in out]}
    if any(problems.values()):
        raise ValueError(f"not an official {what} checkpoint: " + describe_keys(problems))


def _rga_keys(prefix: str, axis: str) -> list[str]:
    """The parameter and statistics keys of one RGA axis (official RGA_Module names)."""
    keys = []
    for stem in ("theta", "phi", "gx", "gg"):
        keys += [f"{prefix}{stem}_{axis}.0.weight"] + _bn(f"{prefix}{stem}_{axis}.1")
    return (
        keys
        + [f"{prefix}W_{axis}.0.weight", f"{prefix}W_{axis}.3.weight"]
        + _bn(f"{prefix}W_{axis}.1")
        + _bn(f"{prefix}W_{axis}.4")
    )


def from_official_rga(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official RGA ResNet-50 checkpoint -> a state_dict for :func:`~reid_attention.presets.rga_resnet50`.

    Build the preset with the checkpoint's settings (input size, ``spatial``/``channel`` as the
    checkpoint has them, ratios) and load the result with ``strict=True``.
    """
    require("torchvision", feature="ra.convert.from_official_rga", extra="vision")
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in _unwrap(state_dict).items():
        key = key.removeprefix("backbone.")
        match = re.match(r"rga_att([1-4])\.(.+)", key)
        if match:
            out[f"layer{match[1]}.attention.{match[2]}"] = value
        elif re.match(r"(conv1|bn1|layer[1-4])\.", key):
            out[key] = value
        elif not re.match(r"(feat_bn|cls)\.", key):  # the head is dropped
            unexpected.append(key)
    axes = [axis for axis in ("spatial", "channel") if any(f"_{axis}." in k for k in out)] or [
        "spatial",
        "channel",
    ]
    attention = [k for i in range(1, 5) for axis in axes for k in _rga_keys(f"layer{i}.attention.", axis)]
    _check("RGA", out, unexpected, attention)
    return out


def _apnet_key(key: str) -> str | None:
    """The preset name of an official APNet key: '' for a head key (dropped), None for a key
    the official model does not have."""
    for view, name in _APNET_VIEWS.items():
        if key.startswith(view):
            return name + key[len(view) :]
    if key.startswith("base."):
        return key[len("base.") :]
    rules = (
        (r"att([1-5])\.fc\.([02]\.weight)$", "se.fc.{}"),
        (r"att_s([1-5])\.((?:fc1|bn1|fc2)\..+)$", "split.0.{}"),
        (r"BN([1-5])\.bottleneck2\.(.+)$", "split.0.norm.{}"),
    )
    for pattern, template in rules:
        match = re.match(pattern, key)
        if match:
            return f"{_APNET_SITES[int(match[1])]}.attention." + template.format(match[2])
    return "" if re.match(r"(bottleneck|classifier)\.", key) else None


def from_official_apnet(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official APNet (channel version, level 1 or 2) checkpoint -> a state_dict for
    :func:`~reid_attention.presets.apnet_resnet50` (``variant="c"``, the same ``level``).

    Load the result with ``strict=True``. The level is that of the checkpoint: 2 when it has
    ``att_s*`` keys, else 1.
    """
    require("torchvision", feature="ra.convert.from_official_apnet", extra="vision")
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in _unwrap(state_dict).items():
        if re.match(r"(att_ss|BN_)[1-5]\.", key):
            raise ValueError(
                f"official APNet level 3 checkpoint ({key!r}): its level 3 splits 64 channels into 3 "
                "groups and cannot run; only levels 1 and 2 convert"
            )
        name = _apnet_key(key)
        if name is None:
            unexpected.append(key)
        elif name:
            if name in out and not torch.equal(out[name], value):
                raise ValueError(
                    f"the two official copies of {name!r} differ; the checkpoint is inconsistent"
                )
            out[name] = value
    level2 = any(".attention.split." in k for k in out)
    attention = []
    for site in _APNET_SITES.values():
        prefix = f"{site}.attention."
        attention += [f"{prefix}se.fc.0.weight", f"{prefix}se.fc.2.weight"]
        if level2:
            split = f"{prefix}split.0."
            attention += [f"{split}{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")]
            attention += _bn(f"{split}bn1") + _bn(f"{split}norm")
    _check("APNet", out, unexpected, attention)
    return out
