"""RGA-SC eval forward at the paper's four sites: unfolded vs ``fold_batchnorm_scales``.

Eval-mode forward time (``torch.no_grad``) at ``--batch`` (default 8) of the module and of its
folded copy, timed alternately (:func:`reid_attention.bench.paired.paired_ratio`: the speedup is
the median per-round ratio, refused when its spread does not settle), and the largest output
difference between the two (float32).
It documents that folding the BatchNorm scales into the conv weights is exact and does not
change the speed: the folded BatchNorm still runs as a shift, the same elementwise pass
(timed one after the other, an earlier version read 0.93 .. 1.24 and, once, 1.45: noise
around 1, which the paired timing removes). The function was called
``fuse_for_inference`` before this measurement showed there is nothing to gain.

    python benchmarks/inference_fold.py                 # CPU, 2 threads -> results/inference_fold_cpu.json
    python benchmarks/inference_fold.py --device cuda --batch 64
    python benchmarks/inference_fold.py --quick         # smoke run: one small site, nothing written
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

import reid_attention as ra
from reid_attention.bench.paired import paired_ratio, rounds_options
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES
from reid_attention.inference import fold_batchnorm_scales

COLUMNS = ["site", "impl", "unfolded_ms", "folded_ms", "speedup", "speedup_spread", "max_abs_diff"]
HEADERS = {"unfolded_ms": "unfolded ms", "folded_ms": "folded ms", "speedup": "speedup (paired)",
           "speedup_spread": "spread", "max_abs_diff": "max |diff|"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def measure_site(channels, feat_size, impl, *, batch, device, options):
    """One row: eval forward of RGA-SC unfolded and folded at one site, alternately."""
    module = ra.create_attention("rga_sc", channels, feat_size=feat_size, impl=impl).to(device).eval()
    folded = fold_batchnorm_scales(module)
    x = torch.randn(batch, channels, *feat_size, device=device)

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    with torch.no_grad():
        diff = (folded(x) - module(x)).abs().max().item()
    r = paired_ratio(forward(folded), forward(module), device=device, **options)
    return {
        "site": f"{channels}:{feat_size[0]}x{feat_size[1]}",
        "impl": impl,
        "unfolded_ms": r.other_ms,
        "folded_ms": r.base_ms,
        "speedup": r.ratio,
        "speedup_spread": r.spread,
        "max_abs_diff": diff,
        "unreliable": [r.reason] if r.reason else [],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", choices=["fused", "reference", "both"], default="both")
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smoke run: one small site, batch 2")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    sites = PAPER_SITES["rga"]
    if args.quick:
        sites, args.batch, args.max_rounds = [(64, (16, 8))], 2, 2
    impls = ["reference", "fused"] if args.impl == "both" else [args.impl]
    torch.set_num_threads(args.threads)
    records = []
    for channels, feat_size in sites:
        for impl in impls:
            print(f"{channels}:{feat_size[0]}x{feat_size[1]} {impl}", file=sys.stderr, flush=True)
            records.append(
                measure_site(channels, feat_size, impl, batch=args.batch, device=args.device,
                             options=rounds_options(args.max_rounds))
            )
    env = environment(args.device, args.threads)
    env.update(batch=args.batch, mode="eval forward, torch.no_grad", kind="rga_sc")
    publish({"environment": env, "records": records}, COLUMNS,
            RESULTS / f"inference_fold_{args.device.split(':')[0]}.json", headers=HEADERS, out=args.out,
            write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
