"""The work of a parsed ``reid-attention bench`` command: its rows as labelled jobs (one
measurement each), run in order with progress on stderr, into a result for :mod:`.render`.

A job is ``(label, callable -> record)``; :func:`run` builds the command's jobs, runs them and
returns ``{"environment", "records", "tables"}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Callable, cast

import torch

from .._switches import IMPLS, MemorySwitch
from ..registry import create_attention, list_attentions, needs_feat_size
from .measure import set_malloc
from .network import available_runtimes, eval_rows, paired_step
from .paired import MAX_ROUNDS, MAX_SPREAD, PairedRatio, rounds_options
from .render import EVAL_COLUMNS, LAYER_COLUMNS, NETWORK_COLUMNS, SWEEP_COLUMNS
from .report import environment
from .suites import PAPER_SITES, layer_spec, measure, measure_layer, network_spec

__all__ = ["BenchSite", "Job", "DEFAULT_SITES", "STEP_TEXT", "layer_cases", "sweep_cases", "layer_jobs",
           "network_jobs", "sweep_jobs", "with_overhead", "run_jobs", "run"]

# (channels, (H, W)) of a benchmarked layer: a site of the papers, not an ``insert.Site``.
BenchSite = tuple[int, tuple[int, int]]
Job = tuple[str, Callable[[], dict[str, Any]]]

# The default run's site per family: RGA's and PFSA's largest paper site (layer1) and APNet's
# layer3 (1024 x 24x12); APNet-S's reference at the 96x48 stem alone takes over a minute on 2 cores.
DEFAULT_SITES: dict[str, BenchSite] = {"rga": (256, (64, 32)), "pfsa": (256, (96, 32)),
                                       "apnet": (1024, (24, 12))}
STEP_TEXT = {"optimizer": "forward + loss + backward + SGD momentum step + zero_grad(set_to_none=True)",
             "accumulate": "forward().backward(grad), gradients accumulating"}


def _family(kind: str) -> str:
    return "rga" if kind.startswith("rga") else "apnet" if kind.startswith("apnet") else kind


def _sites_of(kind: str, sites: str | list[BenchSite]) -> list[BenchSite]:
    """The sites of ``--sites``: a keyword ('paper', 'first', 'default') or explicit sites."""
    if sites == "paper":
        return list(PAPER_SITES[_family(kind)])
    if sites == "first":
        return list(PAPER_SITES[_family(kind)][:1])
    if sites == "default":
        return [DEFAULT_SITES[_family(kind)]]
    return list(cast("list[BenchSite]", sites))  # not a keyword: explicit sites


def _common(args: argparse.Namespace) -> dict[str, Any]:
    autocast = None if args.dtype == "float32" else args.dtype
    return dict(device=args.device, channels_last=args.channels_last, threads=args.threads, autocast=autocast,
                step=args.step)


def _has_memory_modes(kind: str) -> bool:
    """Whether ``kind``'s layer takes ``memory`` (a tiny instance is built to ask)."""
    tiny = create_attention(kind, 8, feat_size=(4, 4) if needs_feat_size(kind) else None)
    return isinstance(tiny, MemorySwitch)


def layer_cases(args: argparse.Namespace) -> list[tuple[str, int, tuple[int, int], str, str | None]]:
    """(kind, channels, feat_size, impl, memory) of every ``layers`` row; memory is None where it
    does not apply (other kinds, the reference impl) or only the default mode was asked for."""
    cases = []
    for kind in args.kind:
        modes = args.memory if args.memory != ["auto"] and _has_memory_modes(kind) else [None]
        for c, fs in _sites_of(kind, args.sites):
            for impl in args.impl:
                cases += [(kind, c, fs, impl, m) for m in (modes if impl == "fused" else [None])]
    return cases


def sweep_cases(args: argparse.Namespace) -> list[tuple[str, tuple[int, int], tuple[int, int], str]]:
    """(kind, input size, feat_size, impl) of every ``sweep`` row."""
    return [(kind, size, (size[0] // args.stride, size[1] // args.stride), impl)
            for kind in args.kind for size in args.resolutions for impl in args.impl]


def layer_jobs(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    for kind, channels, feat_size, impl, memory in layer_cases(args):
        extra: dict[str, Any] = {} if memory is None else {"memory": memory}
        spec = layer_spec(kind, channels, feat_size, batch=args.batch, impl=impl, compile=args.compile,
                          **extra, **_common(args))
        label = f"{kind} {channels}:{feat_size[0]}x{feat_size[1]} {impl}"
        label += f" memory={memory}" if memory else ""

        def job(s: dict[str, Any] = spec) -> dict[str, Any]:
            return measure_layer(s, memory_batch=args.memory_batch, forward=True,
                                 min_run_time=args.min_run_time)

        jobs.append((label, job))
    return jobs


def network_specs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(name, spec) of the plain backbone, then of the backbone with ``args.attention`` inserted."""
    specs = []
    for attention in (None, args.attention):
        spec = network_spec(args.backbone, attention, args.input_size, batch=args.batch, impl=args.impl,
                            last_stride=args.last_stride or None, sites=args.sites, **_common(args))
        if attention and getattr(args, "memory", "auto") != "auto":
            spec["kwargs"]["memory"] = args.memory
        specs.append((args.backbone + (f" + {attention}" if attention else ""), spec))
    return specs


def network_jobs(args: argparse.Namespace) -> list[Job]:
    """The rows of the plain backbone and of the backbone with attention (each timed alone, its
    memory, FLOPs and parameters), then their training steps timed alternately
    (:func:`.network.paired_step`, the ``time_x`` of the second row)."""
    jobs: list[Job] = []
    specs = network_specs(args)
    for name, spec in specs:

        def job(s: dict[str, Any] = spec, n: str = name) -> dict[str, Any]:
            return measure(s, {"model": n}, memory_batch=args.memory_batch, min_run_time=args.min_run_time)

        jobs.append((name, job))

    def paired() -> dict[str, Any]:
        options = rounds_options(args.max_rounds, args.max_spread)
        return {"paired": paired_step(specs[0][1], specs[1][1], **options)}

    jobs.append(("training steps, alternately", paired))
    return jobs


def network_eval_jobs(args: argparse.Namespace) -> list[Job]:
    """Eval-mode rows (:func:`.network.eval_rows`): one job, the models built and their FLOPs
    counted once for every runtime."""
    specs = network_specs(args)

    def job() -> dict[str, Any]:
        return {"rows": eval_rows([s for _, s in specs], [n for n, _ in specs], batches=args.eval_batches,
                                  runtimes=args.runtimes, threads=args.threads,
                                  **rounds_options(args.max_rounds, args.max_spread))}

    return [(f"eval forward, {', '.join(args.runtimes)}", job)]


def sweep_jobs(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    for kind, size, feat_size, impl in sweep_cases(args):
        spec = layer_spec(kind, args.channels, feat_size, batch=args.batch, impl=impl, **_common(args))
        label = f"{kind} {size[0]}x{size[1]} {impl}"

        def job(s: dict[str, Any] = spec, size: tuple[int, int] = size) -> dict[str, Any]:
            record = measure_layer(s, memory_batch=args.memory_batch, min_run_time=args.min_run_time)
            return dict(record, input=f"{size[0]}x{size[1]}")

        jobs.append((label, job))
    return jobs


def with_overhead(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of :func:`network_jobs` with their ratios to the plain backbone (first row):
    ``memory_x``, ``params_x``, ``gflops_x``; ``time_x`` (with ``time_x_spread`` and
    ``time_x_rounds``) is the paired ratio of the training steps, absent where it did not settle
    (the row says why in ``unreliable``); ``time_per_flop_x`` = time_x / gflops_x (how far the
    time is from the FLOP floor: 1.0 = the extra time is exactly the extra forward FLOPs)."""
    records = [r for r in results if "paired" not in r]
    pairs = [cast(PairedRatio, r["paired"]) for r in results if "paired" in r]
    base = records[0]
    for r in records:
        for key, col in (("peak_mib", "memory_x"), ("params", "params_x"), ("gflops", "gflops_x")):
            if r.get(key) is not None and base.get(key):
                r[col] = r[key] / base[key]
    if pairs and len(records) > 1:
        base["time_x"] = 1.0
        other = records[1]
        other.update(pairs[0].fields("time_x"))
        if pairs[0].reason:
            other["unreliable"] = [*(other.get("unreliable") or []), pairs[0].reason]
        if other["time_x"] is not None and other.get("gflops_x"):
            other["time_per_flop_x"] = other["time_x"] / other["gflops_x"]
    return records


class _Progress:
    """tqdm when installed, otherwise one line per step on stderr."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.n, self.quiet, self.bar = total, 0, quiet, None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_description(label)
        elif not self.quiet:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_jobs(jobs: Sequence[Job], quiet: bool) -> list[dict[str, Any]]:
    """The records of ``jobs``, run in order (progress on stderr unless ``quiet``)."""
    progress, records = _Progress(len(jobs), quiet), []
    try:
        for label, job in jobs:
            progress.step(label)
            records.append(job())
            progress.done()
    finally:
        progress.close()
    return records


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run a parsed command; returns {"environment": ..., "records": [...], "tables": [...]}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    env = environment(args.device, args.threads, args.malloc)
    env.update(command=args.command, batch=args.batch, dtype=args.dtype, channels_last=args.channels_last,
               step=args.step, step_text=STEP_TEXT[args.step])
    if args.command == "layers":
        records = run_jobs(layer_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, LAYER_COLUMNS)]}
    if args.command == "network" and args.mode == "eval":
        records = [row for r in run_jobs(network_eval_jobs(args), args.quiet) for row in r["rows"]]
        return {"environment": env, "records": records, "tables": [(records, EVAL_COLUMNS)]}
    if args.command == "network":
        records = with_overhead(run_jobs(network_jobs(args), args.quiet))
        return {"environment": env, "records": records, "tables": [(records, NETWORK_COLUMNS)]}
    if args.command == "sweep":
        records = run_jobs(sweep_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, SWEEP_COLUMNS)]}
    # default: every kind at one paper site (DEFAULT_SITES), then the ResNet-50 + RGA-SC overhead in
    # training and in inference (CPU-sized: batches 1 and 8; `bench network --mode eval` defaults to 1 and 64)
    ns = dict(vars(args), kind=list_attentions(), sites="default", impl=list(IMPLS), memory=["auto"],
              compile=False)
    layer_records = run_jobs(layer_jobs(argparse.Namespace(**ns)), args.quiet)
    ns.update(backbone="resnet50", attention="rga_sc", impl="fused", input_size=(256, 128), last_stride=1,
              memory="auto", memory_batch=0, sites=["layer1", "layer2", "layer3", "layer4"],
              eval_batches=(1, 8), runtimes=available_runtimes(), max_spread=MAX_SPREAD,
              max_rounds=MAX_ROUNDS)
    net_args = argparse.Namespace(**ns)
    net_records = with_overhead(run_jobs(network_jobs(net_args), args.quiet))
    eval_records = [row for r in run_jobs(network_eval_jobs(net_args), args.quiet) for row in r["rows"]]
    return {"environment": env, "records": layer_records + net_records + eval_records,
            "tables": [(layer_records, LAYER_COLUMNS), (net_records, NETWORK_COLUMNS),
                       (eval_records, EVAL_COLUMNS)]}
