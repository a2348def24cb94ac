"""Shared test fixtures and helpers."""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, so equalities can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


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
