"""APNet-C and APNet-S: independent oracles, fused == reference, layouts, numerics, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    GRADCHECK,
    assert_gates_vary,
    assert_same_step,
    calibrate_bn,
    randomize_bn,
    run_step,
    twins,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from official_rga import official_forward

import reid_attention as ra
import reid_attention.apnet_s as apnet_s_module

RGA_KW = dict(channel_ratio=2, spatial_ratio=2, down_ratio=2)  # small maps, non-empty widths


def same_step(ref, fused, x, **tol):
    assert_same_step(run_step(ref, x), run_step(fused, x), **tol)


def apnet_c(channels=16, levels=2, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn(ra.APNetC(channels, levels=levels, **kw).double(), seed)


def apnet_s(channels=8, feat_size=(8, 4), levels=2, seed=0, **kw):
    """Float64, training mode; BatchNorm affine parameters randomised, running statistics
    calibrated on a standard-normal batch (random ones leave level 1's gate constant in eval)."""
    torch.manual_seed(seed)
    m = randomize_bn(ra.APNetS(channels, feat_size, levels=levels, **{**RGA_KW, **kw}).double(), seed)
    g = torch.Generator().manual_seed(seed + 100)
    return calibrate_bn(m, torch.randn(4, channels, *feat_size, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# APNet-C


class OracleAPNetC(torch.nn.Module):
    """APNet-C from the paper's equations, written independently of the library's paths.

    Level l (finest first): channel groups by index slicing, group-sum pooled, fc1 -> BN -> ReLU ->
    fc2 as matrix products, softmax across groups, re-weighted groups, BatchNorm2d; then SE.
    """

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        b, c = x.shape[:2]
        for level in reversed(self.m.split):
            r = level.groups
            k = c // r
            parts = [x[:, i * k : (i + 1) * k] for i in range(r)]
            pooled = torch.stack(parts).sum(0).mean((2, 3))  # (B, C/r)
            hidden = pooled @ level.fc1.weight[:, :, 0, 0].T + level.fc1.bias
            hidden = torch.relu(level.bn1(hidden[:, :, None, None])[:, :, 0, 0])
            logits = (hidden @ level.fc2.weight[:, :, 0, 0].T + level.fc2.bias).view(b, r, k)
            weights = torch.softmax(logits, dim=1)
            x = level.norm(torch.cat([parts[i] * weights[:, i, :, None, None] for i in range(r)], 1))
        se = self.m.se.fc
        gate = torch.sigmoid(torch.relu(x.mean((2, 3)) @ se[0].weight.T) @ se[2].weight.T)
        return x * gate[:, :, None, None]


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("train", [True, False])
def test_apnet_c_matches_oracle(levels, impl, train):
    m = apnet_c(16, levels).train(train)
    x = torch.randn(3, 16, 5, 4, dtype=torch.float64) * 2 + 1
    ours = copy.deepcopy(m)
    ours.impl = impl
    oracle = OracleAPNetC(copy.deepcopy(m)).train(train)
    a, b = run_step(oracle, x), run_step(ours, x)
    a = (a[0], a[1], {k[2:]: v for k, v in a[2].items()}, {k[2:]: v for k, v in a[3].items()})
    assert_same_step(a, b)


@st.composite
def apnet_c_cases(draw):
    levels = draw(st.integers(1, 3))
    channels = 2 ** (levels - 1) * draw(st.integers(1, 6))
    train = draw(st.booleans())
    batch = draw(st.integers(2, 4)) if train and levels > 1 else draw(st.integers(1, 3))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return levels, channels, batch, size, train, draw(st.booleans())


@settings(max_examples=15, deadline=None)
@given(apnet_c_cases())
def test_property_apnet_c_fused_equals_reference(case):
    levels, channels, batch, size, train, channels_last = case
    m = apnet_c(channels, levels, seed=channels).train(train)
    x = torch.randn(batch, channels, *size, dtype=torch.float64) * 3 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, fused = twins(m)
    same_step(ref, fused, x)
    y = fused(x)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_apnet_c_running_statistics_over_steps_and_cumulative_momentum():
    m = apnet_c(16, 3)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 16:
            bn.momentum = None  # cumulative moving average
    ref, fused = twins(m)
    for step in range(3):
        x = torch.randn(4, 16, 3, 5, dtype=torch.float64) * (step + 1)
        same_step(ref, fused, x)
    assert int(fused.split[1].norm.num_batches_tracked) == 3
    ref.eval(), fused.eval()
    same_step(ref, fused, torch.randn(2, 16, 3, 5, dtype=torch.float64))


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([torch.float32, torch.float64]), st.integers(1, 3), st.booleans())
def test_property_apnet_c_gradients_reach_everything(dtype, levels, channels_last):
    for impl in ("reference", "fused"):
        m = ra.APNetC(8, levels=levels, impl=impl).to(dtype).train()
        x = torch.randn(3, 8, 4, 5, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = m(x)
        assert y.shape == x.shape and y.dtype == dtype
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad.abs().sum() > 0
        for name, p in m.named_parameters():
            if name.endswith("norm.bias"):
                assert not p.requires_grad and p.grad is None  # frozen, as the official BN2d
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_c_gradcheck(impl):
    m = apnet_c(4, 3, impl=impl, split_min_width=4, se_hidden=2)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), **GRADCHECK)
    m.eval()
    assert torch.autograd.gradcheck(m, (x,), **GRADCHECK)


def official_apnet_c_shapes(c, levels):
    """The official per-site tensors (att{k}, att_s{k}, BN{k}.bottleneck2) under our names."""
    shapes = {"se.fc.0.weight": (8, c), "se.fc.2.weight": (c, 8)}
    for i in range(levels - 1):
        r = 2 ** (i + 1)
        inter = max(c * r // 4, 32)
        shapes.update({
            f"split.{i}.fc1.weight": (inter, c // r, 1, 1), f"split.{i}.fc1.bias": (inter,),
            f"split.{i}.fc2.weight": (c, inter, 1, 1), f"split.{i}.fc2.bias": (c,),
        })
        for bn, width in (("bn1", inter), ("norm", c)):
            for t in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"split.{i}.{bn}.{t}"] = (width,)
            shapes[f"split.{i}.{bn}.num_batches_tracked"] = ()
    return shapes


@pytest.mark.parametrize("channels", [64, 256, 2048])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_apnet_c_parameter_layout(channels, levels):
    m = ra.APNetC(channels, levels=levels)
    expected = official_apnet_c_shapes(channels, levels)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    state = {k: (torch.tensor(5) if s == () else torch.randn(s)) for k, s in expected.items()}
    m.load_state_dict(state, strict=True)
    assert m.se.fc[2].weight.equal(state["se.fc.2.weight"])
    assert all(not lv.norm.bias.requires_grad for lv in m.split)
    assert [lv.groups for lv in m.split] == [2 ** (i + 1) for i in range(levels - 1)]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_c_batch_one_and_empty(impl):
    m = apnet_c(16, 2, impl=impl)
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch of at least 2 in training mode.*one value per channel"):
        m(x[:1])
    m.eval()
    torch.testing.assert_close(m(x[:1]), m(x)[:1])  # eval: any batch, samples independent
    assert apnet_c(16, 1, impl=impl)(x[:1]).shape == (1, 16, 4, 4)  # SE only: no BatchNorm
    for train in (True, False):
        model = apnet_c(16, 3).train(train)
        ref, fused = twins(model)
        same_step(ref, fused, x[:0])
        assert fused(x[:0]).shape == (0, 16, 4, 4)
        torch.testing.assert_close(fused.split[0].bn1.running_mean, model.split[0].bn1.running_mean)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_c_layouts(impl):
    m = apnet_c(16, 3, impl=impl).eval()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
    expected = m(x)
    y = m(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    wide = torch.randn(3, 16, 6, 10, dtype=torch.float64)
    for train in (False, True):
        m.train(train)
        ref, fused = twins(m)
        same_step(ref, fused, wide[..., ::2])  # non-contiguous input
        strided, dense = copy.deepcopy(m)(wide[..., ::2]), copy.deepcopy(m)(wide[..., ::2].contiguous())
        torch.testing.assert_close(strided, dense)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("levels", [2, 3])
def test_apnet_c_bf16_autocast_large_activations(impl, levels):
    m = ra.APNetC(64, levels=levels, impl=impl).train()
    x = (torch.rand(4, 64, 16, 8) * 400).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        yb = m(x.bfloat16())
    assert y.dtype == torch.float32 and yb.dtype == torch.bfloat16
    (y.sum() + yb.float().sum()).backward()
    for t in (y, yb, x.grad):
        assert torch.isfinite(t.float()).all()
    for p in m.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------------------------
# APNet-S


class OracleAPNetS(torch.nn.Module):
    """APNet-S from its description: per level (finest first), each stripe gated by the official
    RGA-S computation of its own agent (official_rga.official_forward), stripes re-assembled."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        h = x.shape[2]
        for level in reversed(self.m.levels):
            rows = h // len(level)
            x = torch.cat([official_forward(agent, x[:, :, i * rows : (i + 1) * rows])
                           for i, agent in enumerate(level)], dim=2)
        return x


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("train", [True, False])
def test_apnet_s_matches_oracle(levels, impl, train):
    m = apnet_s(8, (8, 4), levels).train(train)
    x = torch.randn(2, 8, 8, 4, dtype=torch.float64)
    assert_gates_vary("apnet_s", copy.deepcopy(m), x)  # levels=1: level 1's agent on its own
    ours = copy.deepcopy(m)
    ours.impl = impl
    a, b = run_step(OracleAPNetS(copy.deepcopy(m)).train(train), x), run_step(ours, x)
    a = (a[0], a[1], {k[2:]: v for k, v in a[2].items()}, {k[2:]: v for k, v in a[3].items()})
    assert_same_step(a, b)


@st.composite
def apnet_s_cases(draw):
    levels = draw(st.integers(1, 3))
    stripes = 2 ** (levels - 1)
    height = stripes * draw(st.integers(2, 3))
    return (
        levels,
        draw(st.integers(2, 6)),  # channels
        (height, draw(st.integers(2, 4))),
        draw(st.integers(1, 3)),  # batch
        draw(st.booleans()),  # train
        draw(st.booleans()),  # channels_last
    )


@settings(max_examples=8, deadline=None)
@given(apnet_s_cases())
def test_property_apnet_s_fused_equals_reference(case):
    levels, channels, feat_size, batch, train, channels_last = case
    m = apnet_s(channels, feat_size, levels, seed=channels, channel_ratio=1, spatial_ratio=1, down_ratio=1)
    m.train(train)
    x = torch.randn(batch, channels, *feat_size, dtype=torch.float64) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, fused = twins(m)
    same_step(ref, fused, x)
    y = fused(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_apnet_s_fused_makes_one_batched_call_per_level(monkeypatch):
    calls = []
    real = apnet_s_module.relation_logits_fused

    def counting(tokens, branches, **kw):
        calls.append((tuple(tokens.shape), len(branches)))
        return real(tokens, branches, **kw)

    m = apnet_s(8, (8, 4), levels=3)  # built (and calibrated) before counting
    monkeypatch.setattr(apnet_s_module, "relation_logits_fused", counting)
    m(torch.randn(2, 8, 8, 4, dtype=torch.float64))
    assert calls == [((2, 4, 8, 8), 4), ((2, 2, 8, 16), 2), ((2, 1, 8, 32), 1)]


@settings(max_examples=4, deadline=None)
@given(st.sampled_from([torch.float32, torch.float64]), st.integers(1, 3))
def test_property_apnet_s_gradients_reach_everything(dtype, levels):
    for impl in ("reference", "fused"):
        m = ra.APNetS(4, (4, 2), levels=levels, impl=impl, **RGA_KW).to(dtype).train()
        x = torch.randn(2, 4, 4, 2, dtype=dtype, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape and y.dtype == dtype
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad.abs().sum() > 0
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_s_gradcheck(impl):
    m = apnet_s(2, (2, 3), levels=2, impl=impl, channel_ratio=1, spatial_ratio=1, down_ratio=1)
    x = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), **GRADCHECK)
    m.eval()
    assert torch.autograd.gradcheck(m, (x,), **GRADCHECK)


def test_apnet_s_state_layout_and_impl_propagation():
    m = ra.APNetS(16, (8, 4), levels=3, **RGA_KW)
    keys = m.state_dict().keys()
    assert {k.split(".")[2] for k in keys if k.startswith("levels.2.")} == {"0", "1", "2", "3"}
    assert "levels.1.0.theta_spatial.0.weight" in keys and "levels.0.0.W_spatial.4.running_var" in keys
    for level, stripes in zip(m.levels, (1, 2, 4)):
        assert len(level) == stripes
        for agent in level:
            n = (8 // stripes) * 4
            assert agent.feat_size == (8 // stripes, 4) and not agent.channel
            assert agent.gg_spatial[0].weight.shape == (n // 2, 2 * n, 1, 1)
    m.impl = "reference"
    assert all(agent.impl == "reference" for agent in m.agents())
    with pytest.raises(ValueError, match="impl must be one of"):
        m.impl = "loop"


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_s_batch_one_empty_and_layouts(impl):
    m = apnet_s(8, (8, 4), levels=2, impl=impl)
    x = torch.randn(3, 8, 8, 4, dtype=torch.float64)
    assert torch.isfinite(m(x[:1])).all()  # training, batch 1: statistics over tokens
    ref, fused = twins(m)
    same_step(ref, fused, x[:0])
    assert fused(x[:0]).shape == (0, 8, 8, 4)
    m.eval()
    expected = m(x)
    torch.testing.assert_close(m(x[:1]), expected[:1])
    y = m(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    wide = torch.randn(3, 8, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(m(wide[..., ::2]), m(wide[..., ::2].contiguous()))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_apnet_s_bf16_autocast_large_activations(impl):
    m = ra.APNetS(32, (16, 8), levels=2, impl=impl).train()
    x = (torch.rand(4, 32, 16, 8) * 400).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# registry and validation


@pytest.mark.parametrize("name,kw", [("apnet_c", {"levels": 3}), ("apnet_s", {"levels": 2, **RGA_KW})])
def test_registry_constructs_runs_and_backpropagates(name, kw):
    m = ra.create_attention(name, 16, (8, 4), **kw)
    assert isinstance(m, {"apnet_c": ra.APNetC, "apnet_s": ra.APNetS}[name]) and m.num_levels == kw["levels"]
    x = torch.randn(2, 16, 8, 4, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"APNetC level 3 splits channels into 4 parts: channels = 6 is not"):
        ra.APNetC(6, levels=3)
    with pytest.raises(ValueError, match="levels must be >= 1, got 0"):
        ra.APNetC(8, levels=0)
    with pytest.raises(TypeError, match="levels must be an int, got str"):
        ra.APNetC(8, levels="2")
    with pytest.raises(ValueError, match="se_hidden must be >= 1"):
        ra.APNetC(8, se_hidden=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        ra.APNetC(8, impl="fast")
    with pytest.raises(ValueError, match="APNetC built for 8 channels, got input with 4"):
        ra.APNetC(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"APNetS level 2 splits the height H into 2 parts: .* H = 7"):
        ra.APNetS(8, (7, 4))
    with pytest.raises(ValueError, match=r"APNetS built for feat_size \(8, 4\), got input 4x8"):
        ra.APNetS(8, (8, 4), **RGA_KW)(torch.randn(2, 8, 4, 8))
    with pytest.raises(ValueError, match=r"feat_size must be a pair \(H, W\)"):
        ra.APNetS(8, (8, 4, 2))
    with pytest.raises(TypeError, match=r"as the map's \(H, W\) pair, got the int 8"):
        ra.APNetS(8, 8)
    with pytest.raises(ValueError, match="depends on the map size"):
        ra.create_attention("apnet_s", 8)
    with pytest.raises(TypeError, match="floating-point input"):
        ra.APNetC(8)(torch.ones(2, 8, 3, 3, dtype=torch.int32))
