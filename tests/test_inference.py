"""fold_batchnorm_scales (deprecated): same eval function, original untouched, state_dict contract
kept, and the deprecation said on every call."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    FORWARD_TOL,
    KINDS,
    assert_gates_vary,
    build,
    kind_impl_params,
    make_input,
    randomize_bn,
)
from torch import nn

from reid_attention.inference import fold_batchnorm_scales

# Deprecated: every call warns (test_fold_is_deprecated); the other tests check the function.
pytestmark = pytest.mark.filterwarnings("ignore:fold_batchnorm_scales is deprecated:DeprecationWarning")

# float64: folding reorders a few multiplications (helpers.FORWARD_TOL: the modelled rounding of
# both forwards uses <= 0.5% of it, folded or not)
TOL = FORWARD_TOL


def _is_shift_only(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bool(
        (bn.weight == 1).all() and (bn.running_mean == 0).all() and (bn.running_var == 1 - bn.eps).all()
    )


@pytest.mark.parametrize("kind,impl", kind_impl_params())
def test_folded_equals_eval_module(kind, impl):
    module = build(kind, impl).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    folded = fold_batchnorm_scales(module)
    assert not folded.training and module.training, "a folded copy in eval mode; the original keeps its mode"
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"fold_batchnorm_scales changed the original's {key}"
    x = make_input(3)
    assert_gates_vary(kind, folded, x)  # a constant gate would hide a wrong fold upstream of it
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module.eval()(x), **TOL)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("rga") or k == "apnet_s"])
def test_every_rga_batchnorm_is_folded(kind):
    folded = fold_batchnorm_scales(build(kind))
    bns = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(_is_shift_only(bn) for bn in bns)


@pytest.mark.parametrize("kind", KINDS)
def test_folded_paths_agree_and_fold_is_idempotent(kind):
    folded = fold_batchnorm_scales(build(kind))
    x = make_input(2, seed=1)
    with torch.no_grad():
        fused_out = folded(x)
        folded.impl = "reference"
        torch.testing.assert_close(folded(x), fused_out, **TOL)
        torch.testing.assert_close(fold_batchnorm_scales(folded)(x), fused_out, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_folded_state_dict_loads_into_unfolded_module(kind):
    """Same keys and shapes; loaded into a plain module the eval function is unchanged."""
    module = build(kind).eval()
    folded_state = fold_batchnorm_scales(module).state_dict()
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    assert {k: v.shape for k, v in folded_state.items()} == shapes
    fresh = build(kind, seed=1).eval()
    fresh.load_state_dict(folded_state, strict=True)
    x = make_input(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), **TOL)


def _conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Sequential:
    return randomize_bn(nn.Sequential(conv, bn, nn.ReLU()), seed=3).double()


@pytest.mark.parametrize(
    "seq,shape",
    [
        pytest.param(
            lambda: _conv_bn(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5),
            id="3x3-bias-groups",
        ),
        pytest.param(
            lambda: _conv_bn(nn.Conv1d(4, 6, 1, bias=False), nn.BatchNorm1d(6)), (2, 4, 7), id="conv1d"
        ),
    ],
)
def test_generic_conv_bn_pairs_fold(seq, shape):
    seq = seq()
    folded = fold_batchnorm_scales(seq)
    assert _is_shift_only(folded[1])
    assert folded[0].bias is None or (folded[0].bias == 0).all()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), seq.eval()(x), **TOL)


@pytest.mark.parametrize(
    "seq",
    [
        pytest.param(lambda: _conv_bn(nn.ConvTranspose2d(4, 4, 1), nn.BatchNorm2d(4)), id="transposed"),
        pytest.param(lambda: _conv_bn(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)), id="no-affine"),
        pytest.param(
            lambda: _conv_bn(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), id="no-stats"
        ),
    ],
)
def test_unfoldable_pairs_are_left_alone(seq):
    seq = seq()
    folded = fold_batchnorm_scales(seq)
    for (key, value), original in zip(folded.state_dict().items(), seq.state_dict().values()):
        assert torch.equal(value, original), key


def test_meta_device_module_folds():
    folded = fold_batchnorm_scales(build("rga_sc").to("meta"))
    assert folded(make_input(2).to("meta")).shape == (2, 64, 16, 8)


@pytest.mark.filterwarnings("default")
def test_fold_is_deprecated():
    with pytest.warns(DeprecationWarning, match="does not speed up inference"):
        fold_batchnorm_scales(build("rga_s"))
