"""``reid-attention sites MODEL --input HxW``: the insertion sites of a torchvision or timm model.

The model is built by name with random weights (``torchvision.models.get_model(name,
weights=None)``, else ``timm.create_model(name, pretrained=False)``), on the meta device where
its constructor allows it (no memory, no initialisation arithmetic), and probed by
:func:`reid_attention.list_sites`. Each row: name, channels, map size, stride, layout and whether
:func:`reid_attention.insert_attention` uses the site by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .insert import Site, default_sites, list_sites

COLUMNS = ("name", "channels", "map", "stride", "layout", "default")


def parse_size(text: str) -> Tuple[int, int]:
    """``"256x128"`` -> (256, 128)."""
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers, e.g. 256x128, got {text!r}")
    return int(height), int(width)


def _builder(name: str) -> Optional[Callable[[], nn.Module]]:
    """A constructor of model ``name`` (torchvision first, then timm if installed), or None."""
    import torchvision.models as tvm

    if name in tvm.list_models():
        return lambda: tvm.get_model(name, weights=None)
    try:
        import timm
    except ImportError:
        return None
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


def rows(sites: List[Site], defaults: List[Site]) -> List[dict]:
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


def table(entries: List[dict]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [
        [e["name"], str(e["channels"]), "x".join(map(str, e["feat_size"])), str(e["stride"]), e["layout"],
         "yes" if e["default"] else ""]
        for e in entries
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)  # bad arguments: usage and exit status 2
    try:
        model = build_model(args.model)
    except LookupError as err:
        print(f"reid-attention sites: {err.args[0]}", file=sys.stderr)
        return 2
    try:
        ends = list_sites(model, args.input)
        sites = list_sites(model, args.input, stages_only=False) if args.all else ends
    except ValueError as err:  # the model cannot be probed (e.g. a ViT that takes one image size)
        print(f"reid-attention sites: {err}", file=sys.stderr)
        return 1
    entries = rows(sites, default_sites(ends))
    if args.format == "json":
        print(json.dumps({"model": args.model, "input_size": list(args.input), "sites": entries}, indent=2))
    else:
        print(table(entries))
    return 0
