"""memory="lean" against memory="full" (keep every activation; called "default" before "auto" became the
default) for the relation layers: per site and per batch. The measurement behind memory="auto".

For RGA-SC at the RGA paper's four sites, APNet-S at the APNet paper's sites, and two tiny sites
whose inner widths sit at their floors, at batches 1, 8 and 32: the training step of the lean
layer timed against the default one alternately (:func:`reid_attention.bench.network.paired_step`:
median per-round ratio, refused when its spread stays above 5%), and the peak memory of each
(high-water mark of two steps in a fresh subprocess). The decision it informs: where is the lean
form free (time x <= 1.0 within the spread) and what does it save?

    python benchmarks/lean_vs_default.py            # CPU, 2 threads -> results/lean_vs_default_cpu.json
    python benchmarks/lean_vs_default.py --quick    # smoke run: two small sites, batch 2, nothing written
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch

from reid_attention.bench.measure import peak_memory
from reid_attention.bench.network import paired_step
from reid_attention.bench.paired import MAX_ROUNDS, rounds_options
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES, layer_spec

COLUMNS = ["flag", "kind", "site", "batch", "time_x", "time_x_spread", "time_x_rounds", "default_mib",
           "lean_mib", "memory_x"]
HEADERS = {"time_x": "lean time x", "time_x_spread": "spread", "time_x_rounds": "rounds",
           "default_mib": "full MiB", "lean_mib": "lean MiB", "memory_x": "lean memory x"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TINY = [(256, (8, 4)), (2048, (4, 2))]  # widths at their floors (min_width)


def cases(quick: bool) -> list[tuple[str, int, tuple[int, int]]]:
    if quick:
        return [("rga_sc", 64, (16, 8)), ("apnet_s", 64, (8, 4))]
    rga = [("rga_sc", c, s) for c, s in [*PAPER_SITES["rga"], *TINY]]
    return rga + [("apnet_s", c, s) for c, s in PAPER_SITES["apnet"]]


def row(kind, channels, feat_size, batch, threads, max_rounds):
    default = layer_spec(kind, channels, feat_size, batch=batch, impl="fused", threads=threads)
    default["kwargs"]["memory"] = "full"
    lean = copy.deepcopy(default)
    lean["kwargs"]["memory"] = "lean"
    record = {"kind": kind, "site": f"{channels}:{feat_size[0]}x{feat_size[1]}", "batch": batch}
    pair = paired_step(default, lean, **rounds_options(max_rounds))
    record.update(pair.fields("time_x"), unreliable=[pair.reason] if pair.reason else [])
    for mode, spec in (("default", default), ("lean", lean)):
        mem = peak_memory(spec)
        record[f"{mode}_mib"] = mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None
    if record["default_mib"] and record["lean_mib"]:
        record["memory_x"] = record["lean_mib"] / record["default_mib"]
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="comma-separated batches (default 1,8,32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-rounds", type=int, default=MAX_ROUNDS)
    p.add_argument("--quick", action="store_true", help="smoke run: two small sites, batch 2, 2 rounds")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    max_rounds = 2 if args.quick else args.max_rounds
    torch.set_num_threads(args.threads)
    records = []
    for kind, channels, feat_size in cases(args.quick):
        for batch in batches:
            site = f"{channels}:{feat_size[0]}x{feat_size[1]}"
            print(f"{kind} {site} batch {batch}", file=sys.stderr, flush=True)
            records.append(row(kind, channels, feat_size, batch, args.threads, max_rounds))
    env = environment("cpu", args.threads)
    env.update(step="forward + loss + backward + SGD momentum step + zero_grad(set_to_none=True)",
               memory="peak RSS of two steps in a fresh subprocess")
    publish({"environment": env, "records": records}, COLUMNS, RESULTS / "lean_vs_default_cpu.json",
            headers=HEADERS, out=args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
