"""Measurement primitives: time, FLOPs, parameters and peak training-step memory.

Units: time in seconds (median and inter-quartile range of ``torch.utils.benchmark`` blocked
runs, CUDA synchronised by the Timer); FLOPs = 2 x multiply-adds as counted by
``torch.utils.flop_counter`` (forward only); memory in bytes.

The timed step (:func:`train_step`) is, by default, what users run: forward, a loss, backward,
an SGD-with-momentum step and ``zero_grad(set_to_none=True)`` (``step="optimizer"``);
``step="accumulate"`` is the bare ``forward().backward(grad)`` with gradients accumulating into
existing buffers (no loss, no optimiser, no freeing).

Peak memory of one such step:
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
* CPU: the resident-set high-water mark (VmHWM) of a fresh subprocess, reset through
  ``/proc/self/clear_refs`` after the module and input are built and one warm-up step ran (so the
  optimiser's momentum buffers exist), minus the resident set at that point. glibc is told to
  serve large blocks by mmap with a fixed threshold, so freed memory goes back to the OS and the
  mark is not hidden by malloc caching.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Timing",
    "time_callable",
    "STEPS",
    "train_step",
    "is_out_of_memory",
    "count_flops",
    "count_params",
    "forward_fn",
    "peak_memory",
    "build_from_spec",
    "MALLOC_MODES",
    "set_malloc",
]

MALLOC_MODES = ("system", "retain")
STEPS = ("optimizer", "accumulate")
# Substrings of the errors PyTorch's allocators (CUDA, CPU) and glibc raise when memory runs out.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


@dataclass
class Timing:
    median: float
    iqr: float
    runs: int


def time_callable(fn: Callable[[], Any], *, min_run_time: float = 1.0, threads: int | None = None) -> Timing:
    """Median and IQR of ``fn()`` over blocked runs of at least ``min_run_time`` seconds in all."""
    from torch.utils import benchmark

    fn()  # warm-up (lazy initialisation, oneDNN/cuBLAS plans)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median=m.median, iqr=m.iqr, runs=len(m.times))


def set_malloc(mode: str) -> None:
    """Choose how this process's CPU tensors are allocated while timing (process-wide).

    ``"system"`` leaves glibc's defaults. ``"retain"`` tells glibc (Linux only) never to serve a
    block by its own mmap and never to hand freed heap memory back to the OS, so freed tensors'
    pages are (mostly: an aligned block can miss a hole by its slack) reused by the next ones,
    as PyTorch's CUDA caching allocator (and, roughly, jemalloc or tcmalloc on the CPU) does. By
    default glibc maps every block above its dynamic threshold (at most 32 MiB) afresh and
    unmaps it when freed, so each such tensor pays one page fault per 4 KiB page on first touch:
    on the project's CPU machine a 200 MB ``clone`` takes ~60 ms that way and ~9 ms with
    retained memory. That cost depends on tensor sizes relative to the threshold, not on the
    algorithm: a loop over halves of a map can stay under it while the batched whole-map path
    goes over. Peak-memory probes run in their own subprocess and are not affected.
    """
    if mode not in MALLOC_MODES:
        raise ValueError(f"malloc must be one of {MALLOC_MODES}, got {mode!r}")
    if mode == "system":
        return
    import ctypes

    m_trim_threshold, m_mmap_max = -1, -4  # glibc <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise RuntimeError("malloc='retain' needs glibc's mallopt (Linux); use malloc='system'")


def _autocast(x: Tensor, dtype: str | None) -> torch.autocast:
    enabled = dtype is not None
    return torch.autocast(x.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=enabled)


def forward_fn(module: nn.Module, x: Tensor, autocast: str | None = None) -> Callable[[], Tensor]:
    """A closure running the forward pass (under autocast to ``autocast`` if given)."""

    def forward() -> Tensor:
        with _autocast(x, autocast):
            out: Tensor = module(x)
            return out

    return forward


def _loss_fn(example: Tensor) -> Callable[[Tensor], Tensor]:
    """A float32 loss for outputs shaped like ``example``, against fixed random targets.

    (B, K) outputs are a classifier's logits: cross-entropy on random labels (re-ID's identity
    loss). Any other output (a layer's map) gets the mean squared error to a random tensor.
    """
    g = torch.Generator().manual_seed(0)
    if example.dim() == 2:
        labels = torch.randint(example.shape[1], (example.shape[0],), generator=g).to(example.device)
        return lambda out: F.cross_entropy(out.float(), labels)
    target = torch.randn(example.shape, generator=g).to(example.device)
    return lambda out: F.mse_loss(out.float(), target)


def train_step(
    module: nn.Module, x: Tensor, autocast: str | None = None, *, step: str = "optimizer"
) -> Callable[[], None]:
    """A closure running one training step of ``module`` on ``x`` (see ``STEPS``).

    ``"optimizer"``: forward (under autocast if given), the loss of :func:`_loss_fn` in float32,
    backward, ``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4) and
    ``zero_grad(set_to_none=True)``; the input's gradient is dropped too, as the layer below
    would consume it. The learning rate is tiny (1e-4) so that the weights, and with them the
    arithmetic, stay those of the first step however many steps are timed.
    ``"accumulate"``: ``forward().backward(grad)`` with a fixed upstream gradient of ones,
    accumulating into the existing gradient buffers.
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    forward = forward_fn(module, x, autocast)
    with torch.no_grad():
        example = forward()
    if step == "accumulate":
        grad = torch.ones_like(example)

        def accumulate() -> None:
            forward().backward(grad)

        return accumulate
    loss_fn = _loss_fn(example)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4) if params else None

    def optimizer_step() -> None:
        loss_fn(forward()).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return optimizer_step


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether an exception (or its message) says that memory ran out."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def count_flops(module: nn.Module, x: Tensor) -> int:
    """Forward FLOPs (2 x multiply-adds) of ``module(x)``."""
    from torch.utils.flop_counter import FlopCounterMode

    # a detached input: under no_grad a view of an input that requires grad still claims to, and
    # the counter's module tracker refuses such a tensor (it has no gradient function)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x.detach())
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _import_factory(path: str) -> Callable[..., nn.Module]:
    """``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = path.partition(":")
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
        assert spec is not None and spec.loader is not None  # a .py path always has a source loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    factory: Callable[..., nn.Module] = getattr(module, name)
    return factory


def build_from_spec(spec: dict[str, Any]) -> tuple[nn.Module, Tensor]:
    """(module, input) described by a JSON-able spec.

    spec keys: factory ("module:function"), kwargs (dict), input (shape list), device, dtype
    ("float32", ...), channels_last (bool), train (bool), compile (bool), input_grad (bool,
    default true); ``autocast`` (a dtype name or None) and ``step`` (see ``STEPS``) are read by
    the callers that run the module.
    """
    device = torch.device(spec.get("device", "cpu"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    module = _import_factory(spec["factory"])(**spec.get("kwargs", {}))
    memory_format = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    # Module.to takes memory_format at run time; its typed overloads lack it beside device and dtype
    module = module.to(device=device, dtype=dtype, memory_format=memory_format)  # type: ignore[call-overload]
    module.train(spec.get("train", True))
    if spec.get("compile"):
        module = cast(nn.Module, torch.compile(module))  # an OptimizedModule
    x = torch.randn(spec["input"], device=device, dtype=dtype).to(memory_format=memory_format)
    return module, x.requires_grad_(spec.get("input_grad", True))


def _proc_kib(path: str, field: str) -> int:
    """A 'Field: N kB' line of a /proc file."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in {path}")


def _vm_kib(field: str) -> int:
    return _proc_kib("/proc/self/status", field)


def _probe_cpu(spec: dict[str, Any]) -> dict[str, int]:
    """Run inside the fresh subprocess: peak bytes of one ``spec["step"]`` above the set-up.

    The address space is capped at ``memory_limit`` bytes above the start (default: the
    available memory), so an oversized run fails with an allocation error instead of
    driving the machine into swap or the OOM killer.
    """
    import resource

    # Building the first optimiser imports a large part of torch (torch._dynamo: ~250 MiB of
    # address space), which belongs to neither the cap nor the measurement: do it first.
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-4, momentum=0.9)
    limit = spec.get("memory_limit") or _available_bytes()
    cap = _vm_kib("VmSize") * 1024 + limit
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    module, x = build_from_spec(spec)
    step = train_step(module, x, spec.get("autocast"), step=spec.get("step", "optimizer"))
    step()  # warm-up (creates the optimiser state), then drop what it left behind
    module.zero_grad(set_to_none=True)
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = _vm_kib("VmHWM")  # that resident set (read after the reset: the peak cannot fall below it)
    step()
    peak = _vm_kib("VmHWM")
    # the kernel's resident-set counters lag by a few pages, so a step that allocates next to
    # nothing can read a little below its start
    return {"peak_bytes": max(0, peak - base) * 1024, "rss_bytes": peak * 1024}


def _available_bytes() -> int:
    return _proc_kib("/proc/meminfo", "MemAvailable") * 1024


def _probe_cuda(spec: dict[str, Any]) -> dict[str, int]:
    module, x = build_from_spec(spec)
    step = train_step(module, x, spec.get("autocast"), step=spec.get("step", "optimizer"))
    step()
    module.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak - base, "rss_bytes": peak}


def peak_memory(spec: dict[str, Any], *, timeout: float = 600.0) -> dict[str, Any]:
    """Peak memory of one training step for ``spec`` (see :func:`build_from_spec`).

    Returns {"peak_bytes", "rss_bytes"} or {"error": "..."} (out of memory and other failures
    are reported, not raised, so a benchmark run can continue; an error starting with "out of
    memory" is exactly that, see :func:`is_out_of_memory`).
    """
    if spec.get("device", "cpu").startswith("cuda"):
        try:
            return _probe_cuda(spec)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "reid_attention.bench.measure", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["killed"])[-1]
        if is_out_of_memory(tail) or done.returncode == -9:
            return {"error": "out of memory"}
        return {"error": f"exit {done.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":  # the fresh subprocess of peak_memory()
    print(json.dumps(_probe_cpu(json.loads(sys.argv[1]))))
