"""What a GPU would run: kernels launched and bytes moved by one training step of each layer.

For every kind at its papers' first site (and APNet-S at every APNet site), reference and fused,
one training step at ``--batch`` (default 8) runs under a dispatch counter
(:func:`reid_attention.bench.dispatch.count_dispatch`: ATen ops that compute, forward and
backward, optimizer included, and the bytes of their inputs and outputs). From the counts, two
floors of the step on a GPU, neither of which a kernel-by-kernel eager run can beat:

* launch floor = kernels x ``--launch-us`` (default 5 us: an eager launch plus its share of
  synchronisation on a recent NVIDIA GPU);
* traffic floor = bytes / ``--bandwidth`` (default 3.35 TB/s: H100 SXM HBM3).

The larger floor says what bounds the step; reference floor / fused floor is the most the fused
path can gain on such a GPU without fusing kernels further (``torch.compile``, custom kernels).

    python benchmarks/launch_counts.py          # -> results/launch_counts.json (device-independent)
    python benchmarks/launch_counts.py --quick  # smoke run: small sites, batch 2, nothing written
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

import reid_attention as ra
from reid_attention.bench.dispatch import count_dispatch
from reid_attention.bench.measure import train_step
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES

COLUMNS = ["kind", "site", "impl", "kernels", "moved_mib", "launch_floor_ms", "traffic_floor_ms", "bound",
           "floor_x"]
HEADERS = {"moved_mib": "moved MiB", "launch_floor_ms": "launch floor ms",
           "traffic_floor_ms": "traffic floor ms", "floor_x": "reference floor / fused floor"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cases(quick: bool) -> list[tuple[str, int, tuple[int, int]]]:
    if quick:
        return [("pfsa", 32, (16, 8)), ("apnet_s", 32, (16, 8))]
    first = {"rga": PAPER_SITES["rga"][0], "pfsa": PAPER_SITES["pfsa"][0], "apnet": PAPER_SITES["apnet"][3]}
    rows = [(kind, *first["rga"]) for kind in ("rga_s", "rga_c", "rga_sc")]
    rows += [("pfsa", *first["pfsa"]), ("apnet_c", *first["apnet"])]
    return rows + [("apnet_s", c, s) for c, s in PAPER_SITES["apnet"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--launch-us", type=float, default=5.0)
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes per second")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    batch = 2 if args.quick else args.batch
    torch.manual_seed(0)
    records = []
    for kind, channels, feat_size in cases(args.quick):
        floors = {}
        for impl in ("reference", "fused"):
            site = f"{channels}:{feat_size[0]}x{feat_size[1]}"
            print(f"{kind} {site} {impl}", file=sys.stderr, flush=True)
            module = ra.create_attention(kind, channels, feat_size=feat_size, impl=impl)
            x = torch.randn(batch, channels, *feat_size, requires_grad=True)
            counts = count_dispatch(train_step(module, x))
            launch = counts["kernels"] * args.launch_us / 1e3
            traffic = counts["moved_mib"] * 2**20 / args.bandwidth * 1e3
            floors[impl] = max(launch, traffic)
            records.append(dict(kind=kind, site=site, impl=impl, **counts, launch_floor_ms=launch,
                                traffic_floor_ms=traffic, bound="launches" if launch >= traffic else "bytes"))
        records[-1]["floor_x"] = floors["reference"] / floors["fused"]
    env = environment("cpu", torch.get_num_threads())
    env.update(batch=batch, launch_us=args.launch_us, bandwidth=args.bandwidth,
               counted="ATen ops that compute (views and empty excluded), forward + backward + SGD step")
    publish({"environment": env, "records": records}, COLUMNS, RESULTS / "launch_counts.json",
            headers=HEADERS, out=args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
