"""RGA at the paper's four sites: reference vs fused, RGA-S / RGA-C / RGA-SC.

Median time of one training step at ``--batch`` (default 8; ``--step optimizer``: forward, loss,
backward, SGD momentum step, zero_grad(set_to_none=True); ``--step accumulate``: forward and
backward only), forward FLOPs (2 x multiply-adds) at that batch, parameters, and the peak memory
of the same step at ``--memory-batch`` (default 32; CPU: high-water mark of a fresh subprocess,
CUDA: max_memory_allocated). Exits 1 if a row failed other than by running out of memory.

    python benchmarks/rga_sites.py                      # CPU, 2 threads -> results/rga_sites_cpu.json
    python benchmarks/rga_sites.py --device cuda --batch 64 --dtype bfloat16
                                                        # -> results/rga_sites_cuda_bfloat16.json
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from reid_attention.bench.measure import STEPS
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES, failed, layer_spec, measure_layer

COLUMNS = ["flag", "kind", "site", "impl", "step_ms", "gflops", "params", "peak_mib", "error"]
HEADERS = {"step_ms": "step ms", "gflops": "GFLOP fwd", "peak_mib": "peak MiB"}
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
        "rga_sc_time_speedup": ratio(total("reference", "step_ms"), total("fused", "step_ms")),
        "rga_sc_flop_reduction": ratio(total("reference", "gflops"), total("fused", "gflops")),
        "rga_sc_layer1_memory_reduction": ratio(mem.get("reference"), mem.get("fused")),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16 / float16 (suffixes the result file)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--memory-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step", default="optimizer", choices=STEPS, help="the timed training step")
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each layer (suffixes the result file)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small site, batch 2")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)

    sites = PAPER_SITES["rga"]
    if args.quick:
        sites, args.batch, args.memory_batch, args.min_run_time = [(64, (16, 8))], 2, 2, 0.05
    torch.set_num_threads(args.threads)
    records = []
    jobs = [(k, c, fs, i) for c, fs in sites for k in ("rga_s", "rga_c", "rga_sc")
            for i in ("reference", "fused")]
    for n, (kind, channels, feat_size, impl) in enumerate(jobs, 1):
        print(f"[{n}/{len(jobs)}] {kind} {channels}:{feat_size[0]}x{feat_size[1]} {impl}", file=sys.stderr,
              flush=True)
        spec = layer_spec(kind, channels, feat_size, batch=args.batch, impl=impl, device=args.device,
                          threads=args.threads, step=args.step, compile=args.compile,
                          autocast=None if args.dtype == "float32" else args.dtype)
        records.append(measure_layer(spec, memory_batch=args.memory_batch, min_run_time=args.min_run_time))
    env = environment(args.device, args.threads)
    env.update(batch=args.batch, memory_batch=args.memory_batch, step=args.step, dtype=args.dtype,
               compiled=args.compile)
    result = {"environment": env, "summary": summary(records), "records": records}
    suffix = "".join(["" if args.dtype == "float32" else f"_{args.dtype}",
                      "_compiled" if args.compile else ""])
    publish(result, COLUMNS, RESULTS / f"rga_sites_{args.device.split(':')[0]}{suffix}.json", headers=HEADERS,
            out=args.out, write=not args.quick)
    return 1 if any(failed(r) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
