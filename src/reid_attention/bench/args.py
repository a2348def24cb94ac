"""The arguments of ``reid-attention bench``: their types, the parser (:func:`build_parser`,
:func:`normalise_argv`) and the checks that end bad arguments in one ``error:`` line with exit
status 2 before any row runs: an unwritable path (as it parses), a missing optional package
(:func:`check_extras`) and a layer or network that cannot be built (:func:`check_buildable`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .. import __version__
from .._cli import OneLineParser, parse_size
from .._extras import MissingExtraError, require
from .._switches import IMPLS, MEMORY_MODES
from ..registry import create_attention, list_attentions
from .argtypes import (
    backbone,
    device,
    layer_sites,
    non_negative_int,
    one_of,
    parse_sites,
    positive_float,
    positive_int,
    positive_ints,
    sizes,
    spread,
    writable,
)
from .jobs import layer_cases, sweep_cases
from .measure import MALLOC_MODES, STEPS
from .network import DEFAULT_EVAL_BATCHES, RUNTIMES
from .paired import MAX_ROUNDS, MAX_SPREAD
from .report import FORMATS
from .suites import network

__all__ = ["DESCRIPTION", "COMMANDS", "parse_sites", "help_text", "BenchParser", "build_parser",
           "normalise_argv", "misplaced_hint", "check_extras", "check_buildable"]

DESCRIPTION = """\
What attention layers cost: one training step's time, forward FLOPs, parameters, peak memory.

  reid-attention bench            the default run (CPU-sized, what `make bench` runs): every
                                  kind at one paper site, reference vs fused, then
                                  ResNet-50 + RGA-SC at layer1..4 vs plain ResNet-50, in
                                  training and in inference (torch, ONNX Runtime)
  reid-attention bench layers     attention kinds at their papers' sites (with the kernels a
                                  step launches and the bytes they move)
  reid-attention bench network    a backbone with attention inserted vs the plain backbone
                                  (--mode train or eval)
  reid-attention bench sweep      cost as the input resolution grows, with a plot

The timed step (--step): 'optimizer' (default) = forward, a loss, backward, an SGD step with
momentum and zero_grad(set_to_none=True), as training runs; 'accumulate' = forward().backward()
with gradients accumulating into existing buffers. Peak memory is measured on the same step.
Units: time in ms (median of blocked runs, and its IQR); FLOPs = 2 x multiply-adds of the
forward, GFLOP at the timed batch; memory = peak MiB of one step above the set-up (CPU:
high-water mark of a fresh, memory-capped subprocess; CUDA: max_memory_allocated).
A network's time x is the median of per-round ratios, the two models timed alternately; a
ratio whose spread stays above --max-spread is not printed (the row is marked unreliable).
A '!' marks a row whose timing is unreliable (the reasons follow the table).
Exit status: 0, 1 if a row failed other than by running out of memory, 2 for bad arguments.
See 'reid-attention bench COMMAND --help' for a command's options."""

COMMANDS = ("layers", "network", "sweep", "default")


# --- the parser and the checks before any work ----------------------------------------------


def help_text(action: argparse.Action) -> str:
    """An option's help as ``--help`` shows it: with its default appended (a flag's: off)."""
    text = action.help or ""
    if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
        return text
    if action.nargs == 0:  # a flag
        return f"{text} (default: off)"
    return f"{text} (default: %(default)s)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return help_text(action)


class BenchParser(OneLineParser):
    """A parser of ``reid-attention bench`` or one of its commands (errors: one line), which
    remembers its arguments and option names (for the hint of :func:`misplaced_hint`);
    ``commands`` maps each command to its parser (on the top-level parser)."""

    def __init__(self, **kwargs: Any) -> None:
        self.arguments: list[argparse.Action] = []
        self.options: list[str] = []
        self.commands: dict[str, BenchParser] = {}
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.arguments.append(action)
        self.options += action.option_strings
        return action


def _add_common(p: argparse.ArgumentParser, batch: int, memory_batch: int | None) -> None:
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16 / float16")
    p.add_argument("--batch", type=positive_int, default=batch, help="timed batch size")
    memory_default = "the timed batch" if memory_batch is None else str(memory_batch)
    p.add_argument("--memory-batch", type=non_negative_int, default=memory_batch,
                   help=f"batch of the peak-memory probe; 0 skips it (default: {memory_default})")
    p.add_argument("--step", default="optimizer", choices=STEPS,
                   help="the timed training step: 'optimizer' (loss, backward, SGD momentum step, "
                        "zero_grad(set_to_none=True)) or 'accumulate' (forward().backward(), gradients "
                        "accumulating)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: torch's thread count)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--malloc", default="system", choices=MALLOC_MODES,
                   help="CPU allocation while timing: glibc's defaults (system), or retain freed memory for "
                        "reuse like a caching allocator (retain; Linux/glibc)")
    p.add_argument("--repeat", dest="min_run_time", metavar="SECONDS", type=positive_float, default=0.5,
                   help="seconds of timed runs per row (torch.utils.benchmark blocked autorange)")
    p.add_argument("--format", default="table", choices=FORMATS, help="output format")
    p.add_argument("--out", type=writable, default=None,
                   help="also write the output to this file, in --format (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> BenchParser:
    """The ``reid-attention bench`` parser; ``parser.commands`` maps each command to its parser."""
    parser = BenchParser(prog="reid-attention bench", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"reid-attention {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", parser_class=BenchParser)
    kinds = one_of(list_attentions(), "attention kind", many=True, all_word=True)
    impls = one_of(IMPLS, "impl", many=True)

    layers = sub.add_parser("layers", help="attention kinds at their papers' sites, reference vs fused",
                            description="Every attention kind at its papers' sites, reference vs fused.")
    layers.add_argument("--kind", type=kinds, default="all",
                        help=f"comma-separated kinds ({', '.join(list_attentions())}) or 'all'")
    layers.add_argument("--sites", type=layer_sites, default="paper",
                        help="'paper' (every paper site), 'first' (the first), 'default' (the default run's) "
                             "or explicit sites C:HxW,... (e.g. 256:64x32)")
    layers.add_argument("--impl", type=impls, default=",".join(IMPLS), help="comma-separated impls")
    layers.add_argument("--memory", type=one_of(MEMORY_MODES, "memory mode", many=True), default="auto",
                        help="comma-separated memory modes of the fused RGA / APNet-S rows (auto, full, "
                             "lean); "
                             "other rows run once")
    layers.add_argument("--compile", action="store_true", help="torch.compile the layer first")
    _add_common(layers, batch=8, memory_batch=None)

    net = sub.add_parser("network", help="a backbone with attention inserted vs the plain backbone",
                         description="A torchvision backbone with attention inserted vs the plain backbone: "
                                     "time_x, memory_x, gflops_x and time_per_flop_x (= time_x / gflops_x, "
                                     "1.0 = time grows exactly with the FLOPs).")
    net.add_argument("--backbone", type=backbone, default="resnet50",
                     help="a torchvision classification model")
    net.add_argument("--attention", type=one_of(list_attentions(), "attention kind"), default="rga_sc",
                     help=f"one of {', '.join(list_attentions())}")
    net.add_argument("--impl", type=one_of(IMPLS, "impl"), default="fused", help="the attention's impl")
    net.add_argument("--memory", type=one_of(MEMORY_MODES, "memory mode"), default="auto",
                     help="RGA / APNet-S memory mode: 'lean' recomputes the relation embedding in backward, "
                          "'full' keeps it, 'auto' chooses per call from its size")
    net.add_argument("--input-size", type=parse_size, default="256x128", help="input HxW")
    net.add_argument("--last-stride", type=int, choices=(0, 1, 2), default=1,
                     help="ResNet last stride; 0 leaves the backbone as it is (needed for non-ResNets)")
    net.add_argument("--sites", type=lambda s: s.split(","), default=None,
                     help="comma-separated module names (default: the stage ends; with last stride 1 a "
                          "ResNet's layer3 and layer4 share stride 16, so pass layer1,layer2,layer3,layer4 "
                          "for RGA's sites)")
    net.add_argument("--mode", default="train", choices=("train", "eval"),
                     help="train: a training step (timed alone, then both alternately for time_x); eval: "
                          "eval-mode forward at --eval-batches in each of --runtimes")
    net.add_argument("--eval-batches", type=positive_ints, default=",".join(map(str, DEFAULT_EVAL_BATCHES)),
                     help="comma-separated batches of --mode eval (default 1 (latency), 64 (throughput))")
    net.add_argument("--runtimes", type=one_of(RUNTIMES, "runtime", many=True), default=",".join(RUNTIMES),
                     help="comma-separated runtimes of --mode eval: torch, onnxruntime (exported, outputs "
                          "checked against torch's)")
    net.add_argument("--max-spread", type=spread, default=MAX_SPREAD,
                     help="largest spread (IQR / median) of the per-round ratios to report time_x")
    net.add_argument("--max-rounds", type=positive_int, default=MAX_ROUNDS,
                     help="alternating rounds at most before a ratio is reported unreliable")
    _add_common(net, batch=8, memory_batch=32)

    sweep = sub.add_parser("sweep",
                           help="cost as the input resolution grows, reference vs fused, with a plot",
                           description="Cost of a layer at one site as the input resolution grows.")
    sweep.add_argument("--kind", type=kinds, default="rga_s", help="comma-separated kinds or 'all'")
    sweep.add_argument("--channels", type=positive_int, default=256,
                       help="site channels (256: ResNet layer1)")
    sweep.add_argument("--stride", type=positive_int, default=4, help="site output stride (4: layer1)")
    sweep.add_argument("--resolutions", type=sizes, default="128x64,256x128,384x192,512x256",
                       help="comma-separated input sizes HxW")
    sweep.add_argument("--impl", type=impls, default=",".join(IMPLS), help="comma-separated impls")
    sweep.add_argument("--plot", type=writable, default=None,
                       help="PNG path (default: next to --out, with .png; none without --out)")
    _add_common(sweep, batch=16, memory_batch=None)

    default = sub.add_parser("default", help="the default run (also: no command)",
                             description="The default run: every kind at one paper site (reference vs "
                                         "fused), then ResNet-50 + RGA-SC at layer1..4 vs plain ResNet-50.")
    _add_common(default, batch=8, memory_batch=None)
    parser.commands = dict(sub.choices)
    return parser


def normalise_argv(argv: Iterable[str]) -> list[str]:
    """Options without a command run the default configuration (``bench --threads 2``)."""
    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "default")
    return argv


def misplaced_hint(extra: Sequence[str], command: str, commands: dict[str, BenchParser]) -> str:
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
                for kind, channels, feat_size, impl, _ in layer_cases(args):
                    what = f"{kind} at site {channels}:{feat_size[0]}x{feat_size[1]}"
                    create_attention(kind, channels, feat_size=feat_size, impl=impl)
            elif args.command == "sweep":
                for kind, size, feat_size, impl in sweep_cases(args):
                    what = (f"{kind} at site {args.channels}:{feat_size[0]}x{feat_size[1]} "
                            f"(input {size[0]}x{size[1]}, stride {args.stride})")
                    create_attention(kind, args.channels, feat_size=feat_size, impl=impl)
            elif args.command == "network":
                what = f"{args.backbone} + {args.attention}"
                network(args.backbone, args.attention, args.input_size, args.last_stride or None,
                        impl=args.impl, sites=args.sites)
    except (ValueError, TypeError, KeyError) as e:
        stride = "set_last_stride" in str(e)
        hint = " (--last-stride 0 leaves a non-ResNet backbone as it is)" if stride else ""
        parser.error(f"cannot build {what}: {(str(e).splitlines() or [''])[0]}{hint}")
