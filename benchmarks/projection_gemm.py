"""The relation core's projection GEMM as a ``linear`` (BLAS) or as a 1x1 conv (oneDNN).

Steps 1 and 4 of RGA and APNet-S are one GEMM per axis (:func:`reid_attention._relation.fused.
projections`), the largest GEMMs the attention runs: at ResNet-50's layer 1 the channel axis
projects 256 tokens of 2048 features to 768 outputs per sample. The same sums can run as a
``linear`` (a matmul: on CPU the BLAS ATen was built with, MKL) or as a 1x1 conv over a view of
the tokens (:func:`reid_attention._relation.fused.conv_1x1`: oneDNN, the library that runs the
backbone's convs). Until 0.3 the token-major projections (tokens stored with their features
contiguous: the channel axis of an NCHW map, the spatial axis of a channels_last one) ran as a
``linear``. For each projection of RGA-SC at the paper's four ResNet-50 sites (256x128, last
stride 1), token-major, one training step of that GEMM alone (forward, then backward to the tokens and
the weight) runs both ways, alternately (:func:`reid_attention.bench.paired.paired_ratio`);
``linear_x`` = linear time / conv time, with the GFLOP/s of each beside it.

    python benchmarks/projection_gemm.py          # -> results/projection_gemm_cpu.json
    python benchmarks/projection_gemm.py --quick  # smoke run: one small shape, nothing written
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_attention._relation.fused import conv_1x1
from reid_attention.bench.paired import paired_ratio, rounds_options
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES

COLUMNS = ["site", "axis", "tokens", "features", "outputs", "linear_ms", "conv_ms", "linear_gflops",
           "conv_gflops", "linear_x", "linear_x_spread"]
HEADERS = {"linear_gflops": "linear GFLOP/s", "conv_gflops": "conv GFLOP/s",
           "linear_x": "linear / conv (paired)", "linear_x_spread": "spread"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def projection_cases(quick: bool) -> list[tuple[str, str, int, int, int]]:
    """(site, axis, n tokens, d features, outputs 3d') of RGA-SC's projections (d' = d / 8)."""
    if quick:
        return [("32:16x8", "channel", 32, 128, 48)]
    rows = []
    for channels, (h, w) in PAPER_SITES["rga"]:
        site, positions = f"{channels}:{h}x{w}", h * w
        rows.append((site, "spatial", positions, channels, 3 * (channels // 8)))
        rows.append((site, "channel", channels, positions, 3 * (positions // 8)))
    return rows


def step(project: Callable[[Tensor, Tensor], Tensor], tokens: Tensor, weight: Tensor, grad: Tensor
         ) -> Callable[[], None]:
    def run() -> None:
        tokens.grad = weight.grad = None
        project(tokens, weight).backward(grad)

    return run


def linear(tokens: Tensor, weight: Tensor) -> Tensor:
    """Token-major tokens (B, d, n) -> (B, O, n) as a ``linear`` over the (B, n, d) view."""
    return F.linear(tokens.transpose(1, 2), weight).transpose(1, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = 2 if args.quick else args.batch
    options = rounds_options(2 if args.quick else args.max_rounds)
    torch.manual_seed(0)
    records = []
    for site, axis, n, d, outputs in projection_cases(args.quick):
        print(f"{site} {axis}", file=sys.stderr, flush=True)
        tokens = torch.randn(batch, n, d).transpose(1, 2).requires_grad_()  # token-major (B, d, n)
        weight = torch.randn(outputs, d, requires_grad=True)
        grad = torch.randn(batch, outputs, n)
        with torch.no_grad():  # the two are the same function
            torch.testing.assert_close(conv_1x1(tokens, weight), linear(tokens, weight), rtol=1e-4, atol=1e-3)
        r = paired_ratio(step(conv_1x1, tokens, weight, grad), step(linear, tokens, weight, grad),
                         block_time=0.05 if args.quick else 0.2, **options)
        gflop = 3 * 2 * batch * n * d * outputs / 1e9  # forward + the two backward GEMMs
        records.append(dict(site=site, axis=axis, tokens=n, features=d, outputs=outputs,
                            linear_ms=r.other_ms, conv_ms=r.base_ms, linear_gflops=gflop / r.other_ms * 1e3,
                            conv_gflops=gflop / r.base_ms * 1e3, unreliable=[r.reason] if r.reason else [],
                            **r.fields("linear_x")))
    env = environment("cpu", torch.get_num_threads())
    env.update(batch=batch, dtype="float32",
               step="forward + backward (tokens and weight) of one token-major projection")
    publish({"environment": env, "records": records}, COLUMNS, RESULTS / "projection_gemm_cpu.json",
            headers=HEADERS, out=args.out, write=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
