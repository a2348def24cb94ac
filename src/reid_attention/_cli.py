"""Argparse pieces shared by the ``reid-attention`` commands (``bench`` and ``sites``).

One ``HxW`` size type (:func:`parse_size`) and one parser class whose errors are a single
``PROG: error: ... (see PROG --help)`` line with exit status 2 (:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["parse_size", "error_line", "OneLineParser"]


def parse_size(text: str) -> tuple[int, int]:
    """``"256x128"`` -> (256, 128); anything but two positive integers around an 'x' is an
    ``argparse.ArgumentTypeError`` (so argparse reports it as an error of the option)."""
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HxW with positive H and W (e.g. 256x128), got {text!r}")
    return int(height), int(width)


def error_line(prog: str, message: str) -> str:
    """The one line a command prints for bad arguments (the usage is one ``--help`` away)."""
    return f"{prog}: error: {message} (see {prog} --help)\n"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :func:`error_line` on stderr, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(self.prog, message))
