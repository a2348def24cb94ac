"""The module tree is the truth: every path calls or honours the norms a layer owns.

``norm_layer`` (BN, SyncBN, FrozenBN, GroupNorm, a user's), SyncBatchNorm conversion, the
one-kernel fast route and its conditions, mixed modes, ``momentum=None`` and absent running
statistics, each with fused == reference in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FORWARD_TOL, assert_same_step, randomize_bn, run_step, twins
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import reid_attention as ra
from reid_attention._norm import norm_channels, one_kernel

KINDS_WITH_NORMS = ["rga_s", "rga_c", "rga_sc", "apnet_c", "apnet_s"]
C, SIZE = 32, (8, 4)


def build(kind: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return ra.create_attention(kind, C, feat_size=SIZE, **kw).double()


def make_x(batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, C, *SIZE, generator=g, dtype=torch.float64) + 0.1


def norms_of(module: nn.Module, cls: type):
    return [m for m in module.modules() if isinstance(m, cls)]


class ScaledNorm(nn.Module):
    """A user's norm: GroupNorm(1, c) times a learnt scalar."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = nn.GroupNorm(1, channels)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.inner(x) * self.scale


def _frozen(c):
    return FrozenBatchNorm2d(c)


NORMS = {
    "frozen_bn": _frozen,
    "group_norm": lambda c: nn.GroupNorm(1, c),
    "user_norm": ScaledNorm,
}


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("train", [True, False])
def test_every_sync_batchnorm_runs_once_per_call(kind, impl, train):
    module = nn.SyncBatchNorm.convert_sync_batchnorm(build(kind, impl=impl)).train(train)
    syncs = norms_of(module, nn.SyncBatchNorm)
    assert syncs and not [m for m in module.modules() if type(m) is nn.BatchNorm2d]
    calls = {id(m): 0 for m in syncs}
    for m in syncs:
        m.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    module(make_x()).sum().backward()
    assert sorted(set(calls.values())) == [1], (
        f"{sum(v == 0 for v in calls.values())} of {len(calls)} not run")


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("train", [True, False])
def test_sync_batchnorm_fused_equals_reference(kind, train):
    module = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(build(kind))).train(train)
    ref, fused = twins(module)
    assert_same_step(run_step(ref, make_x()), run_step(fused, make_x()))


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("train", [True, False])
def test_norm_layer_fused_equals_reference(kind, norm, train):
    module = build(kind, norm_layer=NORMS[norm]).train(train)
    assert not [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ref, fused = twins(module)
    a, b = run_step(ref, make_x()), run_step(fused, make_x())
    assert_same_step(a, b)
    assert torch.isfinite(b[0]).all()


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_frozen_batchnorm_uses_its_statistics_in_training(kind, impl):
    """Train mode with FrozenBatchNorm2d == eval mode with BatchNorm2d holding the same values."""
    bn = randomize_bn(build(kind, impl=impl)).eval()
    frozen = build(kind, impl=impl, norm_layer=_frozen)
    state = {k: v for k, v in bn.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state)
    frozen.train()
    x = make_x()
    torch.testing.assert_close(frozen(x), bn(x), **FORWARD_TOL)  # other BatchNorm kernels
    before = copy.deepcopy(frozen.state_dict())
    frozen(x)
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_group_norm_trains(kind, impl):
    module = build(kind, impl=impl, norm_layer=lambda c: nn.GroupNorm(1, c)).float().train()
    norms = norms_of(module, nn.GroupNorm)
    x = make_x(seed=1).float()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    before = [n.weight.detach().clone() for n in norms]
    out0 = module(x)
    ((out0 - 2 * x) ** 2).mean().backward()
    opt.step()
    assert all(n.weight.grad is not None for n in norms)
    assert any(not torch.equal(b, n.weight) for b, n in zip(before, norms))
    assert not torch.equal(module(x), out0.detach())


def _group(*bns):
    return [randomize_bn(bn.double(), seed=i) for i, bn in enumerate(bns)]


def test_one_kernel_only_for_exact_batchnorms_in_one_configuration():
    assert one_kernel(_group(nn.BatchNorm2d(3), nn.BatchNorm2d(3)))
    assert one_kernel(_group(nn.BatchNorm1d(3), nn.BatchNorm2d(3)))
    assert not one_kernel(_group(nn.BatchNorm2d(3), nn.SyncBatchNorm(3)))
    assert not one_kernel([FrozenBatchNorm2d(3)])

    class MyBN(nn.BatchNorm2d):
        pass

    assert not one_kernel([MyBN(3)])
    assert not one_kernel(_group(nn.BatchNorm2d(3), nn.BatchNorm2d(3, eps=1e-3)))
    assert not one_kernel(_group(nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=0.2)))
    assert not one_kernel([nn.BatchNorm2d(3, momentum=None)])
    assert not one_kernel(_group(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False)))
    assert not one_kernel(_group(nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval()))
    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda *a: None)
    assert not one_kernel([hooked])


GROUPS = {
    "mixed_modes": lambda: _group(nn.BatchNorm2d(3), nn.BatchNorm2d(3).eval(), nn.BatchNorm2d(3)),
    "momentum_none": lambda: _group(nn.BatchNorm2d(3, momentum=None), nn.BatchNorm2d(3, momentum=None)),
    "no_running_stats": lambda: _group(nn.BatchNorm2d(3, track_running_stats=False),
                                       nn.BatchNorm2d(3, track_running_stats=False)),
    "mixed_eps": lambda: _group(nn.BatchNorm2d(3), nn.BatchNorm2d(3, eps=0.5)),
    "exact": lambda: _group(nn.BatchNorm2d(3), nn.BatchNorm2d(3)),
    "exact_eval_no_stats": lambda: [m.eval() for m in _group(nn.BatchNorm2d(3, track_running_stats=False))],
}


@pytest.mark.parametrize("group", GROUPS)
def test_norm_channels_equals_calling_each_module(group):
    norms = GROUPS[group]()
    twins_ = copy.deepcopy(norms)
    x = torch.randn(5, 3 * len(norms), 7, dtype=torch.float64)
    for _ in range(2):  # twice: the counters and cumulative averages move
        y = norm_channels(x, norms)
        expected = torch.cat([m(p.unsqueeze(-1)).squeeze(-1)
                              for m, p in zip(twins_, x.chunk(len(norms), 1))], 1)
        torch.testing.assert_close(y, expected, **FORWARD_TOL)  # one kernel vs one per module
    for a, b in zip(norms, twins_):
        for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(va, vb, msg=name)


@pytest.mark.parametrize("kind", KINDS_WITH_NORMS)
@pytest.mark.parametrize("setting", ["mixed_modes", "momentum_none", "no_running_stats"])
def test_awkward_batchnorm_settings_in_layers(kind, setting):
    module = randomize_bn(build(kind)).train()
    bns = norms_of(module, nn.BatchNorm2d)
    if setting == "mixed_modes":
        for bn in bns[::2]:
            bn.eval()
    elif setting == "momentum_none":
        for bn in bns:
            bn.momentum = None
    else:
        module = build(kind, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)).train()
    ref, fused = twins(module)
    for _ in range(2):
        assert_same_step(run_step(ref, make_x()), run_step(fused, make_x()))
