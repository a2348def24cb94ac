"""PFSA, APNet-C and APNet-S at their papers' sites: reference vs fused.

PFSA at layer1..3 of a 384x128 ResNet-50 (256x96x32, 512x48x16, 1024x24x8), batch 64:
  pfsa        forward ``x * a``: fused vs reference (vmapped per-sample normalisation) and vs
              ``loop`` = the official layer's Python loop over the batch, dividing each map in place
  pfsa_pool   ``.pool(x)`` (fused) vs ``mul_mean`` = ``(x * a).mean((2, 3))`` (fused layer + mean)
  pfsa bound  ``x * a`` with a fixed, precomputed map: the memory passes any implementation of the
              layer must make (read x, write the output; read the gradient, write x's gradient),
              so ``loop / bound`` is the largest speed-up over the loop this machine allows
APNet-C and APNet-S at the APNet sites (384x192 input, last stride 1: stem 64x96x48, layer1
256x96x48, layer2 512x48x24, layer3 1024x24x12, layer4 2048x24x12), levels 2 and 3, batch 8:
  apnet_c     fused vs reference
  apnet_s     fused vs reference, and ``loop`` = a Python loop over per-stripe fused RGA-S modules

Each row: median time of one training step (``--step optimizer``, the default: forward, loss,
backward, SGD momentum step, zero_grad(set_to_none=True); ``--step accumulate``: forward and
backward only), forward FLOPs (2 x multiply-adds), parameters, peak memory of the same step
(CPU: high-water mark of a fresh subprocess; CUDA: max_memory_allocated). The summary reports
the speed-up targets (measured, not asserted). Exits 1 if a row failed other than by running
out of memory.

    python benchmarks/pyramid_sites.py                 # CPU -> results/pyramid_sites_cpu.json
    python benchmarks/pyramid_sites.py --only apnet_s --device cuda
    python benchmarks/pyramid_sites.py --quick         # smoke run: one small site, batch 2
    python benchmarks/pyramid_sites.py --only apnet_s --impl fused loop --malloc retain
                                                       # -> results/pyramid_sites_cpu_retain.json
    python benchmarks/pyramid_sites.py --device cuda --compile --levels 2
                                                       # -> results/pyramid_sites_cuda_compiled.json

``--malloc retain`` times with freed memory kept for reuse (see
:func:`reid_attention.bench.measure.set_malloc`): glibc's default maps every block above 32 MiB
afresh, and the page faults that costs favour code that allocates smaller tensors.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import torch
from torch import Tensor, nn

from reid_attention import APNetS, ParameterFreeSpatialAttention, create_attention
from reid_attention.apnet_s import stripe_loop
from reid_attention.bench.measure import MALLOC_MODES, STEPS, set_malloc
from reid_attention.bench.report import environment, publish
from reid_attention.bench.suites import PAPER_SITES, failed, layer_spec, measure

COLUMNS = ["flag", "kind", "level", "site", "impl", "batch", "step_ms", "gflops", "params", "peak_mib",
           "error"]
HEADERS = {"step_ms": "step ms", "gflops": "GFLOP fwd", "peak_mib": "peak MiB"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
FACTORY = f"{pathlib.Path(__file__).resolve()}:variant"
KINDS = ("pfsa", "apnet_c", "apnet_s")


class PfsaMulMean(nn.Module):
    """The official use of PFSA before pooling: the layer, then the spatial mean."""

    def __init__(self) -> None:
        super().__init__()
        self.pfsa = ParameterFreeSpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        return self.pfsa(x).mean((2, 3))


class PfsaLoop(nn.Module):
    """The official layer's structure: per-sample in-place normalisation in a Python loop."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(1).flatten(1)
        for b in range(x.shape[0]):
            m[b] /= m[b].sum()
        return x * m.view(x.shape[0], 1, *x.shape[2:])


class PfsaBound(nn.Module):
    """``x * a`` with a constant map a (no gradient): the memory traffic floor of the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0], 1, *x.shape[2:])
        if self.a is None or self.a.shape != shape:
            self.a = torch.full(shape, 1.0 / (shape[2] * shape[3]), dtype=x.dtype, device=x.device)
        return x * self.a


class PfsaPool(nn.Module):
    """The same pooling as one fused operation (a sum, i.e. H*W times the mean above)."""

    def __init__(self) -> None:
        super().__init__()
        self.pfsa = ParameterFreeSpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        return self.pfsa.pool(x)


class StripeLoop(nn.Module):
    """APNet-S computed by a Python loop over its per-stripe RGA-S modules, each fused."""

    def __init__(self, apnet: APNetS) -> None:
        super().__init__()
        self.apnet = apnet

    def forward(self, x: Tensor) -> Tensor:
        for level in reversed(self.apnet.levels):
            x = stripe_loop(x, level)
        return x


def variant(name: str, channels: int, feat_size, impl: str, **kw: Any) -> nn.Module:
    """Factory of every benchmarked module (a registry layer or one of the comparisons above)."""
    if (name, impl) == ("pfsa", "loop"):
        return PfsaLoop()
    if (name, impl) == ("pfsa", "bound"):
        return PfsaBound()
    if (name, impl) == ("pfsa_pool", "fused"):
        return PfsaPool()
    if (name, impl) == ("pfsa_pool", "mul_mean"):
        return PfsaMulMean()
    if impl == "loop":
        return StripeLoop(create_attention(name, channels, feat_size, impl="fused", **kw))
    return create_attention(name, channels, feat_size, impl=impl, **kw)


def jobs(args) -> list[dict[str, Any]]:
    """(label, spec) of every row."""
    pfsa_sites, apnet_sites = PAPER_SITES["pfsa"], PAPER_SITES["apnet"]
    levels = tuple(args.levels)
    if args.quick:
        pfsa_sites = apnet_sites = [(64, (16, 8))]
        levels = (2,)
    rows = []

    def wanted(*impls):
        return [i for i in impls if args.impl is None or i in args.impl]

    def add(kind, impl, channels, feat_size, batch, level=None):
        kw = {} if level is None else {"levels": level}
        spec = layer_spec(kind, channels, feat_size, batch=batch, impl=impl, device=args.device,
                          threads=args.threads, factory=FACTORY, step=args.step, compile=args.compile, **kw)
        site = f"{channels}:{feat_size[0]}x{feat_size[1]}"
        rows.append(({"kind": kind, "level": level, "site": site, "impl": impl}, spec))

    if "pfsa" in args.only:
        for c, fs in pfsa_sites:
            for impl in wanted("loop", "reference", "fused", "bound"):
                add("pfsa", impl, c, fs, args.pfsa_batch)
            for impl in wanted("mul_mean", "fused"):
                add("pfsa_pool", impl, c, fs, args.pfsa_batch)
    for kind, impls in (("apnet_c", ("reference", "fused")), ("apnet_s", ("reference", "fused", "loop"))):
        if kind in args.only:
            for level in levels:
                for c, fs in apnet_sites:
                    for impl in wanted(*impls):
                        add(kind, impl, c, fs, args.batch, level)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups (slower time / faster time) behind the targets, per site and summed."""
    time = {(r["kind"], r["level"], r["site"], r["impl"]): r.get("step_ms") for r in records}

    def times(kind, level, impl):
        """{site: ms} of one kind, level and impl, sites in network order."""
        rows = {s: t for (k, lv, s, i), t in time.items() if (k, lv, i) == (kind, level, impl)}
        return dict(sorted(rows.items(), key=lambda item: int(item[0].split(":")[0])))

    def check(name, kind, slow, fast, target, level=None):
        slow_t, fast_t = times(kind, level, slow), times(kind, level, fast)
        if not slow_t:
            return
        per_site = {s: _ratio(t, fast_t.get(s)) for s, t in slow_t.items()}
        worst = None if None in per_site.values() else min(per_site.values())
        out[name] = {"per_site": per_site, "min": worst, "target": target,
                     "met": None if worst is None or target is None else worst >= target}

    def check_summed(name, kind, slow, fast, target, level):
        slow_t, fast_t = times(kind, level, slow), times(kind, level, fast)
        if not slow_t:
            return
        complete = None not in [*slow_t.values(), *fast_t.values()]
        speedup = _ratio(sum(slow_t.values()), sum(fast_t.values())) if complete else None
        out[name] = {"speedup": speedup, "target": target,
                     "met": None if speedup is None or target is None else speedup >= target}

    out: dict[str, Any] = {}
    check("pfsa_fused_vs_per_sample_loop", "pfsa", "loop", "fused", 10.0)
    check("pfsa_fused_vs_reference", "pfsa", "reference", "fused", None)
    check("pfsa_loop_vs_bound", "pfsa", "loop", "bound", None)
    check("pfsa_pool_vs_mul_mean", "pfsa_pool", "mul_mean", "fused", 2.0)
    for level in (2, 3):
        check(f"apnet_c_level{level}_fused_vs_reference", "apnet_c", "reference", "fused", 1.0, level)
        check(f"apnet_s_level{level}_fused_vs_loop", "apnet_s", "loop", "fused", 1.0, level)
        check_summed(f"apnet_s_level{level}_fused_vs_reference_summed", "apnet_s", "reference", "fused",
                     5.0 if level == 2 else None, level)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="APNet batch (default 8)")
    p.add_argument("--pfsa-batch", type=int, default=64, help="PFSA batch (default 64)")
    p.add_argument("--memory-batch", type=int, default=None, help="memory probe batch (default: timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--levels", nargs="+", type=int, choices=(2, 3), default=[2, 3],
                   help="APNet pyramid levels")
    p.add_argument("--step", default="optimizer", choices=STEPS, help="the timed training step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every module (suffixes the result file with _compiled)")
    p.add_argument("--impl", nargs="+", default=None, help="only these impls (default: all of each kind)")
    p.add_argument("--malloc", default="system", choices=MALLOC_MODES, help="CPU allocation while timing")
    p.add_argument("--quick", action="store_true", help="smoke run: one small site, level 2, batch 2")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--merge", action="store_true",
                   help="replace only the measured rows in the existing result file, keep the others")
    args = p.parse_args(argv)
    if args.quick:
        args.batch = args.pfsa_batch = args.memory_batch = 2
        args.min_run_time = 0.05

    torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    records = []
    todo = jobs(args)
    for n, (label, spec) in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {label}", file=sys.stderr, flush=True)
        records.append(measure(spec, label, memory_batch=args.memory_batch, min_run_time=args.min_run_time))
    env = environment(args.device, args.threads, args.malloc)
    env.update(batch=args.batch, pfsa_batch=args.pfsa_batch, memory_batch=args.memory_batch, step=args.step,
               compiled=args.compile)
    suffix = ("" if args.malloc == "system" else f"_{args.malloc}") + ("_compiled" if args.compile else "")
    path = args.out or RESULTS / f"pyramid_sites_{args.device.split(':')[0]}{suffix}.json"
    if args.merge and path.exists():
        new = {_key(r) for r in records}
        records = [r for r in json.loads(path.read_text())["records"] if _key(r) not in new] + records
        records.sort(key=_order)
    result = {"environment": env, "summary": summary(records), "records": records}
    publish(result, COLUMNS, path, headers=HEADERS, write=not args.quick or args.out is not None)
    return 1 if any(failed(r) for r in records) else 0


def _key(record: dict[str, Any]) -> tuple:
    return record["kind"], record["level"], record["site"], record["impl"]


def _order(record: dict[str, Any]) -> tuple:
    """Result-file order: kind, level, site in network order, then impl."""
    kinds = ("pfsa", "pfsa_pool", "apnet_c", "apnet_s")
    impls = ("loop", "reference", "fused", "bound", "mul_mean")
    return (kinds.index(record["kind"]), record["level"] or 0, int(record["site"].split(":")[0]),
            impls.index(record["impl"]) if record["impl"] in impls else len(impls))


if __name__ == "__main__":
    sys.exit(main())
