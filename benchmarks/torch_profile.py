"""Where PyTorch spends ResNet-50 + RGA-SC's extra time, by class of operator, and the floor that leaves.

``network_alternating.py`` times the training step against plain ResNet-50; this script breaks the
attention's extra time down with PyTorch's profiler (the operators' own, "self", CPU times of
``--steps`` profiled calls) for plain ResNet-50 and ResNet-50 + RGA-SC at its four sites (last
stride 1, 256x128, the library's defaults), in training (``--mode train``, batch 8: forward,
cross-entropy, backward, SGD momentum step, ``zero_grad(set_to_none=True)``) or inference
(``--mode eval``, batch 64, ``torch.no_grad``). The classes:

* ``convolution``: the backbone's convs and the attention's 1x1 projections (the largest share of
  its FLOPs), forward and backward; ``matmul``: every other GEMM (``bmm``, ``baddbmm``, ``mm``);
  ``batch norm``; ``elementwise & reductions``; ``copies, layout & allocation``;
* ``autograd & Python``: what the profiler sees outside ATen's operators (the autograd engine's and
  the custom autograd Functions' own time, the optimizer step's Python) plus the step's wall time
  that no recorded event covers (Python between the operators).

Summary: ``profiled_time_x`` (the profiled calls' wall times; the profiler adds a little to
every operator), ``conv_gemm_only_x`` = 1 + (the attention's convolution + matmul time) / (the
plain call): the ratio the network would read if the attention ran nothing but its GEMMs, at the
rates they run at here; ``flop_x``, the forward-FLOP ratio; ``paired_time_x``, the median ratio of
``--rounds`` unprofiled rounds, the models alternated. A third model alternates with them: in
eval mode the attention with ``memory="full"`` (``paired_full_time_x``: the relation embedding
held whole instead of in chunks); in training, with ``--compile``, the attention layers compiled
by inductor (``module.compile()``: every elementwise operator fused into generated kernels;
``paired_compiled_time_x``, the measured effect of fusing everything but the GEMMs).

    python benchmarks/torch_profile.py --compile          # -> results/torch_profile_train_cpu.json
    python benchmarks/torch_profile.py --mode eval        # -> results/torch_profile_eval_cpu.json
    python benchmarks/torch_profile.py --quick            # smoke run: ResNet-18, 64x32, nothing written
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from network_alternating import SITES, alternate  # the preset's four RGA sites; its alternation
from torch.profiler import ProfilerActivity, profile

from reid_attention import RGA
from reid_attention.bench.measure import count_flops, train_step
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import network

COLUMNS = ["op_class", "plain_ms", "rga_sc_ms", "extra_ms", "extra_share"]
HEADERS = {"op_class": "operator class", "plain_ms": "ResNet-50 ms", "rga_sc_ms": "+ RGA-SC ms",
           "extra_ms": "extra ms", "extra_share": "share of extra"}
# an ATen operator's class: the first with a name fragment in the operator's name ("" matches every name)
CLASSES = [
    ("convolution", ("conv",)),
    ("matmul", ("mm", "matmul", "linear")),
    ("batch norm", ("batch_norm",)),
    ("copies, layout & allocation", ("copy", "clone", "cat", "flip", "contiguous", "stack", "empty", "zeros",
                                     "view", "reshape", "transpose", "permute", "slice", "select", "expand",
                                     "squeeze", "split", "detach", "as_strided", "alias")),
    ("elementwise & reductions", ("",)),
]
VIEWS = {"t"}  # layout operators whose names are fragments of others' (aten::t, aten::threshold_backward)
PYTHON = "autograd & Python"
GEMM_CLASSES = ("convolution", "matmul")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def op_class(name: str) -> str:
    """The class of a profiler event's name (ATen operators are ``aten::<name>``)."""
    if not name.startswith("aten::"):
        return PYTHON
    op = name.removeprefix("aten::")
    if op in VIEWS:
        return "copies, layout & allocation"
    return next(cls for cls, fragments in CLASSES if any(f in op for f in fragments))


def profiled(call: Callable[[], object], steps: int) -> tuple[dict[str, float], float]:
    """(ms per step of each operator class, wall ms per step) over ``steps`` profiled calls; the
    wall time no event covers is counted as ``autograd & Python``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            call()
        wall = (time.perf_counter() - start) * 1e3 / steps
    per_class = dict.fromkeys([cls for cls, _ in CLASSES] + [PYTHON], 0.0)
    for event in prof.key_averages():
        per_class[op_class(event.key)] += event.self_cpu_time_total / 1e3 / steps
    per_class[PYTHON] += max(0.0, wall - sum(per_class.values()))
    return per_class, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--batch", type=int, default=None, help="default 8 (train) or 64 (eval)")
    p.add_argument("--steps", type=int, default=3, help="profiled calls per model")
    p.add_argument("--compile", action="store_true", help="train mode: also time the attention compiled")
    p.add_argument("--rounds", type=int, default=8, help="alternated unprofiled rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: ResNet-18, 64x32, batch 2, no file")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.compile and args.mode != "train":
        p.error("--compile times training steps: use it with --mode train")
    batch = args.batch or (8 if args.mode == "train" else 64)
    backbone, size = ("resnet18", (64, 32)) if args.quick else ("resnet50", (256, 128))
    if args.quick:
        batch, args.steps, args.rounds = 2, 1, 1
    torch.set_num_threads(args.threads)
    x = torch.randn(batch, 3, *size)
    models = {}
    for key, attention in (("plain", {}), ("rga_sc", {"attention": "rga_sc", "sites": SITES})):
        torch.manual_seed(0)
        model = network(backbone, input_size=size, last_stride=1, **attention)
        models[key] = model.train(args.mode == "train")
    gflop = {key: count_flops(model, x) / 1e9 for key, model in models.items()}
    if args.mode == "train":
        calls = {key: train_step(model, x) for key, model in models.items()}
    else:
        calls = {key: torch.no_grad()(lambda m=model: m(x)) for key, model in models.items()}
    ms, wall = {}, {}
    for key, call in calls.items():
        print(f"profiling {key} ({args.mode}, batch {batch})", file=sys.stderr, flush=True)
        call()  # warm-up
        ms[key], wall[key] = profiled(call, args.steps)
    extra_total = wall["rga_sc"] - wall["plain"]
    records = [{"op_class": cls, "plain_ms": ms["plain"][cls], "rga_sc_ms": ms["rga_sc"][cls],
                "extra_ms": ms["rga_sc"][cls] - ms["plain"][cls],
                "extra_share": (ms["rga_sc"][cls] - ms["plain"][cls]) / extra_total} for cls in ms["plain"]]
    gemm_extra = sum(ms["rga_sc"][c] - ms["plain"][c] for c in GEMM_CLASSES)
    summary = {"plain_ms": wall["plain"], "rga_sc_ms": wall["rga_sc"],
               "profiled_time_x": wall["rga_sc"] / wall["plain"],
               "flop_x": gflop["rga_sc"] / gflop["plain"], "attention_conv_gemm_ms": gemm_extra,
               "conv_gemm_only_x": 1 + gemm_extra / wall["plain"]}
    if args.compile:
        torch.manual_seed(0)
        compiled = network(backbone, input_size=size, last_stride=1, attention="rga_sc", sites=SITES).train()
        for module in compiled.modules():
            if isinstance(module, RGA):
                module.compile()  # inductor, in place: the backbone stays eager
        calls["rga_sc_compiled"] = train_step(compiled, x)
        print("compiling the attention layers (inductor)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        calls["rga_sc_compiled"]()
        summary["compile_s"] = time.perf_counter() - start
    if args.mode == "eval":
        torch.manual_seed(0)
        full = network(backbone, input_size=size, last_stride=1, attention="rga_sc", sites=SITES,
                       memory="full").eval()
        calls["rga_sc_full"] = torch.no_grad()(lambda: full(x))
        calls["rga_sc_full"]()  # warm-up
    times = alternate(calls, args.rounds)
    ratios = {name: [t / b for t, b in zip(ts, times["plain"])] for name, ts in times.items()}
    summary["paired_time_x"] = statistics.median(ratios["rga_sc"])
    for key in ("rga_sc_compiled", "rga_sc_full"):
        if key in ratios:
            summary[f"paired_{key.removeprefix('rga_sc_')}_time_x"] = statistics.median(ratios[key])
    summary["paired_rounds"] = args.rounds
    env = environment("cpu", args.threads)
    step = "training step: forward, cross-entropy, backward, SGD momentum, zero_grad(set_to_none=True)"
    env.update(backbone=backbone, batch=batch, input_size=list(size), sites=SITES, last_stride=1,
               steps=args.steps, runtime="pytorch (eager)",
               mode=step if args.mode == "train" else "eval forward under torch.no_grad")
    publish({"environment": env, "records": records, "summary": summary}, COLUMNS,
            RESULTS / f"torch_profile_{args.mode}_cpu.json", headers=HEADERS, out=args.out,
            write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
