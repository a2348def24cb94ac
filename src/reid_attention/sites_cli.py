"""``reid-attention sites MODEL --input HxW``: the insertion sites of a torchvision or timm model.

The model is built by name with random weights (``torchvision.models.get_model(name,
weights=None)``, else ``timm.create_model(name, pretrained=False)``), on the meta device where
its constructor allows it (no memory, no initialisation arithmetic), and probed by
:func:`reid_attention.list_sites`. Each row: name, channels, map size, stride, layout and whether
:func:`reid_attention.insert_attention` uses the site by default. Every error is one
``reid-attention sites: error: ...`` line on stderr, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ._cli import OneLineParser, parse_size
from ._extras import MissingExtraError, require
from .insert import Site, default_sites, list_sites

COLUMNS = ("name", "channels", "map", "stride", "layout", "default")


def _builder(name: str) -> Callable[[], nn.Module] | None:
    """A constructor of model ``name`` (torchvision first, then timm), or None.

    Raises MissingExtraError without torchvision, or without timm for a name torchvision lacks.
    """
    require("torchvision", feature="reid-attention sites", extra="vision")
    import torchvision.models as tvm

    if name in tvm.list_models():
        return lambda: tvm.get_model(name, weights=None)
    timm = require("timm", feature=f"model {name!r}, unknown to torchvision,")
    if timm.is_model(name):
        return lambda: timm.create_model(name, pretrained=False)
    return None


def build_model(name: str) -> nn.Module:
    """Model ``name`` in eval mode, on the meta device if its constructor runs there.

    Raises LookupError for a name neither torchvision nor timm knows.
    """
    builder = _builder(name)
    if builder is None:
        raise LookupError(
            f"unknown model {name!r}: not a torchvision model (torchvision.models.list_models()) "
            "nor a timm model (timm.list_models())"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GoogLeNet's note on its initialisation
        try:
            with torch.device("meta"):
                return builder().eval()
        except Exception:  # a constructor computing from tensor data (e.g. RegNet's widths)
            return builder().eval()


def rows(sites: list[Site], defaults: list[Site]) -> list[dict[str, Any]]:
    chosen = {site.name for site in defaults}
    return [
        {
            "name": site.name,
            "channels": site.channels,
            "feat_size": list(site.feat_size),
            "stride": site.reduction,
            "layout": site.layout,
            "default": site.name in chosen,
        }
        for site in sites
    ]


def table(entries: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [
        [e["name"], str(e["channels"]), "x".join(map(str, e["feat_size"])), str(e["stride"]), e["layout"],
         "yes" if e["default"] else ""]
        for e in entries
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="reid-attention sites",
        description="List where attention can go in a torchvision or timm model "
        "(random weights, meta device).",
    )
    p.add_argument("model", help="torchvision or timm model name, e.g. resnet50, convnext_tiny, regnety_016")
    p.add_argument("--input", type=parse_size, default=(256, 128), metavar="HxW",
                   help="image size (default 256x128)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--all", action="store_true",
                   help="every module that outputs a feature map once per forward, not only the stage ends")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        model = build_model(args.model)
        ends = list_sites(model, args.input)
        sites = list_sites(model, args.input, stages_only=False) if args.all else ends
    except (MissingExtraError, LookupError, ValueError) as err:  # ValueError: the probe could not run
        p.error(str(err))
    if not sites:
        p.error(f"{args.model} outputs no feature map that follows the input size at {args.input[0]}x"
                f"{args.input[1]}: attention goes on 4-D maps, which token-sequence models such as ViT "
                "do not have (or try a larger --input)")
    entries = rows(sites, default_sites(ends))
    if args.format == "json":
        print(json.dumps({"model": args.model, "input_size": list(args.input), "sites": entries}, indent=2))
    else:
        print(table(entries))
    return 0
