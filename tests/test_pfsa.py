"""PFSA: the official formula, fused == reference, guards, layouts, dtypes, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ROUNDING_FACTOR, U32, U64, UNIT_ROUNDOFF, max_abs, rounding_envelope
from hypothesis import given, settings
from hypothesis import strategies as st

import reid_attention as ra

PFSA = ra.ParameterFreeSpatialAttention

# Tolerances. First-order worst-case bounds, u the unit roundoff of the format: a sum of n
# nonnegative terms is off by at most (n - 1) u relative, each product, division or cast by u.
# pool() against the official average pool of x * a (N = 48 positions, float64): pool's GEMV
# rounds N products and N - 1 sums; the official side N products, N - 1 sums, the division by N
# and the test's product by N: 2 (N + 1) u64 relative, element by element (every term >= 0).
POOL_RTOL = 2 * (48 + 1) * U64
# preserve_scale's map against the official one times N: m / (S / N) is two roundings, (m / S) N
# two more: 4 u64 relative (+1 for the second-order terms).
SCALE_RTOL = 5 * U64


def official_attention(x):
    """The official SpatialAttn, transcribed: each sample's channel-mean map over its own sum."""
    maps = x.mean(dim=1)  # (B, H, W)
    return torch.stack([m / m.sum() for m in maps]).unsqueeze(1)


def grads(module, x, pool=False, seed=0):
    """(output, input gradient) under a fixed random upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    y = module.pool(x) if pool else module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), x.grad


def twins(**kw):
    return PFSA(impl="reference", **kw), PFSA(impl="fused", **kw)


class Official(torch.nn.Module):
    """The official layer, x * a (pooled: its sum), as a module for grads()."""

    def forward(self, x):
        return x * official_attention(x)

    def pool(self, x):
        return self(x).sum((2, 3))


class Scaled(torch.nn.Module):
    """A layer's output (and pool) times ``factor``."""

    def __init__(self, layer, factor):
        super().__init__()
        self.layer, self.factor = layer, factor

    def forward(self, x):
        return self.layer(x) * self.factor

    def pool(self, x):
        return self.layer.pool(x) * self.factor


def assert_same_up_to_rounding(got, want, x, pool=False):
    """grads() of two float64 modules computing one function agree up to their rounding: each is
    within ROUNDING_FACTOR times its own modelled float64 rounding (helpers.RoundingProbe, the
    largest |deviation| over PROBE_SEEDS runs, output and input gradient each) of the exact
    value. Gradients subtract <dL/da, a> from dL/da (a cancellation): a fixed relative tolerance
    would be crossed where the difference is small, the modelled one scales with the terms."""
    results = [rounding_envelope(lambda m: grads(m, x, pool), module, (max_abs, max_abs), dtype=torch.float64)
               for module in (got, want)]
    (exact_got, dev_got), (exact_want, dev_want) = results
    for what, a, b, d_a, d_b in zip(("output", "input gradient"), exact_got, exact_want, dev_got, dev_want):
        error = max_abs(a, b)
        assert error <= ROUNDING_FACTOR * (d_a + d_b), f"{what}: {error:.3g}, modelled {d_a:.3g} + {d_b:.3g}"


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_sum_matches_official_formula_on_nonnegative_input(impl):
    m = PFSA(impl=impl)
    x = torch.relu(torch.randn(3, 16, 12, 4, dtype=torch.float64))
    for xd in (x, x.float()):  # bit for bit
        assert torch.equal(m.attention(xd), official_attention(xd))
        assert torch.equal(m(xd), xd * official_attention(xd))
    a = official_attention(x)
    # the official network average-pools x * a; pool() is that sum, not the mean
    official_pool = F.avg_pool2d(x * a, (12, 4)).flatten(1) * 48
    torch.testing.assert_close(m.pool(x), official_pool, rtol=POOL_RTOL, atol=0)
    # gradients through the official formula
    for pool in (False, True):
        assert_same_up_to_rounding(m, Official(), x, pool)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_softmax_is_softmax_over_positions(impl):
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    a = torch.softmax(x.mean(1).flatten(1), dim=1).view(2, 1, 5, 3)
    m = PFSA(normalize="softmax", impl=impl)
    torch.testing.assert_close(m.attention(x), a)
    torch.testing.assert_close(m(x), x * a)
    torch.testing.assert_close(m.pool(x), (x * a).sum((2, 3)))


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("normalize", ["sum", "softmax"])
def test_preserve_scale_is_the_official_map_times_positions(impl, normalize):
    x = torch.rand(3, 16, 12, 4, dtype=torch.float64) + 0.1
    official = PFSA(normalize=normalize, impl=impl)
    scaled = PFSA(normalize=normalize, impl=impl, preserve_scale=True)
    a = scaled.attention(x)
    torch.testing.assert_close(a, official.attention(x) * 48, rtol=SCALE_RTOL, atol=0)
    torch.testing.assert_close(a.mean((2, 3)), torch.ones(3, 1, dtype=torch.float64))  # mean 1
    torch.testing.assert_close(scaled(x), x * a)
    torch.testing.assert_close(scaled.pool(x), scaled(x).sum((2, 3)))
    # the output keeps the input's scale (the official one divides it by about H*W)
    assert 0.5 < scaled(x).norm() / x.norm() < 2 and official(x).norm() / x.norm() < 0.1
    # gradients: the official layer's times H*W
    for pool in (False, True):
        assert_same_up_to_rounding(scaled, Scaled(official, 48.0), x, pool)
    assert "preserve_scale=True" in repr(scaled)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_preserve_scale_zero_maps_stay_finite(impl):
    x = torch.rand(2, 4, 5, 6, dtype=torch.float64)
    x[1] = 0
    m = PFSA(impl=impl, preserve_scale=True)
    for pool in (False, True):
        y, g = grads(m, x, pool)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert m.attention(x)[1].eq(0).all()
    soft = PFSA(normalize="softmax", impl=impl, preserve_scale=True).attention(x)
    torch.testing.assert_close(soft[1], torch.ones_like(soft[1]))  # uniform map, mean 1


def test_channel_first_factories_can_build_it():
    m = PFSA(64, device="cpu", dtype=torch.float16, preserve_scale=True)  # timm's attn_layer call
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    x = torch.rand(2, 64, 3, 3) + 0.1
    torch.testing.assert_close(m(x), PFSA(preserve_scale=True)(x))
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        PFSA(0)
    with pytest.raises(TypeError, match="preserve_scale must be a bool, got str"):
        PFSA(preserve_scale="yes")


@st.composite
def cases(draw):
    shape = (
        draw(st.integers(0, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 7)),
        draw(st.integers(1, 7)),
    )
    return (
        shape,
        draw(st.sampled_from(["sum", "softmax"])),
        draw(st.sampled_from(["nonnegative", "negative", "mixed"])),
        draw(st.booleans()),  # channels_last
        draw(st.booleans()),  # pool
        draw(st.booleans()),  # preserve_scale
    )


def make_input(shape, sign, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    if sign == "negative":
        return -x
    if sign == "mixed":
        # Odd raster positions get a negative channel mean (-0.5x it; channels of both signs),
        # even ones a positive one (+0.5x); the negative positions are scaled so that they sum
        # to at most half the positive ones: each map's sum stays >= half its positive part,
        # away from zero, where sum-normalisation is ill-posed. A 1x1 map stays positive.
        odd = (torch.arange(shape[2] * shape[3]) % 2 == 1).view(1, 1, shape[2], shape[3])
        x = x - torch.where(odd, 1.5, 0.5) * x.mean(1, keepdim=True)
        m = x.mean(1, keepdim=True)
        pos, neg = m.clamp(min=0).sum((2, 3), keepdim=True), -m.clamp(max=0).sum((2, 3), keepdim=True)
        return torch.where(odd, x * (0.5 * pos / neg).clamp(max=1), x)  # neg = 0 (1x1 map): scale 1
    return x


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_fused_equals_reference(case):
    shape, normalize, sign, channels_last, pool, preserve_scale = case
    x = make_input(shape, sign)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, fused = twins(normalize=normalize, preserve_scale=preserve_scale)
    y_fused, g_fused = grads(fused, x, pool)
    assert y_fused.shape == (shape[:2] if pool else shape) and y_fused.dtype == x.dtype
    assert_same_up_to_rounding(fused, ref, x, pool)
    # one map: each path normalises the same channel means, N sums and a division (sum), or a
    # softmax (exp, N sums, a division, errors relative to each weight): (N + 2) u64 relative
    # each, twice that apart (+1 for the product by N with preserve_scale)
    n = shape[2] * shape[3]
    torch.testing.assert_close(fused.attention(x), ref.attention(x), rtol=(2 * n + 5) * U64, atol=0)
    if shape[0]:
        assert g_fused.abs().sum() > 0


@pytest.mark.parametrize("normalize", ["sum", "softmax"])
@pytest.mark.parametrize("sign", ["nonnegative", "negative", "mixed"])
@pytest.mark.parametrize("pool", [False, True])
def test_fused_equals_reference_for_every_sign(normalize, sign, pool):
    """Every normalize x sign pair, drawn or not by the property test above (mixed signs under
    the sum normaliser are where a sign slip in the fused backward shows)."""
    x = make_input((2, 4, 5, 3), sign)
    ref, fused = twins(normalize=normalize)
    assert_same_up_to_rounding(fused, ref, x, pool)


@settings(max_examples=10, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.sampled_from(["reference", "fused"]),
    st.sampled_from(["sum", "softmax"]),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_property_dtype_shape_and_normalised(dtype, impl, normalize, h, w):
    m = PFSA(normalize=normalize, impl=impl)
    x = (torch.rand(2, 4, h, w) + 0.1).to(dtype).requires_grad_(True)
    y, a, p = m(x), m.attention(x), m.pool(x)
    assert (y.shape, y.dtype) == (x.shape, dtype)
    assert (a.shape, a.dtype) == ((2, 1, h, w), dtype)
    assert (p.shape, p.dtype) == ((2, 4), dtype)
    # a >= 0, computed in float32 (float64 for float64 input) and cast to dtype: the channel means'
    # own errors cancel in a_p = m_p / sum m (the sum is of the computed means), leaving N - 1
    # float32 sums and a division per weight (softmax: an exp, the sums, a division); then each
    # a_p's cast to dtype moves the total by at most u(dtype) sum a_p = u(dtype), and the test's
    # float32 sum adds N - 1 units: u(dtype) + (2 N + 2) u32
    n = h * w
    tol = (UNIT_ROUNDOFF[dtype] if dtype != torch.float64 else 0) + (2 * n + 2) * U32
    torch.testing.assert_close(a.float().sum((2, 3)), torch.ones(2, 1), rtol=0, atol=tol)
    (y.float().sum() + p.float().sum()).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("normalize", ["sum", "softmax"])
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("preserve_scale", [False, True])
def test_gradcheck(impl, normalize, pool, preserve_scale):
    m = PFSA(normalize=normalize, impl=impl, preserve_scale=preserve_scale)
    x = (torch.rand(2, 3, 3, 2, dtype=torch.float64) + 0.1).requires_grad_(True)
    fn = m.pool if pool else m
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradcheck(fn, (-x.detach().requires_grad_(True),))


def test_fused_refuses_double_backward():
    x = (torch.rand(2, 3, 3, 2, dtype=torch.float64) + 0.1).requires_grad_(True)
    (g,) = torch.autograd.grad(PFSA()(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_zero_maps_are_finite(impl):
    x = torch.rand(3, 4, 5, 6, dtype=torch.float64)
    x[1] = 0  # an all-zero sample
    x[2, :2] = -x[2, 2:]  # a map that is zero (up to rounding) although x is not
    m = PFSA(impl=impl)
    for pool in (False, True):
        y, g = grads(m, x, pool)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
    a = m.attention(x)
    assert a[1].eq(0).all() and torch.isfinite(a[2]).all()  # documented: zero maps give a = 0
    assert m(x)[1].eq(0).all() and m.pool(x)[1].eq(0).all()
    torch.testing.assert_close(a[0].sum(), torch.tensor(1.0, dtype=torch.float64))
    soft = PFSA(normalize="softmax", impl=impl).attention(x)
    torch.testing.assert_close(soft[1], torch.full_like(soft[1], 1 / 30))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_negative_maps_and_tiny_sums(impl):
    m = PFSA(impl=impl)
    x = -torch.rand(2, 4, 3, 3, dtype=torch.float64) - 0.1
    a = m.attention(x)
    # an all-negative map is divided by its own (negative) sum: positive weights summing to 1
    assert (a > 0).all()
    torch.testing.assert_close(a, official_attention(x))
    # a map whose sum is below eps in magnitude uses +-eps: finite, sign of the sum kept
    tiny = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    tiny[0, 0, 0, 0], tiny[0, 0, 1, 1] = 1e-3, -1e-3 + 1e-20
    y, g = grads(m, tiny)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert torch.isfinite(PFSA(impl=impl, eps=1e-6).attention(tiny)).all()
    # ... and the clamped sum passes no gradient, on both paths
    for pool in (False, True):
        expected = grads(PFSA(impl="reference", eps=1e-6), tiny, pool)
        torch.testing.assert_close(grads(PFSA(impl=impl, eps=1e-6), tiny, pool), expected)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_one_by_one_maps(impl):
    x = torch.rand(3, 5, 1, 1, dtype=torch.float64) + 0.1
    for normalize in ("sum", "softmax"):
        m = PFSA(normalize=normalize, impl=impl)
        assert m.attention(x).eq(1).all()
        torch.testing.assert_close(m(x), x)
        torch.testing.assert_close(m.pool(x), x.flatten(1))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_layouts_batch_one_and_empty(impl):
    m = PFSA(impl=impl)
    x = torch.rand(3, 8, 6, 5, dtype=torch.float64)
    expected, expected_pool = m(x), m.pool(x)
    x_cl = x.to(memory_format=torch.channels_last)
    y = m(x_cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(m.pool(x_cl), expected_pool)
    _, g = grads(m, x_cl, pool=True)
    assert g.is_contiguous(memory_format=torch.channels_last)
    wide = torch.rand(3, 8, 6, 10, dtype=torch.float64)
    torch.testing.assert_close(m(wide[..., ::2]), m(wide[..., ::2].contiguous()))
    torch.testing.assert_close(m.pool(wide[..., ::2]), m.pool(wide[..., ::2].contiguous()))
    torch.testing.assert_close(m(x[:1]), expected[:1])
    for pool in (False, True):
        y, g = grads(m, x[:0], pool)
        assert y.shape == ((0, 8) if pool else (0, 8, 6, 5)) and g.shape == (0, 8, 6, 5)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("normalize", ["sum", "softmax"])
def test_bf16_autocast_large_activations(impl, normalize):
    m = PFSA(normalize=normalize, impl=impl)
    x = (torch.rand(4, 64, 16, 8) * 400).requires_grad_(True)  # post-ReLU activations in the hundreds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, p = m(x), m.pool(x)
        yb = m(x.bfloat16())
    assert y.dtype == p.dtype == torch.float32 and yb.dtype == torch.bfloat16
    (y.sum() + p.sum() + yb.float().sum()).backward()
    for t in (y, p, yb, x.grad):
        assert torch.isfinite(t.float()).all()
    # The bf16 path computes the map in float32: besides that map's own float32 rounding, only its
    # cast to bf16 and the product x * a are rounded (u_bf16 each, element by element). Against the
    # exact output on the same bf16 input, relative: 2 u_bf16 + u_bf16^2, plus the float32 map's
    # error: the channel means (C - 1 sums of terms >= 0, a division: C u32 relative), the map
    # (N - 1 sums, a division, with softmax an exp: N + 2 u32); softmax turns the means' absolute
    # error C u32 |m| into a relative one of the weights, twice that at most: 2 C u32 max |m|.
    # Softmax over means in the hundreds underflows: weights below the smallest normal number
    # (float32 and bf16 share it) may become subnormal or zero, an absolute error up to `tiny` in
    # the float32 map and again in its bf16 cast, times |x| in the product, and once more in the
    # product's own result: (2 max |x| + 1) tiny, 1e-35 here against outputs of order 1 to 100.
    xb = x.detach().bfloat16()
    exact = m(xb.double())
    c, n = x.shape[1], x.shape[2] * x.shape[3]
    means = xb.double().mean(1).abs().max().item()
    u = UNIT_ROUNDOFF[torch.bfloat16]
    rtol = 2 * u + u * u + (c + n + 2) * U32 + (2 * c * U32 * means if normalize == "softmax" else 0)
    atol = (2 * xb.double().abs().max().item() + 1) * torch.finfo(torch.bfloat16).tiny
    torch.testing.assert_close(yb.double(), exact, rtol=rtol, atol=atol)


def test_registry_constructs_runs_and_backpropagates():
    m = ra.create_attention("pfsa", 16, normalize="softmax")
    assert isinstance(m, PFSA) and m.normalize == "softmax"
    x = torch.rand(2, 16, 8, 4, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ra.create_attention("pfsa", 16, (8, 4)).pool(x).shape == (2, 16)


def test_impl_is_switchable_and_validated():
    m = PFSA()
    m.impl = "reference"
    assert m.impl == "reference" and "reference" in repr(m)
    with pytest.raises(ValueError, match="impl must be one of"):
        m.impl = "fast"
    with pytest.raises(ValueError, match="impl must be one of"):
        PFSA(impl="cuda")


def test_validation_errors():
    with pytest.raises(ValueError, match="normalize must be one of .* got 'l1'"):
        PFSA(normalize="l1")
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        PFSA(eps=0)
    with pytest.raises(TypeError, match="eps must be a float, got str"):
        PFSA(eps="1e-6")
    m = PFSA()
    with pytest.raises(ValueError, match=r"expects a 4-D input .* got shape \(2, 3, 4\)"):
        m(torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        m.pool(torch.ones(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        m.attention([[1.0]])
