"""``reid-attention bench``: what attention costs, per layer, per network, per input size.

    reid-attention bench                  # default, CPU-sized: every kind at one paper site
                                          # (reference vs fused) + ResNet-50 network overhead
    reid-attention bench layers  [--kind rga_sc,pfsa] [--sites C:HxW,...|paper|first] [--compile]
    reid-attention bench network [--backbone resnet50] [--attention rga_sc]
    reid-attention bench sweep   [--kind rga_s] [--resolutions 128x64,...,512x256] [--plot FILE]

Every command returns result records (see :func:`run`) and prints them as a table, JSON, CSV
or markdown. Units: time in ms (median, IQR), FLOPs = 2 x multiply-adds (forward, in GFLOP at
the timed batch), memory = peak MiB of one training step above the set-up (CPU: high-water mark
of a fresh, memory-capped subprocess; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..registry import list_attentions
from .measure import MALLOC_MODES, set_malloc
from .report import FORMATS, environment, format_records
from .suites import PAPER_SITES, layer_spec, measure, measure_layer, network_spec

__all__ = ["main", "run", "parse_sites"]

LAYER_COLUMNS = ["kind", "site", "impl", "batch", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_iqr_ms", "samples_per_s",
                 "gflops", "params", "peak_mib", "error"]
NETWORK_COLUMNS = ["model", "batch", "fwd_bwd_ms", "samples_per_s", "gflops", "params", "memory_batch",
                   "peak_mib", "time_x", "memory_x", "params_x", "gflops_x", "error"]
SWEEP_COLUMNS = ["kind", "input", "site", "impl", "batch", "fwd_bwd_ms", "peak_mib", "error"]
HEADERS = {"fwd_ms": "fwd ms", "fwd_bwd_ms": "fwd+bwd ms", "fwd_bwd_iqr_ms": "IQR ms", "samples_per_s": "samples/s",
           "gflops": "GFLOP", "peak_mib": "peak MiB", "memory_batch": "mem batch", "time_x": "time x",
           "memory_x": "memory x", "params_x": "params x", "gflops_x": "FLOP x"}


# The default run's site per family: RGA's and PFSA's largest paper site (layer1) and APNet's
# layer3 (1024 x 24x12); APNet-S's reference at the 96x48 stem alone takes over a minute on 2 cores.
DEFAULT_SITES = {"rga": (256, (64, 32)), "pfsa": (256, (96, 32)), "apnet": (1024, (24, 12))}


def _family(kind: str) -> str:
    return "rga" if kind.startswith("rga") else "apnet" if kind.startswith("apnet") else kind


def _size(text: str) -> Tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 256x128), got {text!r}")
    return int(h), int(w)


def parse_sites(text: str) -> List[Tuple[int, Tuple[int, int]]]:
    """``"256:64x32,512:32x16"`` -> [(256, (64, 32)), (512, (32, 16))]."""
    sites = []
    for item in filter(None, text.split(",")):
        c, sep, hw = item.partition(":")
        if not sep or not c.isdigit():
            raise argparse.ArgumentTypeError(f"expected sites as C:HxW,... (e.g. 256:64x32), got {item!r}")
        sites.append((int(c), _size(hw)))
    return sites


def _kinds(text: Optional[str]) -> List[str]:
    kinds = list_attentions() if not text or text == "all" else text.split(",")
    unknown = sorted(set(kinds) - set(list_attentions()))
    if unknown:
        raise SystemExit(f"unknown --kind {', '.join(unknown)}; available: {', '.join(list_attentions())}")
    return kinds


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


def _run_jobs(jobs: Sequence[Tuple[str, Any]], quiet: bool) -> List[Dict[str, Any]]:
    progress, records = _Progress(len(jobs), quiet), []
    try:
        for label, job in jobs:
            progress.step(label)
            records.append(job())
            progress.done()
    finally:
        progress.close()
    return records


def _common(args: argparse.Namespace) -> Dict[str, Any]:
    autocast = None if args.dtype == "float32" else args.dtype
    return dict(device=args.device, channels_last=args.channels_last, threads=args.threads, autocast=autocast)


def _layer_jobs(args: argparse.Namespace):
    jobs = []
    for kind in _kinds(args.kind):
        if args.sites == "paper":
            sites = PAPER_SITES[_family(kind)]
        elif args.sites == "first":
            sites = PAPER_SITES[_family(kind)][:1]
        elif args.sites == "default":
            sites = [DEFAULT_SITES[_family(kind)]]
        else:
            sites = parse_sites(args.sites)
        for channels, feat_size in sites:
            for impl in args.impl:
                spec = layer_spec(kind, channels, feat_size, batch=args.batch, impl=impl, compile=args.compile,
                                  **_common(args))
                label = f"{kind} {channels}:{feat_size[0]}x{feat_size[1]} {impl}"
                jobs.append((label, lambda s=spec: measure_layer(
                    s, memory_batch=args.memory_batch, forward=True, min_run_time=args.min_run_time)))
    return jobs


def _network_jobs(args: argparse.Namespace):
    jobs = []
    for attention in (None, args.attention):
        spec = network_spec(args.backbone, attention, args.input_size, batch=args.batch,
                            last_stride=args.last_stride, sites=args.sites, **_common(args))
        name = args.backbone + (f" + {attention}" if attention else "")
        jobs.append((name, lambda s=spec, n=name: measure(
            s, {"model": n}, memory_batch=args.memory_batch, min_run_time=args.min_run_time)))
    return jobs


def _with_overhead(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Ratios of the attention model to the plain backbone (first record)."""
    base = records[0]
    for r in records:
        for key, col in (("fwd_bwd_ms", "time_x"), ("peak_mib", "memory_x"), ("params", "params_x"),
                         ("gflops", "gflops_x")):
            if r.get(key) is not None and base.get(key):
                r[col] = r[key] / base[key]
    return records


def _sweep_jobs(args: argparse.Namespace):
    jobs = []
    for kind in _kinds(args.kind):
        for size in args.resolutions:
            feat_size = (size[0] // args.stride, size[1] // args.stride)
            for impl in args.impl:
                spec = layer_spec(kind, args.channels, feat_size, batch=args.batch, impl=impl, **_common(args))
                label = f"{kind} {size[0]}x{size[1]} {impl}"

                def job(s=spec, size=size):
                    record = measure_layer(s, memory_batch=None, min_run_time=args.min_run_time)
                    return dict(record, input=f"{size[0]}x{size[1]}")

                jobs.append((label, job))
    return jobs


def plot_sweep(records: Sequence[Dict[str, Any]], path: pathlib.Path, env: Dict[str, Any]) -> None:
    """Peak memory and time vs input size, one line per kind and impl (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    inputs = list(dict.fromkeys(r["input"] for r in records))
    for key in dict.fromkeys((r["kind"], r["impl"]) for r in records):
        rows = [r for r in records if (r["kind"], r["impl"]) == key]
        xs = [inputs.index(r["input"]) for r in rows]
        style = "-o" if key[1] == "fused" else "--s"
        for ax, field in zip(axes, ("peak_mib", "fwd_bwd_ms")):
            pts = [(x, r[field]) for x, r in zip(xs, rows) if r.get(field) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{key[0]} {key[1]}")
            for x, r in zip(xs, rows):
                if r.get(field) is None and "out of memory" in (r.get("error") or ""):
                    ax.annotate("OOM", (x, ax.get_ylim()[1]), ha="center", va="top", color="C3")
    titles = ("peak training-step memory (MiB)", "forward+backward time (ms)")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_xticks(range(len(inputs)), inputs)
        ax.set_xlabel("input size (H x W)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    batch = records[0]["batch"] if records else "?"
    fig.suptitle(f"{records[0]['kind'] if records else ''} at the stride-4 site, batch {batch} - "
                 f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_common(p: argparse.ArgumentParser, batch: int, memory_batch: Optional[int]) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16/float16")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--memory-batch", type=int, default=memory_batch,
                   help="batch of the peak-memory probe (default: the timed batch; 0 = skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--malloc", default="system", choices=MALLOC_MODES,
                   help="CPU allocation while timing: glibc's defaults (system) or retain freed memory for "
                        "reuse, like a caching allocator (retain; Linux/glibc). Default system")
    p.add_argument("--repeat", dest="min_run_time", type=float, default=0.5,
                   help="seconds of timed runs per row (blocked autorange; default 0.5)")
    p.add_argument("--format", default="table", choices=FORMATS)
    p.add_argument("--out", type=pathlib.Path, default=None, help="also write the result here (format by --format)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-attention bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    layers = sub.add_parser("layers", help="every attention kind at its papers' sites, reference vs fused")
    layers.add_argument("--kind", default="all", help="comma-separated kinds or 'all'")
    layers.add_argument("--sites", default="paper",
                        help="'paper', 'first', 'default' or C:HxW,... (default: paper)")
    layers.add_argument("--impl", type=lambda s: s.split(","), default=["reference", "fused"])
    layers.add_argument("--compile", action="store_true", help="torch.compile the layer first")
    _add_common(layers, batch=8, memory_batch=None)
    network = sub.add_parser("network", help="a backbone with attention inserted vs the plain backbone")
    network.add_argument("--backbone", default="resnet50", help="any torchvision classification model")
    network.add_argument("--attention", default="rga_sc")
    network.add_argument("--input-size", type=_size, default=(256, 128))
    network.add_argument("--last-stride", type=int, default=1, help="ResNet last stride (0: leave as is)")
    network.add_argument("--sites", type=lambda s: s.split(","), default=None,
                         help="module names (default: the stage ends; with last stride 1 a ResNet's layer3 "
                              "and layer4 share stride 16, so pass layer1,layer2,layer3,layer4 for RGA's sites)")
    _add_common(network, batch=8, memory_batch=32)
    sweep = sub.add_parser("sweep", help="cost as the input resolution grows, reference vs fused, with a plot")
    sweep.add_argument("--kind", default="rga_s")
    sweep.add_argument("--channels", type=int, default=256, help="site channels (default 256: ResNet layer1)")
    sweep.add_argument("--stride", type=int, default=4, help="site output stride (default 4: layer1)")
    sweep.add_argument("--resolutions", type=lambda s: [_size(t) for t in s.split(",")],
                       default=[(128, 64), (256, 128), (384, 192), (512, 256)])
    sweep.add_argument("--impl", type=lambda s: s.split(","), default=["reference", "fused"])
    sweep.add_argument("--plot", type=pathlib.Path, default=None, help="PNG path (default: next to --out)")
    _add_common(sweep, batch=16, memory_batch=None)
    default = sub.add_parser("default", help="the default run (also: no command)")
    _add_common(default, batch=8, memory_batch=None)
    return parser


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a parsed command; returns {"environment": ..., "records": [...]} (and tables)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    env = environment(args.device, args.threads, args.malloc)
    env.update(command=args.command, batch=args.batch, dtype=args.dtype, channels_last=args.channels_last)
    if args.command == "layers":
        records = _run_jobs(_layer_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, LAYER_COLUMNS)]}
    if args.command == "network":
        args.last_stride = args.last_stride or None
        records = _with_overhead(_run_jobs(_network_jobs(args), args.quiet))
        return {"environment": env, "records": records, "tables": [(records, NETWORK_COLUMNS)]}
    if args.command == "sweep":
        records = _run_jobs(_sweep_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, SWEEP_COLUMNS)]}
    # default: every kind at one paper site (DEFAULT_SITES), then the ResNet-50 + RGA-SC overhead
    ns = dict(vars(args), kind="all", sites="default", impl=["reference", "fused"], compile=False)
    layer_records = _run_jobs(_layer_jobs(argparse.Namespace(**ns)), args.quiet)
    ns.update(backbone="resnet50", attention="rga_sc", input_size=(256, 128), last_stride=1, memory_batch=0,
              sites=["layer1", "layer2", "layer3", "layer4"])
    net_records = _with_overhead(_run_jobs(_network_jobs(argparse.Namespace(**ns)), args.quiet))
    return {"environment": env, "records": layer_records + net_records,
            "tables": [(layer_records, LAYER_COLUMNS), (net_records, NETWORK_COLUMNS)]}


def _render(result: Dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"environment": result["environment"], "records": result["records"]}, indent=2)
    parts = [format_records(rows, [c for c in cols if any(r.get(c) is not None for r in rows)], fmt,
                            headers=HEADERS) for rows, cols in result["tables"]]
    if fmt == "csv":
        return "\n".join(parts)
    env = result["environment"]
    head = (f"{env['date']} | {env['device_name']} | {env['threads']} threads | torch {env['torch']} | "
            f"dtype {env['dtype']} | times: median of blocked runs; FLOPs: 2 x multiply-adds, forward")
    return "\n\n".join([head, *parts])


COMMANDS = ("layers", "network", "sweep", "default")


def normalise_argv(argv: Sequence[str]) -> List[str]:
    """Options without a command run the default configuration (``bench --threads 2``)."""
    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "default")
    return argv


def main(argv: Optional[Iterable[str]] = None) -> int:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    args = build_parser().parse_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    result = run(args)
    text = _render(result, args.format)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.command == "sweep":
        path = args.plot or (args.out.with_suffix(".png") if args.out else None)
        if path:
            plot_sweep(result["records"], path, result["environment"])
            print(f"plot: {path}", file=sys.stderr)
    return 0
