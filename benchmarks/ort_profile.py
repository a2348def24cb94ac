"""Where ONNX Runtime spends the eval forward of ResNet-50 + RGA-SC, and the floor that leaves.

``bench network --mode eval`` times the exported networks against each other; this script profiles
them with ONNX Runtime's own per-node profiler (each node's fastest of ``--runs`` runs) and sums the
time per operator type, for plain ResNet-50 and for ResNet-50 + RGA-SC at its four sites (last
stride 1, 256x128), at batch 64. Every FLOP the attention adds is a GEMM (``MatMul`` /
``FusedMatMul`` in the exported graph: the projections, factors, embedding and W network), so

* ``gemm_only_x`` = 1 + (the attention's GEMM time) / (plain network time) is the ratio the network
  would read if the attention ran nothing but its GEMMs, at the rate ONNX Runtime runs them;
* ``flop_x`` = the forward-FLOP ratio, the ratio if they ran at the backbone convs' rate.

    python benchmarks/ort_profile.py           # -> results/ort_profile_cpu.json
    python benchmarks/ort_profile.py --quick   # smoke run: ResNet-18, batch 2, one run, nothing written
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import torch
from network_alternating import SITES  # the preset's four RGA sites, as the alternation times them

from reid_attention.bench.measure import count_flops
from reid_attention.bench.network import onnx_session
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import network

COLUMNS = ["op", "plain_ms", "rga_sc_ms", "extra_ms"]
HEADERS = {"op": "ONNX operator", "plain_ms": "ResNet-50 ms", "rga_sc_ms": "+ RGA-SC ms",
           "extra_ms": "extra ms"}
GEMMS = ("MatMul", "FusedMatMul")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def profile(module: torch.nn.Module, batch: int, runs: int, threads: int, prefix: str) -> dict[str, float]:
    """ms per ONNX operator type: the sum over the graph's nodes of each node's fastest run."""
    session = onnx_session(module, torch.randn(2, 3, 256, 128), threads, enable_profiling=True,
                           profile_file_prefix=prefix)
    name = session.get_inputs()[0].name
    x = torch.randn(batch, 3, 256, 128).numpy()
    for _ in range(runs):
        session.run(None, {name: x})
    path = pathlib.Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    fastest: dict[str, float] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            fastest[node] = min(fastest.get(node, float("inf")), e["dur"] / 1000)
            op_of[node] = e["args"]["op_name"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for node, ms in fastest.items():
        per_op[op_of[node]] += ms
    return dict(per_op)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--quick", action="store_true", help="smoke run: ResNet-18, batch 2, one run, no file")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.batch, args.runs = "resnet18", 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"plain": network(args.backbone, None, last_stride=1).eval(),
              "rga_sc": network(args.backbone, "rga_sc", last_stride=1, sites=SITES).eval()}
    ms = {}
    for key, model in models.items():
        print(f"profiling {key} at batch {args.batch}", file=sys.stderr, flush=True)
        ms[key] = profile(model, args.batch, args.runs, args.threads, f"/tmp/ort_profile_{key}")
    ops = sorted(set(ms["plain"]) | set(ms["rga_sc"]), key=lambda op: -ms["rga_sc"].get(op, 0.0))
    records = [{"op": op, "plain_ms": ms["plain"].get(op, 0.0), "rga_sc_ms": ms["rga_sc"].get(op, 0.0),
                "extra_ms": ms["rga_sc"].get(op, 0.0) - ms["plain"].get(op, 0.0)} for op in ops]
    x = torch.randn(args.batch, 3, 256, 128)
    gflop = {key: count_flops(model, x) / 1e9 for key, model in models.items()}
    plain_ms, rga_ms = sum(ms["plain"].values()), sum(ms["rga_sc"].values())
    gemm_ms = sum(ms["rga_sc"].get(op, 0.0) - ms["plain"].get(op, 0.0) for op in GEMMS)
    summary = {
        "plain_ms": plain_ms,
        "rga_sc_ms": rga_ms,
        "time_x": rga_ms / plain_ms,
        "flop_x": gflop["rga_sc"] / gflop["plain"],
        "attention_gflop": gflop["rga_sc"] - gflop["plain"],
        "attention_gemm_ms": gemm_ms,
        "attention_gemm_gflop_per_s": (gflop["rga_sc"] - gflop["plain"]) / gemm_ms * 1e3,
        "backbone_conv_gflop_per_s": gflop["plain"] / ms["plain"]["Conv"] * 1e3,
        "gemm_only_x": 1 + gemm_ms / plain_ms,
        "other_extra_ms": rga_ms - plain_ms - gemm_ms,
    }
    env = environment("cpu", args.threads)
    env.update(backbone=args.backbone, batch=args.batch, runs=args.runs, runtime="onnxruntime",
               mode="eval forward; per node the fastest of the runs, summed per operator type")
    publish({"environment": env, "records": records, "summary": summary}, COLUMNS,
            RESULTS / "ort_profile_cpu.json", headers=HEADERS, out=args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
