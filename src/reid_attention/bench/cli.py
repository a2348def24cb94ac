"""``reid-attention bench``: what attention costs, per layer, per network, per input size.

:func:`main` is the whole command, one step per module: parse and check the arguments
(:mod:`.args`), run the rows (:mod:`.jobs`), render and write the result (:mod:`.render`,
:mod:`.plot`). The commands ``layers``, ``network``, ``sweep`` and the ``default`` run print a
table, JSON, CSV or markdown. Bad arguments (an unwritable ``--out``, a missing optional package
included) end in one ``error:`` line and exit status 2 before any row runs; a row that failed for
a reason other than running out of memory makes the exit status 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from .args import build_parser, check_buildable, check_extras, misplaced_hint, normalise_argv
from .jobs import run
from .render import exit_status, print_text, render, write_files

__all__ = ["main", "build_parser", "normalise_argv", "check_buildable"]


def main(argv: Iterable[str] | None = None) -> int:
    """Run ``reid-attention bench`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    parser = build_parser()
    args, extra = parser.parse_known_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    command = parser.commands[args.command]
    if extra:
        hint = misplaced_hint(extra, args.command, parser.commands)
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    check_extras(args, command)
    check_buildable(args, command)
    result = run(args)
    text = render(result, args.format)
    write_files(args, result, text)
    print_text(text)
    return exit_status(result["records"])
