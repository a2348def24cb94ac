"""What ``bench network`` compares: a backbone with attention against the plain backbone, timed
alternately (:mod:`.paired`), in training (a full optimisation step) and in inference (eval-mode
forward in PyTorch and in ONNX Runtime, outputs checked against PyTorch's).

The ratios' floor is the forward-FLOP ratio ``gflops_x``: attention that cost exactly its
arithmetic would give ``time_x == gflops_x`` (``time_per_flop_x`` = 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require
from .measure import build_from_spec, count_flops, train_step
from .paired import PairedRatio, paired_ratio

__all__ = ["DEFAULT_EVAL_BATCHES", "RUNTIMES", "available_runtimes", "eval_rows", "onnx_session",
           "paired_step"]

RUNTIMES = ("torch", "onnxruntime")
DEFAULT_EVAL_BATCHES = (1, 64)  # per-query latency, gallery throughput
Forward = Callable[[Tensor], Any]


def available_runtimes() -> list[str]:
    """The runtimes this environment has: torch, and onnxruntime with its exporter (onnxscript)."""
    import importlib.util

    have_ort = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))
    return ["torch", "onnxruntime"] if have_ort else ["torch"]


def paired_step(base_spec: dict[str, Any], spec: dict[str, Any], **options: Any) -> PairedRatio:
    """The training step of ``spec``'s model against ``base_spec``'s, alternately (in one process,
    both models built): ``paired_ratio(base, other, **options)``."""
    steps = []
    for s in (base_spec, spec):
        module, x = build_from_spec(s)
        steps.append(train_step(module, x, s.get("autocast"), step=s.get("step", "optimizer")))
    return paired_ratio(steps[0], steps[1], device=spec.get("device", "cpu"), **options)


def _torch_forward(module: nn.Module) -> Forward:
    def forward(x: Tensor) -> Any:
        with torch.no_grad():
            return module(x)

    return forward


def onnx_session(module: nn.Module, example: Tensor, threads: int | None, **options: Any) -> Any:
    """An ONNX Runtime (CPU) session of ``module`` exported with a dynamic batch (torch.export,
    dynamo ONNX exporter); ``options``: ``ort.SessionOptions`` attributes (e.g. enable_profiling)."""
    ort = require("onnxruntime", feature="bench network --mode eval (onnxruntime)", extra="bench")
    require("onnxscript", feature="bench network --mode eval (onnxruntime)", extra="bench")
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    assert onnx_program is not None  # the dynamo exporter returns the program
    session_options = ort.SessionOptions()
    if threads:
        session_options.intra_op_num_threads, session_options.inter_op_num_threads = threads, 1
    # Two sessions are timed in turn: an idle one's spinning threads would steal the cores of the
    # one being timed (its default spin-wait), so its threads sleep when idle.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for name, value in options.items():
        setattr(session_options, name, value)
    return ort.InferenceSession(onnx_program.model_proto.SerializeToString(), session_options,
                                providers=["CPUExecutionProvider"])


def _onnx_forward(module: nn.Module, example: Tensor, threads: int | None) -> Forward:
    session = onnx_session(module, example, threads)
    name = session.get_inputs()[0].name

    def forward(x: Tensor) -> Any:
        return session.run(None, {name: x.numpy()})[0]

    return forward


def _bound(forward: Forward, x: Tensor) -> Callable[[], Any]:
    return lambda: forward(x)


def _relative_difference(got: Any, want: Tensor) -> float:
    """max |got - want| / max |want| (ONNX Runtime's output against PyTorch's)."""
    got_t = torch.as_tensor(got, dtype=want.dtype)
    return float((got_t - want).abs().max() / want.abs().max().clamp_min(1e-30))


def eval_rows(
    specs: Sequence[dict[str, Any]],
    names: Sequence[str],
    *,
    batches: Sequence[int],
    runtimes: Sequence[str] = RUNTIMES,
    threads: int | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Eval-mode forward rows of ``specs`` (the plain model first) for each runtime and batch:
    per-call time, the paired ratio to the plain model (``time_x``), the forward-FLOP ratio, and
    for ONNX Runtime the largest output difference to PyTorch's relative to the output's size."""
    modules = []
    for spec in specs:
        module, x = build_from_spec(dict(spec, train=False, input_grad=False))
        modules.append(module.eval())
    image = x.shape[1:]
    flops = {b: [count_flops(m, torch.randn(b, *image, device=x.device)) for m in modules] for b in batches}
    rows: list[dict[str, Any]] = []
    for runtime in runtimes:
        if runtime == "torch":
            forwards = [_torch_forward(m) for m in modules]
        else:
            forwards = [_onnx_forward(m, torch.randn(2, *image), threads) for m in modules]
        for batch in batches:
            x = torch.randn(batch, *image, device=x.device)
            parity = [_relative_difference(f(x), _torch_forward(m)(x)) if runtime != "torch" else None
                      for f, m in zip(forwards, modules)]
            base_row: dict[str, Any] = dict(model=names[0], runtime=runtime, batch=batch,
                                            gflops=flops[batch][0] / 1e9, parity=parity[0], time_x=1.0)
            rows.append(base_row)
            for i in range(1, len(modules)):
                pair = paired_ratio(_bound(forwards[0], x), _bound(forwards[i], x),
                                    device=specs[i].get("device", "cpu"), **options)
                row: dict[str, Any] = dict(model=names[i], runtime=runtime, batch=batch,
                                           fwd_ms=pair.other_ms, gflops=flops[batch][i] / 1e9,
                                           parity=parity[i], gflops_x=flops[batch][i] / flops[batch][0],
                                           **pair.fields("time_x"))
                base_row.setdefault("fwd_ms", pair.base_ms)
                if pair.ratio is not None:
                    row["time_per_flop_x"] = pair.ratio / row["gflops_x"]
                row["unreliable"] = [pair.reason] if pair.reason else []
                rows.append(row)
    return rows
