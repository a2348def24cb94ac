"""How far ``RGA.resized`` / ``APNetS.resized`` is from exact, away from integer nearest factors.

A module is built for a ``--channels`` x 16x8 map (the default ratios; BatchNorm statistics
calibrated on data) and resized to other map sizes. The input is one smooth random field, a
sum of low-frequency waves with random phases per channel, *sampled* at each size (so the larger
maps are finer samplings of the same picture, not resampled copies). The reference for the
resized module's gate at (H', W') is the original module's gate at 16x8, bilinearly resampled
to (H', W'). The error is reported relative to the spread (std) of that reference gate: 0 is exact,
and a constant gate at the reference's mean would score 1. Two baselines bound it:

* ``fresh``: a module freshly built for (H', W') with another random init (what retraining
  from scratch starts from);
* ``nearest x2``: the exact case (integer factor, nearest mode, on the nearest-upsampled
  16x8 input), whose error is rounding.

    python benchmarks/resize_transfer.py            # -> results/resize_transfer_cpu.json
    python benchmarks/resize_transfer.py --quick    # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import math
import pathlib

import torch
import torch.nn.functional as F

import reid_attention as ra
from reid_attention.bench.report import environment, publish

COLUMNS = ["kind", "size", "factor", "mode", "gate_error", "fresh_error"]
HEADERS = {"gate_error": "gate error / std", "fresh_error": "fresh init / std"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BASE = (16, 8)
TARGETS = [(8, 4), (12, 6), (20, 10), (24, 12), (32, 16), (48, 24)]


def smooth_field(channels: int, size, seed: int, waves: int = 3) -> torch.Tensor:
    """(1, C, H, W): per channel, a positive sum of ``waves`` low-frequency waves sampled at the
    centres of an H x W grid on the unit square (the same continuous picture at every size)."""
    g = torch.Generator().manual_seed(seed)
    freq = torch.randint(0, 3, (channels, waves, 2), generator=g).double()
    phase = torch.rand(channels, waves, generator=g).double() * 2 * math.pi
    amp = torch.rand(channels, waves, generator=g).double()
    ys = (torch.arange(size[0]).double() + 0.5) / size[0]
    xs = (torch.arange(size[1]).double() + 0.5) / size[1]
    arg = (freq[..., 0, None, None] * ys[:, None] + freq[..., 1, None, None] * xs[None, :]) * 2 * math.pi
    field = (amp[..., None, None] * torch.sin(arg + phase[..., None, None])).sum(1)
    return F.softplus(field).unsqueeze(0)


def gate(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x) / x


def build(kind: str, channels: int, size, seed: int, batch: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = ra.create_attention(kind, channels, feat_size=size).double()
    with torch.no_grad():
        module.train()(batch)  # running statistics of the data
    return module.eval()


def relative(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a - reference).pow(2).mean().sqrt() / reference.std())


def rows(kind: str, channels: int, seeds: int, targets):
    fields = lambda size: torch.cat([smooth_field(channels, size, s) for s in range(seeds)])  # noqa: E731
    base_x = fields(BASE)
    module = build(kind, channels, BASE, 0, base_x)
    base_gate = gate(module, base_x)
    exact = module.resized((2 * BASE[0], 2 * BASE[1]), mode="nearest")
    up = F.interpolate(base_x, scale_factor=2, mode="nearest")
    yield dict(kind=kind, size="32x16", factor=2.0, mode="nearest (exact case)",
               gate_error=relative(gate(exact, up), F.interpolate(base_gate, scale_factor=2, mode="nearest")),
               fresh_error=None)
    for size in targets:
        x = fields(size)
        reference = F.interpolate(base_gate, size=size, mode="bilinear", align_corners=False)
        fresh = relative(gate(build(kind, channels, size, 1, x), x), reference)
        for mode in ("bilinear", "nearest"):
            resized = module.resized(size, mode=mode)
            yield dict(kind=kind, size=f"{size[0]}x{size[1]}", factor=round(size[0] / BASE[0], 3), mode=mode,
                       gate_error=relative(gate(resized, x), reference), fresh_error=fresh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64, help="channels of the map (default 64)")
    parser.add_argument("--seeds", type=int, default=16, help="random fields in the batch (default 16)")
    parser.add_argument("--quick", action="store_true", help="one kind, two sizes, nothing written")
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON path (default results/resize_transfer_cpu.json)")
    args = parser.parse_args()
    kinds = ["rga_s"] if args.quick else ["rga_s", "rga_c", "rga_sc", "apnet_s"]
    targets = TARGETS[:2] if args.quick else TARGETS
    records = [r for kind in kinds for r in rows(kind, args.channels, args.seeds, targets)]
    result = dict(environment=environment("cpu", torch.get_num_threads()), base=list(BASE), records=records)
    publish(result, COLUMNS, RESULTS / "resize_transfer_cpu.json", headers=HEADERS, out=args.out,
            write=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
