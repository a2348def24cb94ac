"""RGA at the paper's four sites: reference vs fused, RGA-S / RGA-C / RGA-SC.

Forward+backward median time at ``--batch`` (default 8), forward FLOPs (2 x multiply-adds) at
that batch, parameters, and the peak memory of one training step at ``--memory-batch``
(default 32; CPU: high-water mark of a fresh subprocess, CUDA: max_memory_allocated).

    python benchmarks/rga_sites.py                      # CPU, 2 threads -> results/rga_sites_cpu.json
    python benchmarks/rga_sites.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES, layer_spec, measure_layer

COLUMNS = ["kind", "site", "impl", "fwd_bwd_ms", "gflops", "params", "peak_mib", "error"]
HEADERS = {"fwd_bwd_ms": "fwd+bwd ms", "gflops": "GFLOP fwd", "peak_mib": "peak MiB"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def summary(records):
    """Fused vs reference for RGA-SC: time and FLOPs summed over the sites, memory at layer1."""
    sc = [r for r in records if r["kind"] == "rga_sc"]

    def total(impl, key):
        vals = [r.get(key) for r in sc if r["impl"] == impl]
        return sum(vals) if vals and None not in vals else None

    def ratio(a, b):
        return a / b if a and b else None

    first = sc[0]["site"] if sc else None
    mem = {r["impl"]: r.get("peak_mib") for r in sc if r["site"] == first}
    return {
        "rga_sc_time_speedup": ratio(total("reference", "fwd_bwd_ms"), total("fused", "fwd_bwd_ms")),
        "rga_sc_flop_reduction": ratio(total("reference", "gflops"), total("fused", "gflops")),
        "rga_sc_layer1_memory_reduction": ratio(mem.get("reference"), mem.get("fused")),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--memory-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="smoke run: one small site, batch 2")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    sites = PAPER_SITES["rga"]
    if args.quick:
        sites, args.batch, args.memory_batch, args.min_run_time = [(64, (16, 8))], 2, 2, 0.05
    torch.set_num_threads(args.threads)
    records = []
    jobs = [(k, c, fs, i) for c, fs in sites for k in ("rga_s", "rga_c", "rga_sc") for i in ("reference", "fused")]
    for n, (kind, channels, feat_size, impl) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {kind} {channels}:{feat_size[0]}x{feat_size[1]} {impl}", file=sys.stderr, flush=True)
        spec = layer_spec(kind, channels, feat_size, batch=args.batch, impl=impl, device=args.device,
                          threads=args.threads)
        records.append(measure_layer(spec, memory_batch=args.memory_batch, min_run_time=args.min_run_time))
    env = environment(args.device, args.threads)
    env.update(batch=args.batch, memory_batch=args.memory_batch)
    result = {"environment": env, "summary": summary(records), "records": records}
    publish(result, COLUMNS, RESULTS / f"rga_sites_{args.device.split(':')[0]}.json", headers=HEADERS,
            out=args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
