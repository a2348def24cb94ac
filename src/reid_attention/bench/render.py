"""What ``reid-attention bench`` prints and writes: a result as a table, JSON, CSV or markdown
(:func:`render`), the ``--out`` file and the sweep's plot (:func:`write_files`), stdout that
survives an early-closing reader (:func:`print_text`) and the exit status (:func:`exit_status`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .plot import plot_sweep
from .report import format_flagged, row_name
from .suites import failed

__all__ = ["EVAL_COLUMNS", "LAYER_COLUMNS", "NETWORK_COLUMNS", "SWEEP_COLUMNS", "HEADERS", "render",
           "write_files", "print_text", "exit_status"]

LAYER_COLUMNS = ["flag", "kind", "site", "impl", "memory", "batch", "fwd_ms", "step_ms", "step_iqr_ms",
                 "samples_per_s", "gflops", "params", "peak_mib", "kernels", "moved_mib", "error"]
NETWORK_COLUMNS = ["flag", "model", "batch", "step_ms", "step_iqr_ms", "samples_per_s", "gflops", "params",
                   "memory_batch", "peak_mib", "time_x", "memory_x", "params_x", "gflops_x",
                   "time_x_spread", "time_x_rounds", "time_per_flop_x", "error"]
EVAL_COLUMNS = ["flag", "model", "runtime", "batch", "fwd_ms", "time_x", "time_x_spread", "time_x_rounds",
                "gflops", "gflops_x", "time_per_flop_x", "parity", "error"]
SWEEP_COLUMNS = ["flag", "kind", "input", "site", "impl", "batch", "step_ms", "peak_mib", "error"]
HEADERS = {"fwd_ms": "fwd ms", "step_ms": "step ms", "step_iqr_ms": "IQR ms", "samples_per_s": "samples/s",
           "gflops": "GFLOP", "peak_mib": "peak MiB", "memory_batch": "mem batch",
           "time_x": "time x", "memory_x": "memory x", "params_x": "params x", "gflops_x": "FLOP x",
           "time_per_flop_x": "time/FLOP x", "time_x_spread": "spread", "time_x_rounds": "rounds",
           "parity": "vs torch", "kernels": "kernels/step", "moved_mib": "moved MiB"}


def render(result: dict[str, Any], fmt: str) -> str:
    """The text of a result of :func:`.jobs.run` in ``fmt`` (JSON: environment and records;
    table and markdown: a one-line header, then each table)."""
    if fmt == "json":
        return json.dumps({"environment": result["environment"], "records": result["records"]}, indent=2)
    parts = [format_flagged(rows, cols, fmt, headers=HEADERS) for rows, cols in result["tables"]]
    if fmt == "csv":
        return "\n".join(parts)
    env = result["environment"]
    head = (f"{env['date']} | {env['device_name']} | {env['threads']} threads | torch {env['torch']} | "
            f"dtype {env['dtype']} | step: {env['step_text']} | times: median of blocked runs; "
            f"time x: median per-round ratio, timed alternately | FLOPs: 2 x multiply-adds, forward")
    return "\n\n".join([head, *parts])


def write_files(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """``--out`` and the sweep's ``--plot`` (by default next to ``--out``, with .png), with the
    missing directories: written before anything is printed."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.command == "sweep":
        path = args.plot or (args.out.with_suffix(".png") if args.out else None)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_sweep(result["records"], path, result["environment"])
            print(f"plot: {path}", file=sys.stderr)


def print_text(text: str) -> None:
    """Print to stdout; a reader that leaves early (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def exit_status(records: Sequence[dict[str, Any]]) -> int:
    """1 (naming them on stderr) if a row failed other than by running out of memory, else 0."""
    bad = [r for r in records if failed(r)]
    for r in bad:
        print(f"reid-attention bench: {row_name(r)} failed: {r['error']}", file=sys.stderr)
    if bad:
        print(f"reid-attention bench: {len(bad)} of {len(records)} rows failed", file=sys.stderr)
    return 1 if bad else 0
