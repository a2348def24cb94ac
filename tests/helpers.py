"""Shared test helpers (imported as ``from helpers import ...``; conftest.py keeps only settings).

* Steps and comparisons: :func:`run_step`, :func:`assert_same_step`, :func:`twins`.
* BatchNorm state: :func:`randomize_bn` (non-trivial affine parameters and statistics) and
  :func:`calibrate_bn` (running statistics of the data, as in a trained network).
* Gates that can fail: :func:`gate_spread`, :func:`assert_gates_vary`.
* Every registered kind at one small size (the deployment, contract and inference suites):
  :data:`KINDS`, :func:`build`, :func:`make_input`, :func:`kind_impl_params`.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reid_attention as ra
from reid_attention.registry import needs_feat_size

# --- steps and comparisons -----------------------------------------------------------------


def run_step(module: torch.nn.Module, x: torch.Tensor, seed: int = 1):
    """Forward + backward with a fixed non-uniform upstream gradient.

    Returns (output, input grad, {param name: grad}, {buffer name: value}).
    """
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    # drawn in float64 and cast, so that runs in different dtypes get the same upstream gradient
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    y.backward(g)
    grads = {
        n: (p.grad.clone() if p.grad is not None else None)
        for n, p in module.named_parameters()
        if p.requires_grad  # frozen parameters (APNet-C's BN biases) get none
    }
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return y.detach(), x.grad, grads, buffers


def assert_same_step(a, b, atol=1e-10, rtol=1e-8):
    """Two run_step results agree: outputs, input grads, parameter grads, buffers."""
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=rtol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert a[2][name] is not None and b[2][name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=rtol, msg=f"grad {name}")
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], atol=atol, rtol=rtol, msg=f"buffer {name}")


def twins(module: torch.nn.Module):
    """A (reference, fused) pair of deep copies of an impl-switchable module."""
    ref, fused = copy.deepcopy(module), copy.deepcopy(module)
    ref.impl, fused.impl = "reference", "fused"
    return ref, fused


# --- BatchNorm state -----------------------------------------------------------------------


def _batch_norms(module: torch.nn.Module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, so equalities can fail.

    The statistics are unrelated to any data: in eval mode they can leave a gate constant (a
    ReLU dead at every position). Follow with :func:`calibrate_bn` where eval mode is compared.
    """
    g = torch.Generator().manual_seed(seed)
    for m in _batch_norms(module):
        with torch.no_grad():
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


@torch.no_grad()
def calibrate_bn(module: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to those of one training-mode pass over ``x``.

    Randomised statistics unrelated to the data leave eval-mode logits far outside the
    sigmoid's range, or a W network's ReLU dead everywhere (a constant gate); calibrated ones
    put eval mode in the regime of a trained network. The module's mode is kept.
    """
    bns = _batch_norms(module)
    momenta = [bn.momentum for bn in bns]
    mode = module.training
    for bn in bns:
        bn.momentum = 1.0
    module.train()(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return module.train(mode)


# --- gates that can fail -------------------------------------------------------------------

# Least spread of log(gate) (see gate_spread) that counts as a varying gate. A W network whose
# ReLU is dead at every position gives a constant gate: 0 up to rounding (1e-16). Measured on
# build() over seeds 0-9 and test_rga.small() over 20 weight seeds, eval and training mode:
# >= 0.046 with calibrated statistics; with randomize_bn's raw ones 0 (RGA-S, APNet-S level 1)
# or 0.004 .. 0.026 (a few positions alive).
MIN_GATE_SPREAD = 0.02


@torch.no_grad()
def gate_spread(module: torch.nn.Module, x: torch.Tensor):
    """(spatial, channel) spread of a gating layer's multiplicative gate ``y / x``.

    ``log(y / x)`` is log(spatial gate) + log(channel gate) for RGA-S / -C / -SC, APNet-S and
    PFSA; its standard deviation over (H, W) at a fixed channel measures how much the spatial
    gate varies across positions, over C at a fixed position how much the channel gate varies
    (each averaged over the rest). A constant gate gives 0. ``x`` must have no zero entries.
    """
    r = (module(x) / x).double().log()
    return r.std((2, 3)).mean().item(), r.std(1).mean().item()


# Which gates each kind has: (spatial, channel). APNet-C's fused output is x * scale + shift
# (a BatchNorm shift after the split attention), not a pure gate, so it is not checked here.
GATES = {
    "rga_s": (True, False),
    "rga_c": (False, True),
    "rga_sc": (True, True),
    "apnet_s": (True, False),
    "pfsa": (True, False),
}


def assert_gates_vary(kind: str, module: torch.nn.Module, x: torch.Tensor) -> None:
    """The module's gates vary (spread >= MIN_GATE_SPREAD) along every axis its kind gates;
    a no-op for kinds without a pure gate."""
    if kind not in GATES:
        return
    spread = gate_spread(module, x)
    for axis, gated, value in zip(("spatial", "channel"), GATES[kind], spread):
        if gated:
            assert value >= MIN_GATE_SPREAD, (
                f"{kind}: the {axis} gate is (nearly) constant (log-gate std {value:.3g}): the comparison "
                "would be hollow; calibrate the BatchNorm statistics"
            )


# --- every registered kind at one small size ------------------------------------------------

# The smallest round size at which every kind keeps every inner width at its official formula
# (no min_width floor is active), so the modules are the official ones: RGA-C's (1 + C // 8) // 8
# needs C = 64; RGA-S's (1 + H*W // 8) // 8 needs H*W >= 56, also on each of the two 8x8 stripes
# of APNet-S's level 2, so (16, 8).
CHANNELS = 64
FEAT_SIZE = (16, 8)
KINDS = tuple(ra.list_attentions())
IMPLS = ("reference", "fused")
SIZE_TIED = tuple(k for k in KINDS if needs_feat_size(k))
# Kinds with weights over the channels (everything but the parameter-free PFSA).
CHANNEL_TIED = tuple(k for k in KINDS if k != "pfsa")


def make_input(batch: int = 3, *, dtype=torch.float64, seed: int = 0, size=FEAT_SIZE, scale: float = 1.0):
    """A (batch, CHANNELS, *size) map; shifted positive like a post-ReLU feature map."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, CHANNELS, *size, generator=g, dtype=torch.float64) + 0.5) * scale).to(dtype)


def build(
    kind: str, impl: str = "fused", *, dtype=torch.float64, seed: int = 0, calibrate: bool = True, **kw
) -> torch.nn.Module:
    """``kind`` built for (B, CHANNELS, *FEAT_SIZE) maps in ``dtype``, in training mode.

    BatchNorm affine parameters randomised; running statistics calibrated on a make_input batch
    (so eval-mode gates vary and eval comparisons can fail), or with ``calibrate=False`` left
    random (unrelated to the data).
    """
    torch.manual_seed(seed)
    module = randomize_bn(ra.create_attention(kind, CHANNELS, feat_size=FEAT_SIZE, impl=impl, **kw), seed)
    module = module.double()
    if calibrate:
        calibrate_bn(module, make_input(8, seed=1000 + seed))
    return module.to(dtype)


def kind_impl_params(kinds=KINDS):
    """pytest params over kinds x impls, with readable ids."""
    return [pytest.param(k, i, id=f"{k}-{i}") for k, i in itertools.product(kinds, IMPLS)]


# --- what float32 rounding can do to a computation -------------------------------------------

U32 = 2.0**-24  # unit roundoff of float32
_CONTRACTIONS = {  # op -> (argument index, dim) of the summed length of a matrix product
    torch.ops.aten.mm.default: (0, -1),
    torch.ops.aten.bmm.default: (0, -1),
    torch.ops.aten.addmm.default: (1, -1),
    torch.ops.aten.baddbmm.default: (1, -1),
}
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def _summed_length(func, args, out: torch.Tensor) -> int:
    """How many terms each element of ``out`` sums: the contraction length of a matrix product
    or convolution, the reduced count of a reduction or norm (input size / output size), else 1."""
    if func in _CONTRACTIONS:
        index, dim = _CONTRACTIONS[func]
        return args[index].shape[dim]
    if func is torch.ops.aten.convolution.default:
        return args[1][0].numel()
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None or out.numel() == 0:
        return 1
    return max(1, first.numel() // out.numel())


class RoundingProbe(TorchDispatchMode):
    """A float64 run that models float32 rounding, recording every ReLU's input.

    Under ``RoundingProbe(seed)`` each floating result of an op (forward and backward) is rounded
    to the nearest float32 after an error of ``sqrt(k) * U32 * r`` relative, r uniform in
    [-1, 1] and k the number of terms the op sums (:func:`_summed_length`; 1 for elementwise
    ops, which are only rounded): the typical error of a float32 kernel accumulating k terms,
    which a float64 computation then carries through everything after it as float32 would
    (saturation and underflow included: a sigmoid of a large logit rounds to exactly 1). The
    spread of a few such runs is the computation's sensitivity to float32 rounding, its
    conditioning, measured in float64 and so the same on every CPU. ``seed=None`` changes
    nothing and only records. ``relu_inputs`` holds the input of every ReLU in call order.
    """

    def __init__(self, seed=None):
        super().__init__()
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.relu_inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            self.relu_inputs.append(args[0].detach().clone())
        out = func(*args, **kwargs)
        schema = func._schema
        if self.generator is None or (schema.returns and schema.returns[0].alias_info is not None
                                      and not schema.is_mutable):
            return out  # a view: no arithmetic
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel():
                k = _summed_length(func, args, t)
                if k > 1:
                    r = torch.rand(t.shape, generator=self.generator, dtype=t.dtype) * 2 - 1
                    t.mul_(1 + (k**0.5 * U32) * r)
                t.copy_(t.float())
        return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
