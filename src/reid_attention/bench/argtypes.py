"""The argument types of ``reid-attention bench``: each parses one option's text or raises
``argparse.ArgumentTypeError`` naming what was expected (argparse turns it into one ``error:``
line and exit status 2)."""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
from collections.abc import Sequence
from typing import Callable

import torch

from .._cli import parse_size
from .._extras import MissingExtraError, require
from .jobs import BenchSite

__all__ = ["SITE_KEYWORDS", "backbone", "device", "layer_sites", "non_negative_int", "one_of", "parse_sites",
           "positive_float", "positive_int", "positive_ints", "sizes", "spread", "writable"]

SITE_KEYWORDS = ("paper", "first", "default")


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def positive_ints(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def spread(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (e.g. 0.05), got {text!r}")
    return value


def sizes(text: str) -> list[tuple[int, int]]:
    return [parse_size(t) for t in text.split(",")]


def parse_sites(text: str) -> list[BenchSite]:
    """``"256:64x32,512:32x16"`` -> [(256, (64, 32)), (512, (32, 16))]; every number positive."""
    sites = []
    for item in filter(None, text.split(",")):
        c, sep, hw = item.partition(":")
        try:
            if not sep or not c.isdigit() or int(c) < 1:
                raise argparse.ArgumentTypeError(c)
            sites.append((int(c), parse_size(hw)))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected sites as C:HxW,... with positive numbers (e.g. 256:64x32), got {item!r}") from None
    if not sites:
        raise argparse.ArgumentTypeError(f"expected at least one site C:HxW, got {text!r}")
    return sites


def layer_sites(text: str) -> str | list[BenchSite]:
    """A keyword of ``SITE_KEYWORDS`` or an explicit list of sites."""
    if text in SITE_KEYWORDS:
        return text
    try:
        return parse_sites(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(map(repr, SITE_KEYWORDS))} or C:HxW,... with positive C, H and W "
            f"(e.g. 256:64x32,512:32x16), got {text!r}") from None


def one_of(choices: Sequence[str], what: str, *, many: bool = False, all_word: bool = False,
            listing: str | None = None) -> Callable[[str], str | list[str]]:
    """A type accepting one of ``choices`` (``many``: a comma-separated list; ``all_word``: or
    'all'), hinting near misses; ``listing`` replaces the list of choices in the message."""

    def convert(text: str) -> str | list[str]:
        if all_word and text == "all":
            return list(choices)
        items = text.split(",") if many else [text]
        for item in items:
            if item not in choices:
                close = difflib.get_close_matches(item, choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                expected = listing or ", ".join(choices) + (" or 'all'" if all_word else "")
                raise argparse.ArgumentTypeError(f"unknown {what} {item!r}{hint}; expected {expected}")
        return items if many else text

    return convert


def device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here "
                                             f"(torch {torch.__version__}, {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a GPU index below {torch.cuda.device_count()}")
    return text


def backbone(text: str) -> str:
    try:
        torchvision = require("torchvision", feature="reid-attention bench network", extra="bench")
    except MissingExtraError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    names = torchvision.models.list_models(module=torchvision.models)
    listing = "a name of torchvision.models.list_models(module=torchvision.models), e.g. resnet50"
    name = one_of(names, "torchvision classification model", listing=listing)(text)
    assert isinstance(name, str)  # one choice, not a list (many=False)
    return name


def writable(text: str) -> pathlib.Path:
    """A file path that can be written: not a directory, and its nearest existing ancestor a
    writable directory (the missing ones are created when writing)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path")
    where = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if where is not path and not where.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(where)!r} is not a directory")
    if not os.access(where, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(where)!r} is not writable")
    return path
