"""ra.presets: the RGA and APNet ResNet-50 networks (paper configurations on the meta device,
forward/backward and weight loading on small real inputs)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
import torchvision.models as tvm
from torch import nn

import reid_attention as ra
from reid_attention.presets import ReIDResNet

SMALL = (64, 32)  # maps 16x8, 8x4, 4x2, 4x2 (last stride 1)
SMALL_RGA = dict(spatial_ratio=2, down_ratio=4)  # ratios that leave channels at those sizes


def attention_modules(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def test_rga_resnet50_paper_configuration():
    with torch.device("meta"):
        model = ra.presets.rga_resnet50()
    rgas = attention_modules(model, ra.RGA)
    assert list(rgas) == ["layer1.attention", "layer2.attention", "layer3.attention", "layer4.attention"]
    assert [m.feat_size for m in rgas.values()] == [(64, 32), (32, 16), (16, 8), (16, 8)]
    assert [m.channels for m in rgas.values()] == [256, 512, 1024, 2048]
    assert all(m.spatial and m.channel for m in rgas.values())
    assert isinstance(model, ReIDResNet) and model.num_features == 2048
    assert model.layer4[0].conv2.stride == (1, 1)  # last stride 1
    # Keys: torchvision's ResNet-50 (less fc) plus the official RGA_Module names per site.
    with torch.device("meta"):
        torchvision_keys = [k for k in tvm.resnet50().state_dict() if not k.startswith("fc.")]
        rga_keys = list(ra.RGA(256, (64, 32)).state_dict())
    keys = list(model.state_dict())
    assert [k for k in keys if ".attention." not in k] == torchvision_keys
    assert [k[len("layer1.attention.") :] for k in keys if k.startswith("layer1.attention.")] == rga_keys


@pytest.mark.parametrize("spatial, channel", [(True, False), (False, True)])
def test_rga_resnet50_single_axis(spatial, channel):
    with torch.device("meta"):
        model = ra.presets.rga_resnet50(spatial=spatial, channel=channel, channel_ratio=4)
    for m in attention_modules(model, ra.RGA).values():
        assert (m.spatial, m.channel) == (spatial, channel)
    first = model.layer1.attention
    if spatial:
        assert first.gx_spatial[0].out_channels == 256 // 4 and not hasattr(first, "gx_channel")
    else:
        assert first.gg_channel[0].out_channels == 256 // 4 and not hasattr(first, "gx_spatial")


def test_apnet_resnet50_paper_configuration():
    with torch.device("meta"):
        model = ra.presets.apnet_resnet50()
    apnets = attention_modules(model, ra.APNetC)
    assert list(apnets) == ["maxpool.attention"] + [f"layer{i}.attention" for i in range(1, 5)]
    assert [m.channels for m in apnets.values()] == [64, 256, 512, 1024, 2048]
    assert all(m.num_levels == 2 for m in apnets.values())
    assert all(m.se.fc[0].out_features == 8 for m in apnets.values())  # official SE width 8
    assert isinstance(model.relu, nn.Identity)  # official stem: conv1-bn1-maxpool
    assert "maxpool.attention.se.fc.0.weight" in model.state_dict()
    assert "maxpool.attention.split.0.norm.running_mean" in model.state_dict()

    with torch.device("meta"):
        relu = ra.presets.apnet_resnet50(stem_relu=True, levels=1)
    assert isinstance(relu.relu, nn.ReLU)
    assert all(len(m.split) == 0 for m in attention_modules(relu, ra.APNetC).values())


def test_apnet_level_is_the_deprecated_name_of_levels():
    """design.md's ``level=2`` keeps working for one release, with a DeprecationWarning; ``levels``
    (the layers' name) is the argument now, and the two cannot disagree."""
    with torch.device("meta"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            new = ra.presets.apnet_resnet50(levels=1)
        assert not [w for w in seen if "deprecated" in str(w.message)]  # the new name warns about nothing
        assert all(m.num_levels == 1 for m in attention_modules(new, ra.APNetC).values())
        deprecated = r"apnet_resnet50\(level=\.\.\.\) is deprecated.*pass levels="
        with pytest.warns(DeprecationWarning, match=deprecated):
            old = ra.presets.apnet_resnet50(level=1)
        assert all(m.num_levels == 1 for m in attention_modules(old, ra.APNetC).values())
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="pass levels= through"):
            ra.presets.apnet_resnet50(variant="s", level=2, input_size=(100, 50))
        with pytest.raises(TypeError, match="levels=3 and level=1: pass levels only"):
            ra.presets.apnet_resnet50(levels=3, level=1)


def test_apnet_resnet50_spatial_variant():
    with torch.device("meta"):
        model = ra.presets.apnet_resnet50(variant="s")
    apnets = attention_modules(model, ra.APNetS)
    assert [m.feat_size for m in apnets.values()] == [(96, 48), (96, 48), (48, 24), (24, 12), (24, 12)]
    assert all(m.num_levels == 2 for m in apnets.values())


def test_presets_run_forward_and_backward():
    torch.manual_seed(0)
    for model in (
        ra.presets.rga_resnet50(input_size=SMALL, **SMALL_RGA),
        ra.presets.apnet_resnet50(input_size=SMALL),
    ):
        x = torch.randn(2, 3, *SMALL)
        features = model.train()(x)
        assert features.shape == (2, 2048)
        features.square().mean().backward()
        attention = [p for n, p in model.named_parameters() if ".attention." in n and p.requires_grad]
        assert attention and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention)
        with torch.no_grad():
            maps = model.eval().forward_features(x)
            assert maps.shape == (2, 2048, 4, 2)
            torch.testing.assert_close(model(x), maps.mean((2, 3)))


def test_weights_from_a_torchvision_state_dict():
    torch.manual_seed(0)
    source = tvm.resnet50(weights=None).state_dict()  # fc.* included: ignored
    model = ra.presets.apnet_resnet50(input_size=SMALL, weights=source)
    for key, value in model.state_dict().items():
        if ".attention." not in key:
            assert torch.equal(value, source[key]), key
    # A full preset state_dict (e.g. a converted official checkpoint) round-trips, attention included.
    again = ra.presets.apnet_resnet50(input_size=SMALL, weights=model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_weights_errors(monkeypatch):
    with torch.device("meta"):
        source = tvm.resnet50().state_dict()
        with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
            ra.presets.rga_resnet50(weights={**source, "head.weight": torch.zeros(1)})
        partial = {k: v for k, v in source.items() if not k.startswith("layer3.2.")}
        with pytest.raises(ValueError, match=r"missing backbone keys \['layer3.2.conv1.weight'"):
            ra.presets.rga_resnet50(weights=partial)
    with pytest.raises(TypeError, match="weights must be None, a torchvision weights enum"):
        ra.presets.apnet_resnet50(weights=3)
    # A torchvision enum goes to torchvision (no download here: the builder is replaced).
    seen, real_resnet50 = [], tvm.resnet50

    def fake_resnet50(*, weights):
        seen.append(weights)
        with torch.device("meta"):
            return real_resnet50(weights=None)

    monkeypatch.setattr(torchvision.models, "resnet50", fake_resnet50)
    ra.presets.rga_resnet50(weights=tvm.ResNet50_Weights.IMAGENET1K_V2)
    assert seen == [tvm.ResNet50_Weights.IMAGENET1K_V2]


def test_argument_errors():
    with pytest.raises(ValueError, match="spatial=True, channel=True or both"):
        ra.presets.rga_resnet50(spatial=False, channel=False)
    with pytest.raises(ValueError, match="variant must be 'c' or 's', got 'x'"):
        ra.presets.apnet_resnet50(variant="x")
    with pytest.raises(TypeError, match="stem_relu must be a bool"):
        ra.presets.apnet_resnet50(stem_relu="no")


def test_build_errors_name_the_preset_argument():
    with torch.device("meta"):
        ra.presets.rga_resnet50(input_size=SMALL)  # 8x4 and 4x2 maps: the width floors build them
        with pytest.raises(ValueError, match=r"site 'layer1'.*channel_ratio must be >= 1.*"
                                             r"pass channel_ratio= through ra.presets.rga_resnet50"):
            ra.presets.rga_resnet50(channel_ratio=0)
        # 100x50 input: the stem's map is 25x13, and 25 rows make no two stripes
        with pytest.raises(ValueError, match=r"site 'maxpool' \(64 channels, feat_size \(25, 13\)\).*"
                                             r"pass levels= through ra.presets.apnet_resnet50"):
            ra.presets.apnet_resnet50(variant="s", levels=2, input_size=(100, 50))


def test_norm_layer_reaches_backbone_and_attention():
    from torchvision.ops import FrozenBatchNorm2d

    with torch.device("meta"):
        for net in (ra.presets.rga_resnet50(norm_layer=FrozenBatchNorm2d),
                    ra.presets.apnet_resnet50(variant="s", norm_layer=FrozenBatchNorm2d)):
            assert not [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert isinstance(net.bn1, FrozenBatchNorm2d)
