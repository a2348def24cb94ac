"""Deployment contract for every registered kind and both paths.

* torch.compile(fullgraph=True), eval and training mode: outputs, input and parameter gradients
  and running statistics equal eager (float64). Every kind x path x mode compiles with the
  ``aot_eager`` backend (dynamo's full-graph capture and AOT autograd, the parts our code can
  break); CPU inductor, which spends 5-60 s per case compiling C++ on 2 shared cores, runs on
  the fused path of the kinds with distinct graphs (``slow`` marker: ``pytest -m "not slow"``
  skips them).
* torch.export with a dynamic batch: the program equals eager at batch sizes other than the
  traced one, batch 1 included.
* ONNX (dynamo exporter) with a dynamic batch, run by onnxruntime at batch 1 and 5.
* Mixed precision: autocast bf16 and fp16 on CPU (and on CUDA when present): finite outputs and
  gradients, error vs float32 within MIXED_TOL, for unit-scale and hundreds-scale activations;
  finite forward with raw statistics (float16 overflows there unless the relation math is the
  float32 island it is meant to be; bfloat16 has float32's range and cannot tell).

The modules come from helpers.build: BatchNorm statistics calibrated on data, so eval-mode gates
vary (checked with assert_gates_vary) and a wrong relation graph cannot hide behind a constant
gate.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import (
    KINDS,
    assert_gates_vary,
    assert_same_step,
    build,
    calibrate_bn,
    kind_impl_params,
    make_input,
    run_step,
)
from torch.export import Dim

BATCH = Dim("batch", min=1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- torch.compile -------------------------------------------------------------------------


def _check_compiled(kind: str, impl: str, train: bool, backend: str) -> None:
    eager = build(kind, impl).train(train)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend=backend)  # in place: parameter names unchanged
    x = make_input(3)
    assert_gates_vary(kind, copy.deepcopy(eager), x)  # a constant gate would hide a wrong relation graph
    assert_same_step(run_step(compiled, x), run_step(eager, x))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_compile_fullgraph_aot_eager(kind, impl, train):
    _check_compiled(kind, impl, train, "aot_eager")


# RGA-S and RGA-C run sub-graphs of RGA-SC's (the same functions, one axis each).
INDUCTOR_KINDS = [k for k in KINDS if k not in ("rga_s", "rga_c")]


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", INDUCTOR_KINDS)
def test_compile_fullgraph_inductor_fused(kind, train):
    _check_compiled(kind, "fused", train, "inductor")


# --- torch.export ----------------------------------------------------------------------------


@functools.cache
def _exported(kind: str, impl: str, dtype: torch.dtype):
    """(eval module, ExportedProgram traced at batch 3 with a dynamic batch dim)."""
    module = build(kind, impl, dtype=dtype).eval()
    program = torch.export.export(module, (make_input(3, dtype=dtype),), dynamic_shapes=({0: BATCH},))
    return module, program


@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_export_dynamic_batch(kind, impl):
    module, program = _exported(kind, impl, torch.float64)
    assert_gates_vary(kind, module, make_input(2))
    for batch in (1, 2, 5):
        x = make_input(batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), module(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_onnx_dynamic_batch(kind, impl):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, program = _exported(kind, impl, torch.float32)
    assert_gates_vary(kind, module, make_input(2, dtype=torch.float32))
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    session = ort.InferenceSession(
        onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        x = make_input(batch, dtype=torch.float32, seed=batch)
        (out,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), module(x), atol=1e-5, rtol=1e-4)


# --- mixed precision -------------------------------------------------------------------------

# (output, gradients) tolerances. Output: max |amp - fp32| / max |fp32|. Gradients: norm-wise
# relative error of the input gradient and of all parameter gradients together. The gradients
# are this loose because the function itself is that sensitive: computed in float64 with only
# the input and the conv/linear weights rounded to bf16 (no half-precision arithmetic at all),
# the parameter gradients of these modules move by up to 15% (input gradients 10%); rounded to
# fp16, 2%. Measured under CPU autocast (all kinds, paths, modes, scales): bf16 output 0.024,
# gradients 0.15; fp16 output 0.0026, gradients 0.055.
MIXED_TOL = {torch.bfloat16: (0.03, 0.25), torch.float16: (0.005, 0.12)}
MIXED_CASES = [
    pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}")
    for device, dtype in [
        ("cpu", torch.bfloat16), ("cpu", torch.float16), ("cuda", torch.bfloat16), ("cuda", torch.float16)
    ]
]


def _amp_step(module, x, dtype=None):
    """Forward (under autocast when ``dtype`` is given), then backward outside it, as AMP does."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
        y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    y.backward(upstream.to(y.device))
    params = [p.grad.flatten() for p in module.parameters() if p.requires_grad]
    return y.detach(), x.grad, torch.cat(params) if params else None


def _max_error(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _norm_error(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _skip_without(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["unit", "hundreds"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device,dtype", MIXED_CASES)
@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_autocast_close_to_float32(kind, impl, device, dtype, train, scale):
    """Calibrated BatchNorm statistics: eval mode behaves like a trained network's."""
    _skip_without(device)
    x = make_input(4, dtype=torch.float32, scale=scale).to(device)
    module = calibrate_bn(build(kind, impl, dtype=torch.float32).to(device), x).train(train)
    want = _amp_step(copy.deepcopy(module), x)
    got = _amp_step(module, x, dtype)
    assert got[0].dtype == x.dtype, "autocast keeps the input's dtype at the output"
    out_tol, grad_tol = MIXED_TOL[dtype]
    assert torch.isfinite(got[0]).all() and _max_error(got[0], want[0]) <= out_tol
    for what, a, b in [("input", got[1], want[1]), ("parameter", got[2], want[2])]:
        if b is not None:
            assert torch.isfinite(a).all(), f"{what} gradients not finite"
            assert _norm_error(a, b) <= grad_tol, f"{what} gradients: error {_norm_error(a, b):.3g}"


@pytest.mark.parametrize("device,dtype", MIXED_CASES)
@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_autocast_forward_finite_with_raw_statistics(kind, impl, device, dtype):
    """Eval mode, statistics unrelated to activations in the hundreds: the relation products
    (~1e6 here) stay in float32, so nothing overflows even in float16."""
    _skip_without(device)
    module = build(kind, impl, dtype=torch.float32).to(device).eval()
    x = make_input(4, dtype=torch.float32, scale=300.0).to(device)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype):
        y = module(x)
    assert y.dtype == x.dtype and torch.isfinite(y).all()
