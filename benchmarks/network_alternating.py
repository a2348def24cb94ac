"""ResNet-50 with and without RGA-SC, the training steps timed alternately in one process.

``reid-attention bench network`` times the plain and the wrapped network one after the other, so
on a shared machine their ratio moves with the load between the two blocks. Here every round
runs one realistic training step (forward, cross-entropy, backward, SGD momentum step,
``zero_grad(set_to_none=True)``: :func:`reid_attention.bench.measure.train_step`) of each
network in turn, and the figure is the median over rounds of the per-round ratio to the plain
step (with the ratios' inter-quartile range): load that lasts longer than a round cancels.
The forward-FLOP ratio (the floor for the exact maths) is reported beside it.

    python benchmarks/network_alternating.py       # CPU, 2 threads -> results/network_alternating_cpu.json
    python benchmarks/network_alternating.py --device cuda --batch 64
    python benchmarks/network_alternating.py --quick   # smoke run: 64x32 images, 2 rounds, nothing written
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

from reid_attention.bench.measure import count_flops, train_step
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import network

COLUMNS = ["model", "step_ms", "step_iqr_ms", "time_x", "time_x_iqr", "gflops_x", "time_x_over_floor"]
HEADERS = {"step_ms": "step ms (median)", "step_iqr_ms": "IQR ms", "time_x": "time x (paired median)",
           "time_x_iqr": "IQR of x", "gflops_x": "FLOP x (floor)", "time_x_over_floor": "time x / FLOP x"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SITES = ["layer1", "layer2", "layer3", "layer4"]


def _iqr(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[2] - q[0]


def alternate(calls: dict[str, Callable[[], object]], rounds: int, device: str = "cpu"
              ) -> dict[str, list[float]]:
    """Seconds of each call in each round, the calls run in turn every round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name, call in calls.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds, one step of each model per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 64x32 images, batch 2, 2 rounds")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        p.error("--batch and --rounds must be >= 1")
    size = (64, 32) if args.quick else (256, 128)
    if args.quick:
        args.batch, args.rounds = 2, 2
    torch.set_num_threads(args.threads)
    variants = {"resnet50": {}, "resnet50 + rga_sc (full)": {"memory": "full"},
                "resnet50 + rga_sc (lean)": {"memory": "lean"}}
    x = torch.randn(args.batch, 3, *size, device=args.device)
    steps, flops = {}, {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        attention = dict(attention="rga_sc", sites=SITES, **kw) if kw else {}
        model = network("resnet50", input_size=size, last_stride=1, **attention).to(args.device).train()
        flops[name] = count_flops(model, x)
        steps[name] = train_step(model, x)
        steps[name]()  # warm-up
    times = alternate(steps, args.rounds, args.device)
    plain = "resnet50"
    records = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[plain])]
        gflops_x = flops[name] / flops[plain]
        records.append({
            "model": name,
            "step_ms": statistics.median(ts) * 1e3,
            "step_iqr_ms": _iqr(ts) * 1e3,
            "time_x": statistics.median(ratios),
            "time_x_iqr": _iqr(ratios),
            "gflops_x": gflops_x,
            "time_x_over_floor": statistics.median(ratios) / gflops_x,
        })
    env = environment(args.device, args.threads)
    env.update(batch=args.batch, input_size=list(size), rounds=args.rounds, last_stride=1, sites=SITES,
               step="forward, cross-entropy, backward, SGD momentum, zero_grad(set_to_none=True); "
                    "models alternated every round")
    publish({"environment": env, "records": records}, COLUMNS,
            RESULTS / f"network_alternating_{args.device.split(':')[0]}.json", headers=HEADERS, out=args.out,
            write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
