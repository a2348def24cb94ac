"""ra.resize_attention on wrapped models and presets: keys, shapes, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from torchvision.models.swin_transformer import SwinTransformer

import reid_attention as ra
from reid_attention._checks import SITE_ATTR

# Weights whose input axis is indexed by position: the only tensors that change shape.
POSITIONAL = ("gg_spatial.0.weight", "theta_channel.0.weight", "phi_channel.0.weight", "gx_channel.0.weight")


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_preset_trained_at_256x128_runs_at_384x128():
    with torch.device("meta"):
        net = ra.presets.rga_resnet50()  # RGA-SC after layer1..4, built for 256x128
    before = shapes(net)
    x = torch.empty(2, 3, 384, 128, device="meta")
    message = r"RGA at site 'layer1' built for feat_size \(64, 32\), got input 96x32; " \
              r"build the model for this input size \(input_size=.*ra.resize_attention"
    with pytest.raises(ValueError, match=message):
        net(x)
    assert ra.resize_attention(net, (384, 128)) is net
    rgas = {name: m for name, m in net.named_modules() if isinstance(m, ra.RGA)}
    assert [m.feat_size for m in rgas.values()] == [(96, 32), (48, 16), (24, 8), (24, 8)]
    assert [getattr(m, SITE_ATTR) for m in rgas.values()] == ["layer1", "layer2", "layer3", "layer4"]
    after = shapes(net)
    assert list(after) == list(before)  # the same keys, in the same order
    assert [k for k in after if after[k] != before[k]] == [k for k in after if k.endswith(POSITIONAL)]
    assert net.layer1.attention.gg_spatial[0].weight.shape == (256, 2 * 96 * 32, 1, 1)
    with torch.no_grad():
        assert net(x).shape == (2, 2048)


def test_apnet_s_preset_resizes_every_stripe_agent():
    with torch.device("meta"):
        net = ra.presets.apnet_resnet50(variant="s")  # 384x192
    ra.resize_attention(net, (256, 128), mode="nearest")
    assert [m.feat_size for m in net.modules() if isinstance(m, ra.APNetS)] == [
        (64, 32), (64, 32), (32, 16), (16, 8), (16, 8)]
    with torch.no_grad():
        assert net(torch.empty(2, 3, 256, 128, device="meta")).shape == (2, 2048)


def small_model(seed=0):
    """ResNet-18 with RGA-SC, APNet-S and PFSA (kinds mixed) built for 64x32 images."""
    torch.manual_seed(seed)
    model = tvm.resnet18(weights=None)
    ra.insert_attention(model, "rga_sc", sites=["layer1", "layer2"], input_size=(64, 32))
    ra.insert_attention(model, "apnet_s", sites="layer3", input_size=(64, 32))
    ra.insert_attention(model, "pfsa", sites="layer4", input_size=(64, 32))
    return model.eval()


def test_checkpoints_before_and_after_resizing_load():
    trained = small_model(seed=0)
    checkpoint = copy.deepcopy(trained.state_dict())  # trained at 64x32
    ra.resize_attention(trained, (96, 48))
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        expected = trained(x)
    assert torch.isfinite(expected).all()
    # the 64x32 checkpoint loads into the model as built, which then runs at 96x48 ...
    fresh = small_model(seed=1)
    fresh.load_state_dict(checkpoint)  # strict
    ra.resize_attention(fresh, (96, 48))
    # ... and the resized model's checkpoint loads into another model resized alike
    other = ra.resize_attention(small_model(seed=2), (96, 48))
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)
        torch.testing.assert_close(other(x), expected)


def test_resized_layers_are_the_layers_resized_to_their_new_maps():
    model = small_model()
    old = copy.deepcopy(model.layer1.attention)
    ra.resize_attention(model, (128, 64), mode="nearest")  # layer1: 16x8 -> 32x16
    expected = old.resized((32, 16), mode="nearest").state_dict()
    for key, value in model.layer1.attention.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert model.layer3.attention.feat_size == (8, 4)
    assert not model.layer1.attention.training  # the mode is kept
    kept = model.layer2.attention
    ra.resize_attention(model, (128, 64))  # already built for these maps: kept as they are
    assert model.layer2.attention is kept


def test_nhwc_adapter_layers_are_resized():
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                           window_size=[2, 2]).eval()
    ra.insert_attention(swin, "rga_s", sites=["features.1"], input_size=(64, 64))
    ra.resize_attention(swin, (64, 32))
    layer = swin.features[1].attention.attention
    assert isinstance(layer, ra.RGA) and layer.feat_size == (16, 8)
    assert getattr(layer, SITE_ATTR) == "features.1"
    with torch.no_grad():
        assert swin(torch.randn(2, 3, 64, 32)).shape == (2, 1000)


def test_models_without_size_tied_layers_and_errors():
    model = ra.insert_attention(tvm.resnet18(weights=None), "apnet_c", input_size=(64, 32))
    before = model.state_dict()
    assert ra.resize_attention(model, (96, 32)) is model  # nothing tied to the size
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ra.resize_attention(None, (64, 32))
    wrapped = small_model()
    with pytest.raises(ValueError, match="input_size"):
        ra.resize_attention(wrapped, (64, 32, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        ra.resize_attention(wrapped, (96, 48), mode="cubic")
    assert wrapped.layer1.attention.feat_size == (16, 8)  # nothing replaced
