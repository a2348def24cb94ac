"""``reid-attention bench``: what attention costs, per layer, per network, per input size.

The commands (``layers``, ``network``, ``sweep`` and the ``default`` run) build result records
(see :func:`run`) and print them as a table, JSON, CSV or markdown; :data:`DESCRIPTION` is the
user-facing summary shown by ``--help``. Bad arguments (an unwritable ``--out``, a missing
optional package included) end in one ``error:`` line and exit status 2 before any row runs;
a row that failed for a reason other than running out of memory makes the exit status 1
(:func:`..suites.failed`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import __version__
from .._switches import IMPLS, MEMORY_MODES, MemorySwitch
from .._extras import MissingExtraError, require
from ..registry import create_attention, list_attentions, needs_feat_size
from .measure import MALLOC_MODES, STEPS, set_malloc
from .report import FORMATS, environment, format_flagged, row_name
from .suites import PAPER_SITES, failed, layer_spec, measure, measure_layer, network, network_spec

__all__ = ["main", "run", "parse_sites", "build_parser", "DESCRIPTION"]

DESCRIPTION = """\
What attention layers cost: one training step's time, forward FLOPs, parameters, peak memory.

  reid-attention bench            the default run (CPU-sized, what `make bench` runs): every
                                  kind at one paper site, reference vs fused, then
                                  ResNet-50 + RGA-SC at layer1..4 vs plain ResNet-50
  reid-attention bench layers     attention kinds at their papers' sites
  reid-attention bench network    a backbone with attention inserted vs the plain backbone
  reid-attention bench sweep      cost as the input resolution grows, with a plot

The timed step (--step): 'optimizer' (default) = forward, a loss, backward, an SGD step with
momentum and zero_grad(set_to_none=True), as training runs; 'accumulate' = forward().backward()
with gradients accumulating into existing buffers. Peak memory is measured on the same step.
Units: time in ms (median of blocked runs, and its IQR); FLOPs = 2 x multiply-adds of the
forward, GFLOP at the timed batch; memory = peak MiB of one step above the set-up (CPU:
high-water mark of a fresh, memory-capped subprocess; CUDA: max_memory_allocated).
A '!' marks a row whose timing is unreliable (the reasons follow the table).
Exit status: 0, 1 if a row failed other than by running out of memory, 2 for bad arguments.
See 'reid-attention bench COMMAND --help' for a command's options."""

LAYER_COLUMNS = ["flag", "kind", "site", "impl", "memory", "batch", "fwd_ms", "step_ms", "step_iqr_ms", "samples_per_s",
                 "gflops", "params", "peak_mib", "error"]
NETWORK_COLUMNS = ["flag", "model", "batch", "step_ms", "step_iqr_ms", "samples_per_s", "gflops", "params",
                   "memory_batch", "peak_mib", "time_x", "memory_x", "params_x", "gflops_x", "time_per_flop_x",
                   "error"]
SWEEP_COLUMNS = ["flag", "kind", "input", "site", "impl", "batch", "step_ms", "peak_mib", "error"]
HEADERS = {"fwd_ms": "fwd ms", "step_ms": "step ms", "step_iqr_ms": "IQR ms",
           "samples_per_s": "samples/s", "gflops": "GFLOP", "peak_mib": "peak MiB", "memory_batch": "mem batch",
           "time_x": "time x", "memory_x": "memory x", "params_x": "params x", "gflops_x": "FLOP x",
           "time_per_flop_x": "time/FLOP x"}
STEP_TEXT = {"optimizer": "forward + loss + backward + SGD momentum step + zero_grad(set_to_none=True)",
             "accumulate": "forward().backward(grad), gradients accumulating"}

# The default run's site per family: RGA's and PFSA's largest paper site (layer1) and APNet's
# layer3 (1024 x 24x12); APNet-S's reference at the 96x48 stem alone takes over a minute on 2 cores.
DEFAULT_SITES = {"rga": (256, (64, 32)), "pfsa": (256, (96, 32)), "apnet": (1024, (24, 12))}
SITE_KEYWORDS = ("paper", "first", "default")
COMMANDS = ("layers", "network", "sweep", "default")
Site = Tuple[int, Tuple[int, int]]


def _family(kind: str) -> str:
    return "rga" if kind.startswith("rga") else "apnet" if kind.startswith("apnet") else kind


# --- argument types: each raises ArgumentTypeError naming what was expected ---------------------


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _size(text: str) -> Tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive H and W (e.g. 256x128), got {text!r}")
    return int(h), int(w)


def _sizes(text: str) -> List[Tuple[int, int]]:
    return [_size(t) for t in text.split(",")]


def parse_sites(text: str) -> List[Site]:
    """``"256:64x32,512:32x16"`` -> [(256, (64, 32)), (512, (32, 16))]; every number positive."""
    sites = []
    for item in filter(None, text.split(",")):
        c, sep, hw = item.partition(":")
        if not sep or not c.isdigit() or int(c) < 1:
            raise argparse.ArgumentTypeError(
                f"expected sites as C:HxW,... with positive numbers (e.g. 256:64x32), got {item!r}")
        try:
            sites.append((int(c), _size(hw)))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected sites as C:HxW,... with positive numbers (e.g. 256:64x32), got {item!r}") from None
    if not sites:
        raise argparse.ArgumentTypeError(f"expected at least one site C:HxW, got {text!r}")
    return sites


def _layer_sites(text: str) -> Union[str, List[Site]]:
    """A keyword of ``SITE_KEYWORDS`` or an explicit list of sites."""
    if text in SITE_KEYWORDS:
        return text
    try:
        return parse_sites(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(map(repr, SITE_KEYWORDS))} or C:HxW,... with positive C, H and W "
            f"(e.g. 256:64x32,512:32x16), "
            f"got {text!r}") from None


def _one_of(choices: Sequence[str], what: str, *, many: bool = False, all_word: bool = False,
            listing: Optional[str] = None) -> Callable:
    """A type accepting one of ``choices`` (``many``: a comma-separated list; ``all_word``: or
    'all'), hinting near misses; ``listing`` replaces the list of choices in the message."""

    def convert(text: str):
        if all_word and text == "all":
            return list(choices)
        items = text.split(",") if many else [text]
        for item in items:
            if item not in choices:
                close = difflib.get_close_matches(item, choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                expected = listing or ", ".join(choices) + (" or 'all'" if all_word else "")
                raise argparse.ArgumentTypeError(f"unknown {what} {item!r}{hint}; expected {expected}")
        return items if many else text

    return convert


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here (torch {torch.__version__}, {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a GPU index below {torch.cuda.device_count()}")
    return text


def _backbone(text: str) -> str:
    try:
        torchvision = require("torchvision", feature="reid-attention bench network", extra="bench")
    except MissingExtraError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    names = torchvision.models.list_models(module=torchvision.models)
    listing = "a name of torchvision.models.list_models(module=torchvision.models), e.g. resnet50"
    return _one_of(names, "torchvision classification model", listing=listing)(text)


def _writable(text: str) -> pathlib.Path:
    """A file path that can be written: not a directory, and its nearest existing ancestor a
    writable directory (the missing ones are created when writing)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path")
    where = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if where is not path and not where.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(where)!r} is not a directory")
    if not os.access(where, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(where)!r} is not writable")
    return path


# --- the parser -------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away), and which
    remembers its option names (for the hint of :func:`_misplaced`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: List[str] = []
        self.commands: Dict[str, "_Parser"] = {}
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options += action.option_strings
        return action

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser, batch: int, memory_batch: Optional[int]) -> None:
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16 / float16")
    p.add_argument("--batch", type=_positive_int, default=batch, help="timed batch size")
    memory_default = "the timed batch" if memory_batch is None else str(memory_batch)
    p.add_argument("--memory-batch", type=_non_negative_int, default=memory_batch,
                   help=f"batch of the peak-memory probe; 0 skips it (default: {memory_default})")
    p.add_argument("--step", default="optimizer", choices=STEPS,
                   help="the timed training step: 'optimizer' (loss, backward, SGD momentum step, "
                        "zero_grad(set_to_none=True)) or 'accumulate' (forward().backward(), gradients "
                        "accumulating)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: torch's thread count)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--malloc", default="system", choices=MALLOC_MODES,
                   help="CPU allocation while timing: glibc's defaults (system), or retain freed memory for "
                        "reuse like a caching allocator (retain; Linux/glibc)")
    p.add_argument("--repeat", dest="min_run_time", metavar="SECONDS", type=_positive_float, default=0.5,
                   help="seconds of timed runs per row (torch.utils.benchmark blocked autorange)")
    p.add_argument("--format", default="table", choices=FORMATS, help="output format")
    p.add_argument("--out", type=_writable, default=None,
                   help="also write the output to this file, in --format (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    """The ``reid-attention bench`` parser; ``parser.commands`` maps each command to its parser."""
    parser = _Parser(prog="reid-attention bench", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"reid-attention {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", parser_class=_Parser)
    kinds = _one_of(list_attentions(), "attention kind", many=True, all_word=True)
    impls = _one_of(IMPLS, "impl", many=True)

    layers = sub.add_parser("layers", help="attention kinds at their papers' sites, reference vs fused",
                            description="Every attention kind at its papers' sites, reference vs fused.")
    layers.add_argument("--kind", type=kinds, default="all",
                        help=f"comma-separated kinds ({', '.join(list_attentions())}) or 'all'")
    layers.add_argument("--sites", type=_layer_sites, default="paper",
                        help="'paper' (every paper site), 'first' (the first), 'default' (the default run's) "
                             "or explicit sites C:HxW,... (e.g. 256:64x32)")
    layers.add_argument("--impl", type=impls, default=",".join(IMPLS), help="comma-separated impls")
    layers.add_argument("--memory", type=_one_of(MEMORY_MODES, "memory mode", many=True), default="default",
                        help="comma-separated memory modes of the fused RGA / APNet-S rows (default, lean); "
                             "other rows run once")
    layers.add_argument("--compile", action="store_true", help="torch.compile the layer first")
    _add_common(layers, batch=8, memory_batch=None)

    net = sub.add_parser("network", help="a backbone with attention inserted vs the plain backbone",
                         description="A torchvision backbone with attention inserted vs the plain backbone: "
                                     "time_x, memory_x, gflops_x and time_per_flop_x (= time_x / gflops_x, "
                                     "1.0 = time grows exactly with the FLOPs).")
    net.add_argument("--backbone", type=_backbone, default="resnet50", help="a torchvision classification model")
    net.add_argument("--attention", type=_one_of(list_attentions(), "attention kind"), default="rga_sc",
                     help=f"one of {', '.join(list_attentions())}")
    net.add_argument("--impl", type=_one_of(IMPLS, "impl"), default="fused", help="the attention's impl")
    net.add_argument("--memory", type=_one_of(MEMORY_MODES, "memory mode"), default="default",
                     help="RGA / APNet-S memory mode: 'lean' recomputes the relation embedding in backward")
    net.add_argument("--input-size", type=_size, default="256x128", help="input HxW")
    net.add_argument("--last-stride", type=int, choices=(0, 1, 2), default=1,
                     help="ResNet last stride; 0 leaves the backbone as it is (needed for non-ResNets)")
    net.add_argument("--sites", type=lambda s: s.split(","), default=None,
                     help="comma-separated module names (default: the stage ends; with last stride 1 a ResNet's "
                          "layer3 and layer4 share stride 16, so pass layer1,layer2,layer3,layer4 for RGA's sites)")
    _add_common(net, batch=8, memory_batch=32)

    sweep = sub.add_parser("sweep", help="cost as the input resolution grows, reference vs fused, with a plot",
                           description="Cost of a layer at one site as the input resolution grows.")
    sweep.add_argument("--kind", type=kinds, default="rga_s", help="comma-separated kinds or 'all'")
    sweep.add_argument("--channels", type=_positive_int, default=256, help="site channels (256: ResNet layer1)")
    sweep.add_argument("--stride", type=_positive_int, default=4, help="site output stride (4: layer1)")
    sweep.add_argument("--resolutions", type=_sizes, default="128x64,256x128,384x192,512x256",
                       help="comma-separated input sizes HxW")
    sweep.add_argument("--impl", type=impls, default=",".join(IMPLS), help="comma-separated impls")
    sweep.add_argument("--plot", type=_writable, default=None,
                       help="PNG path (default: next to --out, with .png; none without --out)")
    _add_common(sweep, batch=16, memory_batch=None)

    default = sub.add_parser("default", help="the default run (also: no command)",
                             description="The default run: every kind at one paper site (reference vs fused), "
                                         "then ResNet-50 + RGA-SC at layer1..4 vs plain ResNet-50.")
    _add_common(default, batch=8, memory_batch=None)
    parser.commands = dict(sub.choices)
    return parser


def normalise_argv(argv: Sequence[str]) -> List[str]:
    """Options without a command run the default configuration (``bench --threads 2``)."""
    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "default")
    return argv


def _misplaced(extra: Sequence[str], command: str, commands: Dict[str, _Parser]) -> str:
    """A hint naming the commands that do take an option given to the wrong one (or, for a
    word where the command goes, the commands there are)."""
    if command == "default" and not extra[0].startswith("-"):
        return f"; {extra[0]!r} is not a command (expected one of {', '.join(COMMANDS)})"
    for token in extra:
        name = token.split("=", 1)[0]
        homes = [c for c, p in commands.items() if c != command and name in p.options]
        if name.startswith("-") and homes:
            example = " ".join(extra[:2]) if extra[0] == token else token
            return (f"; {name} is an option of {' and '.join('bench ' + h for h in homes)} "
                    f"(e.g. reid-attention bench {homes[0]} {example})")
    return ""


# --- jobs ---------------------------------------------------------------------------------------


def _sites_of(kind: str, sites: Union[str, List[Site]]) -> List[Site]:
    if sites == "paper":
        return list(PAPER_SITES[_family(kind)])
    if sites == "first":
        return list(PAPER_SITES[_family(kind)][:1])
    if sites == "default":
        return [DEFAULT_SITES[_family(kind)]]
    return list(sites)


def _common(args: argparse.Namespace) -> Dict[str, Any]:
    autocast = None if args.dtype == "float32" else args.dtype
    return dict(device=args.device, channels_last=args.channels_last, threads=args.threads, autocast=autocast,
                step=args.step)


def _has_memory_modes(kind: str) -> bool:
    """Whether ``kind``'s layer takes ``memory`` (a tiny instance is built to ask)."""
    return isinstance(create_attention(kind, 8, feat_size=(4, 4) if needs_feat_size(kind) else None), MemorySwitch)


def _layer_cases(args: argparse.Namespace) -> List[Tuple[str, int, Tuple[int, int], str, Optional[str]]]:
    """(kind, channels, feat_size, impl, memory) of every ``layers`` row; memory is None where it
    does not apply (other kinds, the reference impl) or only the default mode was asked for."""
    cases = []
    for kind in args.kind:
        modes = args.memory if args.memory != ["default"] and _has_memory_modes(kind) else [None]
        for c, fs in _sites_of(kind, args.sites):
            for impl in args.impl:
                cases += [(kind, c, fs, impl, m) for m in (modes if impl == "fused" else [None])]
    return cases


def _layer_jobs(args: argparse.Namespace):
    jobs = []
    for kind, channels, feat_size, impl, memory in _layer_cases(args):
        extra = {} if memory is None else {"memory": memory}
        spec = layer_spec(kind, channels, feat_size, batch=args.batch, impl=impl, compile=args.compile,
                          **extra, **_common(args))
        label = f"{kind} {channels}:{feat_size[0]}x{feat_size[1]} {impl}" + (f" memory={memory}" if memory else "")
        jobs.append((label, lambda s=spec: measure_layer(
            s, memory_batch=args.memory_batch, forward=True, min_run_time=args.min_run_time)))
    return jobs


def _network_jobs(args: argparse.Namespace):
    jobs = []
    for attention in (None, args.attention):
        spec = network_spec(args.backbone, attention, args.input_size, batch=args.batch, impl=args.impl,
                            last_stride=args.last_stride or None, sites=args.sites, **_common(args))
        if attention and getattr(args, "memory", "default") != "default":
            spec["kwargs"]["memory"] = args.memory
        name = args.backbone + (f" + {attention}" if attention else "")
        jobs.append((name, lambda s=spec, n=name: measure(
            s, {"model": n}, memory_batch=args.memory_batch, min_run_time=args.min_run_time)))
    return jobs


def with_overhead(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Ratios of each model to the plain backbone (first record): ``time_x``, ``memory_x``,
    ``params_x``, ``gflops_x``, and ``time_per_flop_x`` = time_x / gflops_x (how far the time is
    from the FLOP floor: 1.0 = the extra time is exactly the extra forward FLOPs)."""
    base = records[0]
    for r in records:
        for key, col in (("step_ms", "time_x"), ("peak_mib", "memory_x"), ("params", "params_x"),
                         ("gflops", "gflops_x")):
            if r.get(key) is not None and base.get(key):
                r[col] = r[key] / base[key]
        if r.get("time_x") is not None and r.get("gflops_x"):
            r["time_per_flop_x"] = r["time_x"] / r["gflops_x"]
    return records


def _sweep_cases(args: argparse.Namespace):
    """(kind, input size, feat_size, impl) of every ``sweep`` row."""
    return [(kind, size, (size[0] // args.stride, size[1] // args.stride), impl)
            for kind in args.kind for size in args.resolutions for impl in args.impl]


def _sweep_jobs(args: argparse.Namespace):
    jobs = []
    for kind, size, feat_size, impl in _sweep_cases(args):
        spec = layer_spec(kind, args.channels, feat_size, batch=args.batch, impl=impl, **_common(args))
        label = f"{kind} {size[0]}x{size[1]} {impl}"

        def job(s=spec, size=size):
            record = measure_layer(s, memory_batch=args.memory_batch, min_run_time=args.min_run_time)
            return dict(record, input=f"{size[0]}x{size[1]}")

        jobs.append((label, job))
    return jobs


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


# --- checks before any measurement --------------------------------------------------------------


def check_extras(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Import the optional packages the command needs, so that a missing one ends in a
    ``parser.error`` before anything is measured: torchvision for the default run's network rows
    (``network`` checks it as it parses ``--backbone``), matplotlib for the sweep's plot."""
    needs = []
    if args.command == "default":
        needs.append(("torchvision", "reid-attention bench (its ResNet-50 rows)"))
    if args.command == "sweep" and (args.plot or args.out):
        needs.append(("matplotlib", "the plot of reid-attention bench sweep (--plot, or next to --out)"))
    for package, feature in needs:
        try:
            require(package, feature=feature, extra="bench")
        except MissingExtraError as err:
            parser.error(str(err))


def check_buildable(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Build every layer (or the network) of the command on the meta device, so that a site or
    backbone the attention cannot take ends in a ``parser.error`` before anything is measured
    (the default run's configuration is fixed and needs no check)."""
    try:
        with torch.device("meta"):
            if args.command == "layers":
                for kind, channels, feat_size, impl, _ in _layer_cases(args):
                    what = f"{kind} at site {channels}:{feat_size[0]}x{feat_size[1]}"
                    create_attention(kind, channels, feat_size=feat_size, impl=impl)
            elif args.command == "sweep":
                for kind, size, feat_size, impl in _sweep_cases(args):
                    what = (f"{kind} at site {args.channels}:{feat_size[0]}x{feat_size[1]} "
                            f"(input {size[0]}x{size[1]}, stride {args.stride})")
                    create_attention(kind, args.channels, feat_size=feat_size, impl=impl)
            elif args.command == "network":
                what = f"{args.backbone} + {args.attention}"
                network(args.backbone, args.attention, args.input_size, args.last_stride or None, impl=args.impl,
                        sites=args.sites)
    except (ValueError, TypeError, KeyError) as e:
        hint = " (--last-stride 0 leaves a non-ResNet backbone as it is)" if "set_last_stride" in str(e) else ""
        parser.error(f"cannot build {what}: {(str(e).splitlines() or [''])[0]}{hint}")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a parsed command; returns {"environment": ..., "records": [...], "tables": [...]}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_malloc(args.malloc)
    env = environment(args.device, args.threads, args.malloc)
    env.update(command=args.command, batch=args.batch, dtype=args.dtype, channels_last=args.channels_last,
               step=args.step, step_text=STEP_TEXT[args.step])
    if args.command == "layers":
        records = _run_jobs(_layer_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, LAYER_COLUMNS)]}
    if args.command == "network":
        records = with_overhead(_run_jobs(_network_jobs(args), args.quiet))
        return {"environment": env, "records": records, "tables": [(records, NETWORK_COLUMNS)]}
    if args.command == "sweep":
        records = _run_jobs(_sweep_jobs(args), args.quiet)
        return {"environment": env, "records": records, "tables": [(records, SWEEP_COLUMNS)]}
    # default: every kind at one paper site (DEFAULT_SITES), then the ResNet-50 + RGA-SC overhead
    ns = dict(vars(args), kind=list_attentions(), sites="default", impl=list(IMPLS), memory=["default"],
              compile=False)
    layer_records = _run_jobs(_layer_jobs(argparse.Namespace(**ns)), args.quiet)
    ns.update(backbone="resnet50", attention="rga_sc", impl="fused", input_size=(256, 128), last_stride=1,
              memory="default", memory_batch=0, sites=["layer1", "layer2", "layer3", "layer4"])
    net_records = with_overhead(_run_jobs(_network_jobs(argparse.Namespace(**ns)), args.quiet))
    return {"environment": env, "records": layer_records + net_records,
            "tables": [(layer_records, LAYER_COLUMNS), (net_records, NETWORK_COLUMNS)]}


# --- output -------------------------------------------------------------------------------------


def render(result: Dict[str, Any], fmt: str) -> str:
    """The text of a result in ``fmt`` (JSON: environment and records)."""
    if fmt == "json":
        return json.dumps({"environment": result["environment"], "records": result["records"]}, indent=2)
    parts = [format_flagged(rows, cols, fmt, headers=HEADERS) for rows, cols in result["tables"]]
    if fmt == "csv":
        return "\n".join(parts)
    env = result["environment"]
    head = (f"{env['date']} | {env['device_name']} | {env['threads']} threads | torch {env['torch']} | "
            f"dtype {env['dtype']} | step: {env['step_text']} | times: median of blocked runs; "
            f"FLOPs: 2 x multiply-adds, forward")
    return "\n\n".join([head, *parts])


def plot_sweep(records: Sequence[Dict[str, Any]], path: pathlib.Path, env: Dict[str, Any]) -> None:
    """Peak memory and step time vs input size, one line per kind and impl (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    inputs = list(dict.fromkeys(r["input"] for r in records))
    for key in dict.fromkeys((r["kind"], r["impl"]) for r in records):
        rows = [r for r in records if (r["kind"], r["impl"]) == key]
        xs = [inputs.index(r["input"]) for r in rows]
        style = "-o" if key[1] == "fused" else "--s"
        for ax, field in zip(axes, ("peak_mib", "step_ms")):
            pts = [(x, r[field]) for x, r in zip(xs, rows) if r.get(field) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{key[0]} {key[1]}")
            for x, r in zip(xs, rows):
                if r.get(field) is None and r.get("oom"):
                    ax.annotate("OOM", (x, ax.get_ylim()[1]), ha="center", va="top", color="C3")
    titles = ("peak training-step memory (MiB)", f"training step time (ms), {env.get('step', 'optimizer')} step")
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


def _write_files(args: argparse.Namespace, result: Dict[str, Any], text: str) -> None:
    """``--out`` and the sweep's ``--plot``: written before anything is printed."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.command == "sweep":
        path = args.plot or (args.out.with_suffix(".png") if args.out else None)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_sweep(result["records"], path, result["environment"])
            print(f"plot: {path}", file=sys.stderr)


def _print(text: str) -> None:
    """Print to stdout; a reader that leaves early (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # point stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def exit_status(records: Sequence[Dict[str, Any]]) -> int:
    """1 (naming them on stderr) if a row failed other than by running out of memory, else 0."""
    bad = [r for r in records if failed(r)]
    for r in bad:
        print(f"reid-attention bench: {row_name(r)} failed: {r['error']}", file=sys.stderr)
    if bad:
        print(f"reid-attention bench: {len(bad)} of {len(records)} rows failed", file=sys.stderr)
    return 1 if bad else 0


def main(argv: Optional[Iterable[str]] = None) -> int:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    parser = build_parser()
    args, extra = parser.parse_known_args(normalise_argv(sys.argv[1:] if argv is None else argv))
    command = parser.commands[args.command]
    if extra:
        hint = _misplaced(extra, args.command, parser.commands)
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    check_extras(args, command)
    check_buildable(args, command)
    result = run(args)
    text = render(result, args.format)
    _write_files(args, result, text)
    _print(text)
    return exit_status(result["records"])
