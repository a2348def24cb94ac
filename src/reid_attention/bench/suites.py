"""What one benchmark row measures: a registered attention layer at one site, one impl."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .dispatch import count_dispatch
from .measure import (
    build_from_spec,
    count_flops,
    count_params,
    forward_fn,
    is_out_of_memory,
    peak_memory,
    time_callable,
    train_step,
)

__all__ = ["layer_spec", "network_spec", "measure", "measure_layer", "network", "PAPER_SITES",
           "unreliable_reasons", "failed", "UNRELIABLE_IQR"]

# A timing whose inter-quartile range exceeds this fraction of its median is flagged unreliable.
UNRELIABLE_IQR = 0.2

# (channels, (H, W)) of each paper's insertion sites.
PAPER_SITES: dict[str, Sequence[tuple[int, tuple[int, int]]]] = {
    # RGA: ResNet-50, 256x128 input, last stride 1: after layer1..layer4
    "rga": [(256, (64, 32)), (512, (32, 16)), (1024, (16, 8)), (2048, (16, 8))],
    # PFSA: layer1..layer3 of a 384x128 ResNet-50
    "pfsa": [(256, (96, 32)), (512, (48, 16)), (1024, (24, 8))],
    # APNet: 384x192 input, last stride 1: stem, layer1..layer4
    "apnet": [(64, (96, 48)), (256, (96, 48)), (512, (48, 24)), (1024, (24, 12)), (2048, (24, 12))],
}


def layer_spec(
    kind: str,
    channels: int,
    feat_size: Sequence[int],
    *,
    batch: int,
    impl: str | None = "fused",
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    threads: int | None = None,
    compile: bool = False,
    autocast: str | None = None,
    step: str = "optimizer",
    factory: str = "reid_attention.registry:create_attention",
    **kwargs: Any,
) -> dict[str, Any]:
    """JSON-able description of a layer and its input (see ``measure.build_from_spec``);
    ``step`` names the timed training step (``measure.STEPS``)."""
    kw = dict(name=kind, channels=channels, feat_size=list(feat_size), **kwargs)
    if impl is not None:
        kw["impl"] = impl
    return dict(
        factory=factory,
        kwargs=kw,
        input=[batch, channels, *feat_size],
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        threads=threads or torch.get_num_threads(),
        compile=compile,
        autocast=autocast,
        step=step,
    )


def network(
    backbone: str,
    attention: str | None = None,
    input_size: Sequence[int] = (256, 128),
    last_stride: int | None = None,
    **attention_kw: Any,
) -> nn.Module:
    """A torchvision classification model, optionally with ``attention`` at its default sites."""
    import torchvision

    from ..insert import insert_attention, set_last_stride

    model: nn.Module = torchvision.models.get_model(backbone, weights=None)
    if last_stride is not None:
        set_last_stride(model, last_stride)
    if attention:
        insert_attention(model, attention, input_size=tuple(input_size), **attention_kw)
    return model


def network_spec(backbone: str, attention: str | None, input_size: Sequence[int], *, batch: int,
                 last_stride: int | None = 1, impl: str | None = "fused",
                 sites: Sequence[str] | None = None, **common: Any) -> dict[str, Any]:
    """Spec of :func:`network` on a batch of images (which, as in training, need no gradient)."""
    kw: dict[str, Any] = dict(backbone=backbone, attention=attention, input_size=list(input_size),
                              last_stride=last_stride)
    if attention and impl:
        kw["impl"] = impl
    if attention and sites:
        kw["sites"] = list(sites)
    spec = layer_spec("", 3, tuple(input_size), batch=batch, impl=None, **common)
    spec.update(factory="reid_attention.bench.suites:network", kwargs=kw, input_grad=False)
    return spec


def measure_layer(spec: dict[str, Any], **options: Any) -> dict[str, Any]:
    """:func:`measure` labelled with the layer's kind, impl, site (and memory mode, if set)."""
    kw = spec["kwargs"]
    label = {
        "kind": kw.get("name", spec["factory"].rsplit(":", 1)[-1]),
        "impl": kw.get("impl"),
        "site": f"{kw['channels']}:{spec['input'][2]}x{spec['input'][3]}",
    }
    if "memory" in kw:
        label["memory"] = kw["memory"]
    return measure(spec, label, dispatch=True, **options)


def unreliable_reasons(record: dict[str, Any]) -> list[str]:
    """Why a row's timing should not be trusted (empty: no reason seen).

    A timing of a single measured block has no spread to judge; an IQR above ``UNRELIABLE_IQR``
    of the median means the machine was busy or the clock unstable; a forward slower than the
    whole training step (which contains it) cannot be true of the code.
    """
    reasons = []
    for what, key in (("step", "step"), ("forward", "fwd")):
        median, iqr, runs = (record.get(f"{key}_{field}") for field in ("ms", "iqr_ms", "runs"))
        if median is None:
            continue
        if runs is not None and runs < 2:
            reasons.append(f"{what}: a single measured block")
        if iqr is not None and iqr > UNRELIABLE_IQR * median:
            reasons.append(f"{what}: IQR {iqr / median:.0%} of the median")
    fwd, step = record.get("fwd_ms"), record.get("step_ms")
    if fwd is not None and step is not None and fwd > step:
        reasons.append("forward slower than the whole step")
    return reasons


def failed(record: dict[str, Any]) -> bool:
    """Whether a row failed for a reason other than a recorded out-of-memory."""
    return bool(record.get("error")) and not record.get("oom")


def _add_error(record: dict[str, Any], message: str, oom: bool) -> None:
    """Append ``message`` to the row's error; ``oom`` stays true only while every failure is one."""
    record["error"] = "; ".join(filter(None, [record.get("error"), message]))
    record["oom"] = record.get("oom", True) and oom


def _timed(fn: Callable[[], Any], *, min_run_time: float, threads: int | None, prefix: str) -> dict[str, Any]:
    timing = time_callable(fn, min_run_time=min_run_time, threads=threads)
    return {f"{prefix}_ms": timing.median * 1e3, f"{prefix}_iqr_ms": timing.iqr * 1e3,
            f"{prefix}_runs": timing.runs}


def measure(
    spec: dict[str, Any],
    label: dict[str, Any],
    *,
    memory_batch: int | None = None,
    forward: bool = False,
    min_run_time: float = 1.0,
    dispatch: bool = False,
) -> dict[str, Any]:
    """Time one training step (``spec["step"]``; optionally the forward alone), FLOPs,
    parameters, peak memory of the same step; with ``dispatch`` (eager modules only) the kernels
    the step launches and the bytes they move (:func:`.dispatch.count_dispatch`).

    The memory probe runs first, at ``memory_batch`` (default: the timed batch; 0 skips it), in
    a capped subprocess; if it runs out of memory at or below the timed batch, timing is skipped.
    ``None`` results and an ``error`` field record what could not be measured; ``oom`` is true
    when every failure of the row was out of memory (see :func:`failed`). ``unreliable`` lists
    :func:`unreliable_reasons` of a timed row.
    """
    batch = spec["input"][0]
    record: dict[str, Any] = dict(label, batch=batch, dtype=spec.get("dtype", "float32"))
    record.update(compiled=bool(spec.get("compile")), autocast=spec.get("autocast"),
                  step=spec.get("step", "optimizer"))
    if memory_batch != 0:  # first, in a capped subprocess: an oversized run is skipped below
        mem_spec = dict(spec, input=[memory_batch or batch, *spec["input"][1:]])
        mem = peak_memory(mem_spec)
        record["memory_batch"] = mem_spec["input"][0]
        record["peak_mib"] = mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None
        if "error" in mem:
            oom = is_out_of_memory(mem["error"])
            _add_error(record, "memory: " + mem["error"], oom)
            if oom and record["memory_batch"] <= batch:
                return record
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(threads)
    autocast = spec.get("autocast")
    try:
        module, x = build_from_spec(spec)
        record["params"] = count_params(module)
        # FLOPs of the eager module: the same maths, without tracing a compiled one again
        record["gflops"] = count_flops(getattr(module, "_orig_mod", module), x) / 1e9
        step = train_step(module, x, autocast, step=record["step"])
        record.update(_timed(step, min_run_time=min_run_time, threads=threads, prefix="step"))
        record["samples_per_s"] = batch / (record["step_ms"] / 1e3)
        if dispatch and not spec.get("compile"):
            record.update(count_dispatch(step))
        if forward:
            with torch.no_grad():
                fwd = forward_fn(module, x, autocast)
                record.update(_timed(fwd, min_run_time=min_run_time, threads=threads, prefix="fwd"))
        record["unreliable"] = unreliable_reasons(record)
        del module, x
    except Exception as e:  # recorded, so that the other rows still run; failed() tells the caller
        if spec.get("device", "cpu").startswith("cuda"):
            torch.cuda.empty_cache()
        _add_error(record, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                   is_out_of_memory(e))
    return record
