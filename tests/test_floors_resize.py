"""RGA / APNet-S anywhere: width floors (``min_width``) and resolution transfer (``resized``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FORWARD_TOL,
    MIN_GATE_SPREAD,
    assert_same_step,
    calibrate_bn,
    gate_spread,
    randomize_bn,
    run_step,
    twins,
)
from hypothesis import given
from hypothesis import strategies as st

import reid_attention as ra

RGA_KINDS = {"rga_s": (True, False), "rga_c": (False, True), "rga_sc": (True, True)}
PAPER_SITES = [(256, (64, 32)), (512, (32, 16)), (1024, (16, 8)), (2048, (16, 8))]


def rga(kind, channels, feat_size, **kw):
    spatial, channel = RGA_KINDS[kind]
    return ra.RGA(channels, feat_size, spatial=spatial, channel=channel, **kw)


def size_tied(kind, channels, feat_size, **kw):
    return ra.APNetS(channels, feat_size, **kw) if kind == "apnet_s" else rga(kind, channels, feat_size, **kw)


# ----------------------------------------------------------------------------------- floors


@pytest.mark.parametrize("channels,feat_size", PAPER_SITES)
def test_paper_sites_keep_the_official_widths(channels, feat_size):
    with torch.device("meta"):
        m = ra.RGA(channels, feat_size)
    n = feat_size[0] * feat_size[1]
    assert m.widths["spatial"] == (channels // 8, n // 8, (1 + n // 8) // 8)
    assert m.widths["channel"] == (n // 8, channels // 8, (1 + channels // 8) // 8)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["gg_spatial.0.weight"] == (n // 8, 2 * n, 1, 1)
    assert shapes["W_channel.0.weight"] == ((1 + channels // 8) // 8, 1 + channels // 8, 1, 1)


def test_min_width_floors_every_inner_width():
    m = ra.RGA(16, (4, 2), min_width=3)  # formulas: 16 // 8 = 2, 8 // 8 = 1, (1 + 1) // 8 = 0
    assert m.widths["spatial"] == (3, 3, 3) and m.widths["channel"] == (3, 3, 3)
    assert ra.RGA(64, (16, 8), min_width=3).widths["spatial"] == (8, 16, 3)
    for agent in ra.APNetS(16, (8, 2), min_width=2).agents():
        assert min(agent.widths["spatial"]) >= 2


SMALL = [(1, (1, 1)), (1, (5, 3)), (3, (1, 1)), (7, (2, 3)), (64, (8, 4)), (48, (7, 7))]


@pytest.mark.parametrize("kind", [*RGA_KINDS, "apnet_s"])
@pytest.mark.parametrize("channels,feat_size", SMALL)
@pytest.mark.parametrize("train", [True, False])
def test_small_maps_and_few_channels_build_and_match(kind, channels, feat_size, train):
    torch.manual_seed(0)
    levels = dict(levels=1 if feat_size[0] % 2 else 2) if kind == "apnet_s" else {}
    m = randomize_bn(size_tied(kind, channels, feat_size, **levels).double()).train(train)
    x = torch.rand(3, channels, *feat_size, dtype=torch.float64) + 0.1
    ref, fused = twins(m)
    a, b = run_step(ref, x), run_step(fused, x)
    assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
    assert_same_step(a, b)


def test_registry_apnet_s_picks_levels_that_divide_the_height():
    assert ra.create_attention("apnet_s", 32, (7, 7)).num_levels == 1
    assert ra.create_attention("apnet_s", 32, (8, 4)).num_levels == 2
    assert ra.create_attention("apnet_s", 32, (8, 4), levels=3).num_levels == 3
    with pytest.raises(ValueError, match=r"H = 6 is not divisible by 4; levels 1..2 work at this size"):
        ra.create_attention("apnet_s", 32, (6, 4), levels=3)


# ----------------------------------------------------------------------------------- resized


def _up(t: torch.Tensor, k: int) -> torch.Tensor:
    return F.interpolate(t, scale_factor=k, mode="nearest")


@pytest.mark.slow
@given(
    kind=st.sampled_from([*RGA_KINDS, "apnet_s"]),
    factor=st.integers(1, 3),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    channels=st.integers(1, 12),
    impl=st.sampled_from(["reference", "fused"]),
    seed=st.integers(0, 2**16),
)
def test_nearest_integer_resize_is_exact(kind, factor, height, width, channels, impl, seed):
    """resized(upsample(x)) == upsample(original(x)): eval mode (outputs, and the input gradient
    summed over each upsampled block), training mode (outputs)."""
    height = 2 * height if kind == "apnet_s" else height
    torch.manual_seed(seed)
    m = randomize_bn(size_tied(kind, channels, (height, width), impl=impl).double(), seed)
    big = m.resized((factor * height, factor * width), mode="nearest")
    assert big.impl == impl and big.feat_size == (factor * height, factor * width)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, channels, height, width, generator=g, dtype=torch.float64) + 0.05
    for train in (False, True):
        m.train(train), big.train(train)
        expected = _up(m(x), factor)
        # the same sums over factor^2 as many positions, with weights scaled by 1 / factor^2
        torch.testing.assert_close(big(_up(x, factor)), expected, **FORWARD_TOL)


def test_resize_eval_logits_vary_so_the_exactness_is_not_hollow():
    """With default init and data-calibrated statistics the gates are not constant (seeded: over
    seeds 0-299 the log-gate spread is >= 0.046, above MIN_GATE_SPREAD; a single momentum-0.1
    training pass, as before, left the running statistics mostly at their init and the gate
    nearly constant for half the seeds)."""
    torch.manual_seed(0)
    m = ra.RGA(16, (4, 4), spatial=True, channel=False).double()
    x = torch.rand(4, 16, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.05
    calibrate_bn(m, x).eval()
    assert gate_spread(m, x)[0] >= MIN_GATE_SPREAD


@pytest.mark.parametrize("kind", [*RGA_KINDS, "apnet_s"])
def test_resized_keeps_keys_widths_and_the_original(kind):
    m = size_tied(kind, 32, (8, 4), impl="reference").train(False).double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    big = m.resized((12, 6))
    assert list(big.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched
    assert (big.impl, big.training, big.feat_size) == ("reference", False, (12, 6))
    positional = ("gg_spatial.0.weight", "theta_channel.0.weight", "phi_channel.0.weight",
                  "gx_channel.0.weight")
    for key, value in big.state_dict().items():
        assert value.dtype == before[key].dtype
        if not key.endswith(positional):
            assert value.shape == before[key].shape, key
    agents = big.agents() if kind == "apnet_s" else [big]
    olds = m.agents() if kind == "apnet_s" else [m]
    assert [a.widths for a in agents] == [a.widths for a in olds]
    y = big(torch.rand(2, 32, 12, 6, dtype=torch.float64))
    assert y.shape == (2, 32, 12, 6) and torch.isfinite(y).all()


def test_resized_scales_sums_over_positions():
    m = ra.RGA(8, (4, 4), channel=False)
    w = m.gg_spatial[0].weight
    half = m.resized((8, 8), mode="bilinear").gg_spatial[0].weight
    assert half.shape == (w.shape[0], 128, 1, 1)
    # the bilinear resample of each raster keeps its mean; the N / N' scale keeps its sum
    torch.testing.assert_close(half.view(w.shape[0], 2, 64).sum(2), w.view(w.shape[0], 2, 16).sum(2))
    shrunk = m.resized((2, 2), mode="area").gg_spatial[0].weight
    torch.testing.assert_close(shrunk.view(w.shape[0], 2, 4).sum(2), w.view(w.shape[0], 2, 16).sum(2))


def test_resized_validation():
    with pytest.raises(ValueError, match="mode must be one of"):
        ra.RGA(8, (4, 4)).resized((8, 8), mode="linear")
    with pytest.raises(TypeError, match="got the int 16"):
        ra.RGA(8, (4, 4)).resized(16)
    with pytest.raises(ValueError, match=r"APNetS.resized level 2 .* H = 5 is not divisible by 2"):
        ra.APNetS(8, (4, 4)).resized((5, 4))


def test_size_mismatch_points_at_the_remedy():
    with pytest.raises(ValueError, match=r"built for feat_size \(4, 4\), got input 8x8; .*resize_attention"):
        ra.RGA(8, (4, 4))(torch.rand(2, 8, 8, 8))
