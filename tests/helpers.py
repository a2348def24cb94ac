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


# Tolerances of float64 comparisons between two computations of one function (fused vs
# reference, lean vs default, folded vs unfolded, another layout or batch size). Each computation
# is off by its rounding, u64 = 2^-53 = 1.1e-16 per operation amplified by the conditioning;
# modelled for every such comparison of the suite with RoundingProbe(dtype=float64) (3 seeds,
# both computations, element by element; fixed seeds and the derandomized hypothesis profile
# "ci", so the same inputs on every CPU) and measured on AMD EPYC:
#
# STEP_TOL, whole training and eval steps (assert_same_step: outputs, input and parameter
# gradients, running statistics). Elementwise the modelled rounding of both computations uses
# <= 3% of atol + rtol |b|, except on gradients that are 0 in exact arithmetic (a conv bias before
# a training-mode BatchNorm: a sum over the batch that cancels), which carry only rounding
# noise: modelled <= 2e-11 absolute, 18% of atol. The real differences use <= 2.9% (that noise);
# they exceeded the modelled rounding (up to 4.2x) only at a few 1e-14 absolute.
STEP_TOL = {"atol": 1e-10, "rtol": 1e-8}
# FORWARD_TOL, eval-mode forwards of helpers.build's modules (the same, folded, at batch one,
# from a state_dict, through the other path): modelled rounding <= 180 u64 of max |y| and <= 0.5%
# of atol + rtol |y| elementwise for both computations together; the other forwards compared
# with it (norm_channels, FrozenBatchNorm2d vs BatchNorm2d, nearest-resized layers): <= 0.1%.
FORWARD_TOL = {"atol": 1e-12, "rtol": 1e-10}
# torch.autograd.gradcheck's defaults, spelled out (rtol stays 1e-3): central differences with
# step eps differ from the analytical Jacobian by truncation (eps^2 |f'''| / 6, the same on every
# CPU) and by rounding: two float64 evaluations of f, each within ROUNDING_FACTOR times its
# modelled rounding (<= 37 u64 of max |f|, 2e-15, for the gradcheck modules of test_rga and
# test_pyramid), over 2 eps: <= 8e-9, 1/1000 of atol. A ReLU input within eps of its kink would
# break it by O(1), on every CPU alike.
GRADCHECK = {"eps": 1e-6, "atol": 1e-5}


def assert_same_step(a, b, atol=STEP_TOL["atol"], rtol=STEP_TOL["rtol"]):
    """Two run_step results agree: outputs, input grads, parameter grads, buffers (float64; see
    STEP_TOL; ``atol=0, rtol=0`` where the same kernels run in the same order)."""
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


# --- what rounding can do to a computation ---------------------------------------------------

# Unit roundoff u = 2^-p of each floating format (p significand bits, the implicit one included):
# round-to-nearest moves a value by at most u relative.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
}
U64 = UNIT_ROUNDOFF[torch.float64]  # 1.1e-16
U32 = UNIT_ROUNDOFF[torch.float32]  # 6.0e-8
_CONTRACTIONS = {  # op -> (argument index, dim) of the summed length of a matrix product
    torch.ops.aten.mm.default: (0, -1),
    torch.ops.aten.bmm.default: (0, -1),
    torch.ops.aten.addmm.default: (1, -1),
    torch.ops.aten.baddbmm.default: (1, -1),
}
_RELU = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
# Copies (a dtype cast, or a reshape of a strided tensor): no arithmetic of their own, and where
# a run in one dtype casts or copies, a run in another may not.
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default)


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


def _accumulation_unit(dtype: torch.dtype) -> float:
    """Unit roundoff a kernel producing ``dtype`` accumulates in: float64's for float64, float32's
    for float32 and the half formats (CPU and CUDA kernels sum bf16 / fp16 in float32)."""
    return U64 if dtype == torch.float64 else U32


def _kind(func):
    """What the schedule of :class:`RoundingProbe` matches ops by: the op, except that the matrix
    products count as one (torch.matmul folds a batch into mm or calls bmm depending on strides,
    which a cast to another dtype may change), and so do a BatchNorm's kernels, forward and
    backward (on CUDA cuDNN's may serve one dtype and ATen's another)."""
    if func in _CONTRACTIONS:
        return "matrix product"
    name = func._schema.name
    if "batch_norm" in name:
        return "batch norm backward" if "backward" in name else "batch norm"
    return func


def _is_view(func) -> bool:
    schema = func._schema
    return bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.is_mutable


def _written(func):
    """Indices of the arguments ``func`` writes to (in-place and out= ops)."""
    arguments = func._schema.arguments
    return {i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write}


def _computed(args) -> bool:
    """Whether an op's result is computed from floating tensors (not created: zeros, randn)."""
    return any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


class DtypeSchedule(TorchDispatchMode):
    """Records the dtypes a real (say autocast) run computes in, for :class:`RoundingProbe`.

    ``ops`` holds, per op that is not a view or a cast, ``(op, input dtypes, output dtypes)``:
    which tensors autocast and the library's float32 islands hand to each op in which format.
    """

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _COPIES and not _is_view(func):
            self.ops.append((func, [a.dtype if isinstance(a, torch.Tensor) else None for a in args],
                             [t.dtype for t in _tensors(out)]))
        return out


class RoundingProbe(TorchDispatchMode):
    """A float64 run that models rounding in ``dtype`` (or in a recorded schedule of dtypes),
    recording every ReLU's input.

    Under ``RoundingProbe(seed)`` each floating result of an op (forward and backward) is rounded
    to the nearest ``dtype`` after an error of ``sqrt(k) * u * r`` relative, r uniform in
    [-1, 1], k the number of terms the op sums (:func:`_summed_length`) and u the unit roundoff
    the kernel accumulates in (:func:`_accumulation_unit`: float32's for float32, bf16 and fp16):
    the typical error of a kernel accumulating k terms, which a float64 computation then carries
    through everything after it as the real run would (saturation, overflow and underflow
    included: a sigmoid of a large logit rounds to exactly 1 in float32). Elementwise ops (k = 1)
    are only rounded; with ``dtype=torch.float64`` there is no rounding to model that, so every
    computed result gets the ``sqrt(k) * u * r`` error, k = 1 included (another CPU's exp or
    division may differ in the last bit); created tensors (zeros, randn) are left exact. The
    spread of a few such runs is the computation's sensitivity to rounding in that format, its
    conditioning, measured in float64 and so the same on every CPU.

    ``schedule`` (a :class:`DtypeSchedule`'s ``ops``, recorded on the real run of the same
    computation, e.g. under autocast) replaces the one ``dtype``: each op's inputs are rounded to
    the formats the real run handed it (autocast's casts to bf16 included) and its results to the
    formats the real run produced. The op sequences must agree (casts aside); a mismatch raises.

    ``seed=None`` changes nothing and only records. ``relu_inputs`` holds the input of every ReLU
    in call order.
    """

    def __init__(self, seed=None, dtype: torch.dtype = torch.float32, schedule=None):
        super().__init__()
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.dtype, self.schedule, self.step = dtype, schedule, 0
        self.relu_inputs = []

    def _round_inputs(self, func, args, dtypes):
        written = _written(func)
        return tuple(
            a.to(d).double() if (i not in written and isinstance(a, torch.Tensor) and a.dtype == torch.float64
                                 and d is not None and d.is_floating_point and d != torch.float64) else a
            for i, (a, d) in enumerate(zip(args, dtypes + [None] * (len(args) - len(dtypes))))
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU:
            self.relu_inputs.append(args[0].detach().clone())
        scheduled = self.schedule is not None and self.generator is not None
        if scheduled and func in _COPIES:
            return func(*args, **kwargs)  # the schedule's formats already say where values round
        if scheduled and not _is_view(func):
            if self.step >= len(self.schedule) or _kind(self.schedule[self.step][0]) != _kind(func):
                got = self.schedule[self.step][0] if self.step < len(self.schedule) else "the end"
                raise AssertionError(f"RoundingProbe: op {self.step} is {func}, the recorded run had {got}")
            _, in_dtypes, out_dtypes = self.schedule[self.step]
            self.step += 1
            args = self._round_inputs(func, args, in_dtypes)
        out = func(*args, **kwargs)
        if self.generator is None or _is_view(func):
            return out  # only recording, or a view: no arithmetic
        tensors = _tensors(out)
        targets = out_dtypes if scheduled else [self.dtype] * len(tensors)
        for t, target in zip(tensors, targets):
            if t.dtype == torch.float64 and t.numel() and target.is_floating_point:
                k = _summed_length(func, args, t)
                if k > 1 or (target == torch.float64 and _computed(args)):
                    r = torch.rand(t.shape, generator=self.generator, dtype=t.dtype) * 2 - 1
                    t.mul_(1 + (k**0.5 * _accumulation_unit(target)) * r)
                if target != torch.float64:
                    t.copy_(t.to(target))
        return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def norm_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# A computation is trusted to within ROUNDING_FACTOR times what modelled rounding does to it
# (the largest deviation of PROBE_SEEDS RoundingProbe runs): the real error of float32 kernels was
# 0.1-1.7x the modelled one (test_contract, AMD EPYC, AVX-512 / AVX2 / default ATen kernels), that
# of bf16 / fp16 autocast 0.9-1.05x (test_deploy, all kinds); 4 leaves room for kernels that round
# less favourably, while a real fault (a missing float32 island, an unguarded divisor, a wrong
# path) moves the error by orders of magnitude. test_contract's extreme-magnitudes test has its own
# copy of these constants.
ROUNDING_FACTOR = 4
PROBE_SEEDS = 3


def rounding_envelope(step, module: torch.nn.Module, measures, seeds: int = PROBE_SEEDS, **probe):
    """``(exact, worst)``: ``step(m)`` (returning a sequence of tensors) on a fresh deep copy m of
    the float64 ``module`` (made outside the probe), once as it is, and ``worst[i]``, the largest
    ``measures[i](result[i], exact[i])`` over ``seeds`` runs under ``RoundingProbe(seed, **probe)``
    (0 where ``exact[i]`` or ``measures[i]`` is None)."""
    exact = step(copy.deepcopy(module))
    worst = [0.0] * len(measures)
    for seed in range(seeds):
        fresh = copy.deepcopy(module)
        with RoundingProbe(seed, **probe):
            got = step(fresh)
        worst = [w if b is None or measure is None else max(w, measure(a, b))
                 for w, measure, a, b in zip(worst, measures, got, exact)]
    return exact, worst
