"""ra.convert on synthetic official checkpoints.

The official networks are rebuilt here from torchvision and torch.nn alone (no reid_attention
code), with the official module names (so their state_dicts have the official keys and shapes)
and an independent forward that follows the official code:
microsoft/Relation-Aware-Global-Attention-Networks (ResNet50_RGA_Model with RGA_Branch, its
RGA_Module from tests/official_rga.py) and CHENGY12/APNet (Baseline, level 2, with SELayer /
SAMS / BN2d). A converted checkpoint must load strictly into the preset and give the same
features.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from helpers import ROUNDING_FACTOR, U32, U64, calibrate_bn, randomize_bn, relative_error, rounding_envelope
from official_rga import OfficialRGAModule
from torch import nn

import reid_attention as ra

SIZE = (64, 32)
# At 64x32 input the official default ratios (8, 8, 8) leave zero widths at the 4x2 maps; these
# keep every width >= 1, so our floors stay inactive and the modules equal the official ones.
SPA_RATIO, DOWN_RATIO = 2, 4
RGA_RATIOS = dict(spatial_ratio=SPA_RATIO, down_ratio=DOWN_RATIO)
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet50_last_stride_1() -> nn.Module:
    """torchvision's ResNet-50 with layer4's stride 2 set to 1 (its conv2 and downsample), as in
    both official repositories."""
    resnet = tvm.resnet50(weights=None)
    resnet.layer4[0].conv2.stride = (1, 1)
    resnet.layer4[0].downsample[0].stride = (1, 1)
    return resnet


# --------------------------------------------------------------------------- official RGA


class OfficialRGABranch(nn.Module):
    """RGA_Branch: a ResNet-50 trunk with rga_att1..4 (official RGA_Module, built for each map)."""

    def __init__(self, spatial=True, channel=True):
        super().__init__()
        resnet = resnet50_last_stride_1()
        for name in TRUNK:
            self.add_module(name, getattr(resnet, name))
        h, w = SIZE
        for i, (channels, stride) in enumerate([(256, 4), (512, 8), (1024, 16), (2048, 16)], 1):
            rga = OfficialRGAModule(
                channels, (h // stride) * (w // stride), use_spatial=spatial, use_channel=channel,
                cha_ratio=8, spa_ratio=SPA_RATIO, down_ratio=DOWN_RATIO,
            )
            self.add_module(f"rga_att{i}", rga)

    def forward(self, x):
        for name in TRUNK[:4]:
            x = getattr(self, name)(x)
        for i in range(1, 5):
            x = getattr(self, f"rga_att{i}")(getattr(self, f"layer{i}")(x))
        return x


class OfficialRGAModel(nn.Module):
    """ResNet50_RGA_Model: backbone, feat_bn and cls (the head the converter drops)."""

    def __init__(self, **kw):
        super().__init__()
        self.backbone = OfficialRGABranch(**kw)
        self.feat_bn = nn.BatchNorm1d(2048)
        self.cls = nn.Linear(2048, 10, bias=False)

    def pooled(self, x):
        feat = self.backbone(x)
        return F.avg_pool2d(feat, feat.shape[2:]).flatten(1)


@pytest.fixture(scope="module")
def official_rga():
    """Random weights, BatchNorm statistics calibrated on a batch of images: with random ones the
    eval-mode gates are nearly constant at some sites, where a converter that mixed up the
    relation's sub-networks (theta_spatial <-> phi_spatial) would still give the same features.
    Float64: with live gates float32 rounding through this network reaches 2e-3 of the features'
    size (see RGA_FLOAT64_TOL)."""
    torch.manual_seed(0)
    model = randomize_bn(OfficialRGAModel()).double()
    calibrate_bn(model.backbone, images(4, seed=3))
    return model.eval()


def images(batch: int = 2, seed: int = 5, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_official_rga_gates_vary_at_every_site(official_rga):
    """The comparison below can fail: on its images every site's spatial logits vary across
    positions and its channel logits across channels (standard deviation, averaged over the
    batch, >= 0.1)."""
    sites = [getattr(official_rga.backbone, f"rga_att{i}") for i in range(1, 5)]
    for site in sites:
        site.recorded = []
    try:
        with torch.no_grad():
            official_rga.pooled(images())
        for i, site in enumerate(sites, 1):
            spatial, channel = site.recorded
            assert spatial.std((2, 3)).mean() >= 0.1, f"rga_att{i}: spatial logits nearly constant"
            assert channel.std(1).mean() >= 0.1, f"rga_att{i}: channel logits nearly constant"
    finally:
        for site in sites:
            site.recorded = None


@pytest.fixture(scope="module")
def rga_preset():
    return ra.presets.rga_resnet50(input_size=SIZE, **RGA_RATIOS).double().eval()


@pytest.mark.parametrize("form", ["model", "checkpoint", "data_parallel", "branch_only"])
def test_rga_checkpoint_forms_load_strictly_and_match(official_rga, rga_preset, form):
    state = official_rga.state_dict()
    checkpoint = {
        "model": state,
        "checkpoint": {"state_dict": state, "epoch": 600, "best_top1": 0.9},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
        "branch_only": official_rga.backbone.state_dict(),
    }[form]
    converted = ra.convert.from_official_rga(checkpoint)
    rga_preset.load_state_dict(converted, strict=True)
    x = images()
    with torch.no_grad():
        got, want = rga_preset(x), official_rga.pooled(x)
    assert relative_error(got, want) <= RGA_FLOAT64_TOL, relative_error(got, want)


# The RGA features are compared in float64, relative to their largest magnitude. This network is
# ill-conditioned: modelled float64 rounding (helpers.RoundingProbe(dtype=float64), 3 seeds, on
# these weights and images) moves the official features by 1.8e5 u64 and the preset's by 1.7e5
# u64 of max |features| (its float32 features are off by 2e-3: modelled float32 rounding 1.4e5
# u32, real 3.6e4 u32). Two float64 evaluations agree within ROUNDING_FACTOR times the sum:
# 1.4e6 u64 = 1.6e-10 (real: 6.6e3 u64). Largest magnitude, not elementwise: an element near 0
# carries the rounding of the large terms it sums.
RGA_FLOAT64_TOL = ROUNDING_FACTOR * (1.8e5 + 1.7e5) * U64


def test_rga_key_mapping(official_rga):
    converted = ra.convert.from_official_rga(official_rga.state_dict())
    assert torch.equal(
        converted["layer3.attention.gg_spatial.0.weight"], official_rga.backbone.rga_att3.gg_spatial[0].weight
    )
    assert torch.equal(converted["layer2.3.bn3.running_var"], official_rga.backbone.layer2[3].bn3.running_var)
    assert not any(k.startswith(("feat_bn", "cls", "backbone", "rga_att")) for k in converted)


def test_rga_spatial_only_checkpoint():
    official = OfficialRGAModel(channel=False)
    converted = ra.convert.from_official_rga(official.state_dict())
    preset = ra.presets.rga_resnet50(input_size=SIZE, channel=False, **RGA_RATIOS)
    preset.load_state_dict(converted, strict=True)


def test_rga_errors(official_rga):
    state = official_rga.state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        ra.convert.from_official_rga({**state, "backbone.extra.weight": torch.zeros(1)})
    partial = {k: v for k, v in state.items() if k != "backbone.layer3.1.conv2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['layer3.1.conv2.weight'\]"):
        ra.convert.from_official_rga(partial)
    no_att3 = {k: v for k, v in state.items() if "rga_att3" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['layer3.attention.theta_spatial.0.weight'"):
        ra.convert.from_official_rga(no_att3)
    with pytest.raises(TypeError, match="mapping"):
        ra.convert.from_official_rga([1, 2])
    with pytest.raises(TypeError, match="tensors"):
        ra.convert.from_official_rga({"conv1.weight": 1.0})


# --------------------------------------------------------------------------- official APNet


class SELayer(nn.Module):
    def __init__(self, channels, reduction):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):  # the gate, as the official layer returns it
        return self.fc(x.mean((2, 3))).view(*x.shape[:2], 1, 1)


class SAMS(nn.Module):
    """Split-attend-merge-stack with ``radix`` channel groups (official parameter names)."""

    def __init__(self, in_channels, channels, radix):
        super().__init__()
        width = max(in_channels * radix // 4, 32)
        self.radix = radix
        self.fc1 = nn.Conv2d(channels, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc2 = nn.Conv2d(width, channels * radix, 1)

    def forward(self, x):
        b, c = x.shape[:2]
        groups = x.view(b, self.radix, c // self.radix, *x.shape[2:])
        pooled = groups.sum(1).mean((2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.bn1(self.fc1(pooled))))
        weights = logits.view(b, self.radix, c // self.radix).softmax(1)
        return (groups * weights[..., None, None]).view_as(x)


class BN2d(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bottleneck2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bottleneck2(x)


class OfficialResNet(nn.Module):
    """The official backbone: conv1, bn1, maxpool (no ReLU module), layer1..4."""

    def __init__(self):
        super().__init__()
        resnet = resnet50_last_stride_1()
        for name in ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))


class OfficialBaseline(nn.Module):
    """Baseline(level): base, its stage views base_1..base_5 (the same modules again), and per
    stage k the SE gate att{k} (level >= 1), SAMS att_s{k} + BN{k} (level 2); head bottleneck,
    classifier."""

    def __init__(self, level=2):
        super().__init__()
        self.level = level
        self.base = OfficialResNet()
        children = list(self.base.children())
        for k, (lo, hi) in enumerate([(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)], 1):
            self.add_module(f"base_{k}", nn.Sequential(*children[lo:hi]))
        for k, (channels, reduction) in enumerate(
            [(64, 8), (256, 32), (512, 64), (1024, 128), (2048, 256)], 1
        ):
            self.add_module(f"att{k}", SELayer(channels, reduction))
            if level > 1:
                self.add_module(f"att_s{k}", SAMS(channels, channels // level, radix=level))
                self.add_module(f"BN{k}", BN2d(channels))
        self.bottleneck = nn.BatchNorm1d(2048)
        self.classifier = nn.Linear(2048, 10, bias=False)

    def global_feat(self, x):
        for k in range(1, 6):
            x = getattr(self, f"base_{k}")(x)
            if self.level > 1:
                x = getattr(self, f"BN{k}")(getattr(self, f"att_s{k}")(x))
            x = x * getattr(self, f"att{k}")(x)
        return x.mean((2, 3))


@pytest.fixture(scope="module")
def official_apnet():
    torch.manual_seed(1)
    return randomize_bn(OfficialBaseline()).eval()


class _GlobalFeat(nn.Module):
    def __init__(self, official):
        super().__init__()
        self.official = official

    def forward(self, x):
        return self.official.global_feat(x)


def apnet_preset(state, **kw) -> nn.Module:
    preset = ra.presets.apnet_resnet50(input_size=SIZE, **kw).eval()
    preset.load_state_dict(ra.convert.from_official_apnet(state), strict=True)
    return preset


def assert_float32_features_agree(preset, official, x, modelled=None):
    """The preset's float32 features equal the official network's up to float32 rounding: each is
    within ROUNDING_FACTOR times its modelled float32 rounding (helpers.RoundingProbe, float64 on
    the same weights and images; ~150 u32 of max |features| here) + 4 u32 of the exact features,
    relative to their largest magnitude. ``modelled``: the two modelled roundings, if known."""
    if modelled is None:
        modelled = apnet_modelled(preset, official, x)
    with torch.no_grad():
        got, want = preset(x), official.global_feat(x)
    error, bound = relative_error(got, want), sum(ROUNDING_FACTOR * m + 4 * U32 for m in modelled)
    assert error <= bound, f"features differ by {error:.3g} of their size, modelled rounding {modelled}"


def apnet_modelled(preset, official, x):
    """Worst modelled float32 rounding of the preset's and of the official features."""
    modelled = []
    for module in (preset, _GlobalFeat(official)):
        with torch.no_grad():
            m64 = copy.deepcopy(module).double()  # the float32 weights, exactly
            _, (worst,) = rounding_envelope(lambda m: (m(x.double()),), m64, (relative_error,))
        modelled.append(worst)
    return modelled


@pytest.fixture(scope="module")
def apnet_rounding(official_apnet):
    """(images, modelled rounding) for the official APNet: every checkpoint form below converts
    to the same weights, so one modelled rounding serves them all."""
    x = images(2, seed=6, dtype=torch.float32)
    return x, apnet_modelled(apnet_preset(official_apnet.state_dict()), official_apnet, x)


def test_apnet_has_every_backbone_tensor_twice(official_apnet):
    keys = official_apnet.state_dict()
    assert "base.layer4.2.conv3.weight" in keys and "base_5.0.2.conv3.weight" in keys
    assert "base_1.0.weight" in keys and "base_1.1.running_mean" in keys


@pytest.mark.parametrize("form", ["model", "checkpoint", "data_parallel"])
def test_apnet_checkpoint_forms_load_strictly_and_match(official_apnet, apnet_rounding, form):
    state = official_apnet.state_dict()
    checkpoint = {
        "model": state,
        "checkpoint": {"state_dict": state},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
    }[form]
    converted = ra.convert.from_official_apnet(checkpoint)
    preset = ra.presets.apnet_resnet50(input_size=SIZE).eval()
    preset.load_state_dict(converted, strict=True)
    x, modelled = apnet_rounding
    assert_float32_features_agree(preset, official_apnet, x, modelled)


def test_apnet_key_mapping(official_apnet):
    converted = ra.convert.from_official_apnet(official_apnet.state_dict())
    assert torch.equal(converted["maxpool.attention.se.fc.2.weight"], official_apnet.att1.fc[2].weight)
    assert torch.equal(converted["layer2.attention.split.0.fc1.bias"], official_apnet.att_s3.fc1.bias)
    assert torch.equal(
        converted["layer4.attention.split.0.norm.running_var"], official_apnet.BN5.bottleneck2.running_var
    )
    assert torch.equal(converted["layer1.attention.split.0.bn1.weight"], official_apnet.att_s2.bn1.weight)
    assert not any(k.startswith(("base", "bottleneck", "classifier", "att", "BN")) for k in converted)


def test_apnet_level_1_and_only_one_backbone_copy():
    torch.manual_seed(2)
    official = randomize_bn(OfficialBaseline(level=1)).eval()
    state = {k: v for k, v in official.state_dict().items() if not k.startswith("base.")}  # views only
    preset = apnet_preset(state, levels=1)
    assert_float32_features_agree(preset, official, images(2, seed=7, dtype=torch.float32))


def test_apnet_errors(official_apnet):
    state = official_apnet.state_dict()
    differing = dict(state)
    differing["base_2.0.0.conv1.weight"] = state["base_2.0.0.conv1.weight"] + 1
    with pytest.raises(ValueError, match="copies of 'layer1.0.conv1.weight' differ"):
        ra.convert.from_official_apnet(differing)
    with pytest.raises(ValueError, match="level 3"):
        ra.convert.from_official_apnet({**state, "att_ss1.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        ra.convert.from_official_apnet({**state, "head.weight": torch.zeros(1)})
    no_bn3 = {k: v for k, v in state.items() if not k.startswith("BN3.")}
    with pytest.raises(ValueError, match=r"missing keys \['layer2.attention.split.0.norm.weight'"):
        ra.convert.from_official_apnet(no_bn3)
    no_layer4 = {k: v for k, v in state.items() if not k.startswith(("base.layer4.", "base_5."))}
    with pytest.raises(ValueError, match=r"missing keys \['layer4.0.conv1.weight'"):
        ra.convert.from_official_apnet(no_layer4)
