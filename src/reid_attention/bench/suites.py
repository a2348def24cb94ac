"""What one benchmark row measures: a registered attention layer at one site, one impl."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .measure import build_from_spec, count_flops, count_params, peak_memory, time_callable, train_step

__all__ = ["layer_spec", "measure_layer", "PAPER_SITES"]

# (channels, (H, W)) of each paper's insertion sites.
PAPER_SITES: Dict[str, Sequence[Tuple[int, Tuple[int, int]]]] = {
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
    feat_size: Tuple[int, int],
    *,
    batch: int,
    impl: Optional[str] = "fused",
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    threads: Optional[int] = None,
    factory: str = "reid_attention.registry:create_attention",
    **kwargs: Any,
) -> Dict[str, Any]:
    """JSON-able description of a layer and its input (see ``measure.build_from_spec``)."""
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
    )


def measure_layer(
    spec: Dict[str, Any],
    *,
    memory_batch: Optional[int] = None,
    forward: bool = False,
    min_run_time: float = 1.0,
) -> Dict[str, Any]:
    """Time (forward + backward, optionally forward alone), FLOPs, parameters, peak memory.

    The memory probe runs the spec at ``memory_batch`` (default: the timed batch); ``None``
    results and an ``error`` field record what could not be measured (e.g. out of memory).
    """
    kw = spec["kwargs"]
    batch = spec["input"][0]
    record: Dict[str, Any] = {
        "kind": kw.get("name", spec["factory"].rsplit(":", 1)[-1]),
        "impl": kw.get("impl"),
        "site": f"{kw['channels']}:{spec['input'][2]}x{spec['input'][3]}",
        "batch": batch,
        "dtype": spec.get("dtype", "float32"),
    }
    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(threads)
    try:
        module, x = build_from_spec(spec)
        record["params"] = count_params(module)
        record["gflops"] = count_flops(module, x) / 1e9
        timing = time_callable(train_step(module, x), min_run_time=min_run_time, threads=threads)
        record.update(
            fwd_bwd_ms=timing.median * 1e3,
            fwd_bwd_iqr_ms=timing.iqr * 1e3,
            samples_per_s=batch / timing.median,
        )
        if forward:
            with torch.no_grad():
                timing = time_callable(lambda: module(x), min_run_time=min_run_time, threads=threads)
            record.update(fwd_ms=timing.median * 1e3, fwd_iqr_ms=timing.iqr * 1e3)
        del module, x
    except (RuntimeError, MemoryError) as e:  # out of memory and friends: record, continue
        if spec.get("device", "cpu").startswith("cuda"):
            torch.cuda.empty_cache()
        record["error"] = str(e).splitlines()[0][:200]
    if memory_batch != 0:
        mem_spec = dict(spec, input=[memory_batch or batch, *spec["input"][1:]])
        mem = peak_memory(mem_spec)
        record["memory_batch"] = mem_spec["input"][0]
        record["peak_mib"] = mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None
        if "error" in mem:
            record["error"] = "; ".join(filter(None, [record.get("error"), "memory: " + mem["error"]]))
    return record
