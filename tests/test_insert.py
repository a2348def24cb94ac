"""list_sites / insert_attention / set_last_stride on torchvision backbones.

Structure checks (sites, keys, output shapes) run on meta-device models (no init, no arithmetic);
numerical checks run on small real models and inputs; torch.compile / torch.export / torch.fx on
a representative subset.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision.models as tvm
from insertion_checks import FAMILIES, KINDS, SIZES, check_default_insertion, check_real_step
from real_models import REAL
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import reid_attention as ra
from reid_attention._checks import SITE_ATTR, ArgumentError
from reid_attention.insert import NHWCAdapter, fx_leaf_modules


@pytest.fixture
def no_onednn(monkeypatch):
    """oneDNN takes seconds per forward of DenseNet's many convolution shapes on small CPU inputs
    (and PyTorch's own kernels are slow for depthwise convolutions: only DenseNet opts out)."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def build(builder, *, meta: bool = True, **kwargs) -> nn.Module:
    """A torchvision model, on the meta device when asked (RegNet computes widths from data)."""
    if meta and builder is not tvm.regnet_y_400mf:
        with torch.device("meta"):
            return builder(weights=None, **kwargs).eval()
    return builder(weights=None, **kwargs).eval()




class Scale(nn.Module):
    """Test attention: x * factor; records the shapes it saw (checks where and how it runs)."""

    def __init__(self, channels: int, feat_size, factor: float = 2.0) -> None:
        super().__init__()
        self.channels, self.feat_size = channels, tuple(feat_size)
        self.factor = nn.Parameter(torch.tensor(factor))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return x * self.factor


def scale_by(factor: float):
    return lambda channels, feat_size: Scale(channels, feat_size, factor)


def new_keys(model, original_keys):
    return sorted(set(model.state_dict()) - set(original_keys))


# --------------------------------------------------------------------------- list_sites


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stage_ends_per_family(family):
    builder, kwargs, size, expected = FAMILIES[family]
    model = build(builder, **kwargs)
    sites = ra.list_sites(model, size)
    assert [(s.name, s.channels, s.reduction, s.layout) for s in sites] == expected
    for site in sites:  # the map size follows the stride for the padded (size / 2^k) families
        if family != "inception":
            assert site.feat_size == (-(-size[0] // site.reduction), -(-size[1] // site.reduction))


def test_layout_and_size_follow_the_input():
    model = build(tvm.swin_t)
    small = {s.name: s for s in ra.list_sites(model, (64, 64))}
    large = {s.name: s for s in ra.list_sites(model, (128, 96))}
    assert small["features.1"].feat_size == (16, 16) and large["features.1"].feat_size == (32, 24)
    assert small["features.1"].layout == large["features.1"].layout == "NHWC"
    assert large["permute"].layout == "NCHW" and large["permute"].feat_size == (4, 3)


def test_all_maps_lists_inner_modules_but_not_shared_ones():
    model = build(tvm.resnet50)
    names = [s.name for s in ra.list_sites(model, (256, 128), stages_only=False)]
    assert "layer1.0.conv1" in names and "layer3.5.bn3" in names and "maxpool" in names
    assert "layer1.0.relu" not in names  # one ReLU module called three times per block
    assert "avgpool" not in names and "fc" not in names and "" not in names  # no map / not 4-D / root
    assert names.index("layer1.0.conv1") < names.index("layer2.0.conv1")  # execution order


def test_probe_leaves_the_model_alone():
    model = build(tvm.resnet18, meta=False)
    calls = []
    model.layer1.register_forward_hook(lambda *args: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    ra.list_sites(model, (64, 32))
    assert calls == [] and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_probe_failure_is_reported():
    with pytest.raises(ValueError, match="shape probe"):
        ra.list_sites(build(tvm.vit_b_16), (224, 112))  # ViT only takes its image size
    with pytest.raises(ValueError, match="VisionTransformer.*must take images of both sizes"):
        ra.insert_attention(build(tvm.vit_b_16), "rga_sc", input_size=(224, 224))
    with pytest.raises(TypeError, match="nn.Module"):
        ra.list_sites(lambda x: x, (64, 32))
    with pytest.raises(ValueError, match="input_size"):
        ra.list_sites(build(tvm.resnet18), (64, 32, 3))


# --------------------------------------------------------------------------- insertion, structure


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # BatchNorm's default num_batches_tracked
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_insert_keeps_keys_and_output_shape(family):
    builder, kwargs, size, expected = FAMILIES[family]
    model = build(builder, **kwargs)
    x = torch.empty(2, 3, *size, device=next(model.parameters()).device)
    with torch.no_grad():
        out_shape = model(x).shape
    original = model.state_dict()
    ra.insert_attention(model, "apnet_c", input_size=size)
    with torch.no_grad():
        assert model(x).shape == out_shape
    # Every original key is unchanged; the old checkpoint loads reporting only the new keys.
    assert set(original) <= set(model.state_dict())
    added = new_keys(model, original)
    result = model.load_state_dict(original, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) <= set(added)
    params = {n for n, _ in model.named_parameters() if n not in original}
    assert params and params <= set(result.missing_keys)
    # One APNet-C per default site (stage ends at stride >= 4), on the meta device like the model.
    wanted = [name for name, _, reduction, _ in expected if reduction >= 4]
    apnets = [n for n, m in model.named_modules() if isinstance(m, ra.APNetC)]
    assert len(apnets) == len(wanted)
    assert len({p.device for p in model.parameters()}) == 1


def test_insertion_mechanisms_and_names():
    resnet = build(tvm.resnet18)
    ra.insert_attention(resnet, "pfsa", sites=["maxpool", "layer1"], input_size=(64, 32))
    assert isinstance(resnet.layer1.attention, ra.ParameterFreeSpatialAttention)  # appended
    # indices unchanged: the sequence shows the original blocks only (Grad-CAM's layer1[-1] is a block)
    assert len(resnet.layer1) == 2 and isinstance(resnet.layer1[-1], tvm.resnet.BasicBlock)
    assert [n for n, _ in resnet.layer1.named_children()] == ["0", "1", "attention"]  # a real child
    assert type(resnet.maxpool).__name__ == "MaxPool2dWithAttention"  # class swapped
    assert isinstance(resnet.maxpool, nn.MaxPool2d) and isinstance(resnet.maxpool, ra.insert.AttentionSite)

    densenet = build(tvm.densenet121)
    ra.insert_attention(densenet, "pfsa", sites=["features.denseblock1"], input_size=(64, 64))
    names = list(densenet.features._modules)
    assert names[names.index("denseblock1") + 1] == "denseblock1_attention"  # sibling

    swin = ra.insert_attention(build(tvm.swin_t), "apnet_c", sites=["features.1"], input_size=(64, 64))
    assert isinstance(swin.features[1].attention, NHWCAdapter)
    assert "features.1.attention.attention.se.fc.0.weight" in swin.state_dict()


def test_site_rules_for_defaults_and_wrapped_models():
    model = build(tvm.resnet50)
    before = ra.list_sites(model, (256, 128))
    ra.insert_attention(model, "pfsa", input_size=(256, 128))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ra.ParameterFreeSpatialAttention)]
    assert wrapped == ["layer1.attention", "layer2.attention", "layer3.attention", "layer4.attention"]
    assert ra.list_sites(model, (256, 128)) == before  # inserted modules are not sites
    all_maps = [s.name for s in ra.list_sites(model, (256, 128), stages_only=False)]
    assert not any("attention" in n for n in all_maps)


def test_last_stride_one_merges_layer3_and_layer4():
    model = ra.set_last_stride(build(tvm.resnet50), 1)
    sites = {s.name: s for s in ra.list_sites(model, (256, 128), stages_only=False)}
    assert sites["layer3"].feat_size == sites["layer4"].feat_size == (16, 8)
    assert [s.name for s in ra.list_sites(model, (256, 128))][-1] == "layer4"
    assert "layer3" not in [s.name for s in ra.list_sites(model, (256, 128))]


def test_kwargs_reach_the_attention():
    model = ra.insert_attention(build(tvm.resnet18), "rga_s", sites="layer1", input_size=(64, 32),
                                spatial_ratio=4, impl="reference")
    rga = model.layer1.attention
    assert rga.feat_size == (16, 8) and rga.channels == 64 and rga.impl == "reference"
    assert rga.gg_spatial[0].out_channels == 16 * 8 // 4


# --------------------------------------------------------------------------- default insertion, every kind

# Their auxiliary heads run in training mode only and need about 299x299 input (Inception's 5x5
# conv meets a 4x1 map at 256x128): the backbones' own limit, not the attention's.
NO_AUX = {"googlenet": {"aux_logits": False}, "inception": {"aux_logits": False}}
# Inputs the backbone itself cannot take: Inception v3's unpadded convolutions leave a 6x2 map
# for a 3x3 kernel at 128x64 (the probe reports it; so does the plain model).
TOO_SMALL = {("inception", (128, 64)): r"shape probe could not run Inception3 on a \(B, 3, 128, 64\)"}


def size_id(size):
    return f"{size[0]}x{size[1]}"


@pytest.mark.filterwarnings("ignore:.*meta parameter")
@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_insertion_of_every_kind(family, size):
    """Every kind with the default sites on every family at the three input sizes (meta device)."""
    builder, kwargs, _, _ = FAMILIES[family]
    model = build(builder, **kwargs, **NO_AUX.get(family, {})).to("meta").train()
    if (family, size) in TOO_SMALL:
        for kind in KINDS:
            with pytest.raises(ValueError, match=TOO_SMALL[family, size]):
                ra.insert_attention(model, kind, input_size=size)
        return
    check_default_insertion(model, size)


@pytest.mark.parametrize("family", ["resnet18", "swin"])
def test_default_insertion_trains_for_real(family):
    """Real forward and backward of every kind at 128x64 (an NCHW and an NHWC family)."""
    torch.manual_seed(0)
    check_real_step(REAL[family][0](), (128, 64))


def test_probe_sees_through_inserted_attention():
    model = build(tvm.resnet50)
    before = ra.list_sites(model, (256, 128))
    ra.insert_attention(model, "rga_s", sites="layer1", input_size=(256, 128))
    assert ra.list_sites(model, (256, 128)) == before
    plain = build(tvm.resnet50)
    every_map = ra.list_sites(plain, (384, 128), stages_only=False)
    assert ra.list_sites(model, (384, 128), stages_only=False) == every_map  # at any size
    ra.insert_attention(model, "pfsa", sites="layer4", input_size=(256, 128))  # kinds mix
    assert isinstance(model.layer1.attention, ra.RGA)
    assert isinstance(model.layer4.attention, ra.ParameterFreeSpatialAttention)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['layer9'\]"):  # not hidden by a probe failure
        ra.insert_attention(model, "pfsa", sites="layer9", input_size=(256, 128))
    with torch.no_grad():
        assert model(torch.empty(2, 3, 256, 128, device="meta")).shape == (2, 1000)


def test_inserted_modules_carry_their_site():
    swin = ra.insert_attention(build(tvm.swin_t), "rga_s", sites=["features.1"], input_size=(64, 64))
    adapter = swin.features[1].attention
    assert getattr(adapter, SITE_ATTR) == getattr(adapter.attention, SITE_ATTR) == "features.1"
    assert fx_leaf_modules(swin) == [ra.RGA]
    message = r"RGA at site 'features.1' built for feat_size \(16, 16\), got input 8x8.*input_size=.*" \
              r"ra.resize_attention\(model, input_size\)"
    with pytest.raises(ValueError, match=message):
        swin(torch.empty(2, 3, 32, 32, device="meta"))


def single_site_model() -> nn.Module:
    """Images -> one 256-channel map at stride 8 (32x16 for 256x128 input), the only default site."""
    return nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 256, 1))


def rms(t):
    return t.square().mean().sqrt()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_as_inserted_keeps_the_map_scale(kind):
    """Eval mode, default init, a positive (2, 256, 32, 16) map: the output keeps at least 0.1x the
    input's RMS (the official PFSA map sums to 1 over 512 positions: about 0.002x)."""
    torch.manual_seed(0)
    model = ra.insert_attention(single_site_model(), kind, input_size=(256, 128))
    attention = model[1].attention.eval()
    x = torch.rand(2, 256, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rms(attention(x)) >= 0.1 * rms(x)


def test_official_pfsa_on_request():
    model = ra.insert_attention(single_site_model(), "pfsa", input_size=(256, 128), preserve_scale=False)
    assert not model[1].attention.preserve_scale
    x = torch.rand(2, 256, 32, 16, generator=torch.Generator().manual_seed(0))
    assert rms(model[1].attention(x)) < 0.01 * rms(x)


# --------------------------------------------------------------------------- insertion, numerics



@pytest.mark.parametrize("family", sorted(REAL))
def test_attention_runs_on_the_main_path(family, request):
    if family == "densenet":
        request.getfixturevalue("no_onednn")
    make, size = REAL[family]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        reference = model(x)
    sites = [s for s in ra.list_sites(model, size) if s.reduction >= 4]
    ra.insert_attention(model, scale_by(1.0), input_size=size)
    scales = [m for m in model.modules() if isinstance(m, Scale)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # identity attention: same function
        # Every attention ran once, on its site's map in (B, C, H, W) layout ...
        assert [m.seen for m in scales] == [[(2, s.channels, *s.feat_size)] for s in sites]
        # ... and what it returns is what flows on: a NaN there reaches every output.
        for m in scales:
            m.factor.fill_(float("nan"))
            assert model(x).isnan().all()
            m.factor.fill_(1.0)


def test_attention_output_feeds_the_rest_of_the_model():
    model = tvm.resnet18(weights=None).eval()
    ra.insert_attention(model, scale_by(0.0), sites=["layer4"], input_size=(64, 32))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 32))
    torch.testing.assert_close(out, model.fc.bias.expand(3, -1))  # a zeroed layer4 map -> fc bias


def test_nhwc_site_sees_nchw_and_keeps_its_layout():
    make, size = REAL["swin"]
    model = make().eval()
    ra.insert_attention(model, scale_by(1.0), sites=["features.1", "features.3"], input_size=size)
    captured = {}
    model.features[2].register_forward_pre_hook(lambda m, args: captured.update(shape=args[0].shape))
    model(torch.randn(2, 3, *size))
    assert model.features[1].attention.attention.seen == [(2, 16, 16, 16)]
    assert model.features[3].attention.attention.seen == [(2, 32, 8, 8)]
    assert captured["shape"] == (2, 16, 16, 16)  # (B, H, W, C) again for the patch merging


def test_checkpoint_round_trip_with_real_values():
    torch.manual_seed(0)
    plain = tvm.resnet18(weights=None)
    checkpoint = copy.deepcopy(plain.state_dict())
    torch.manual_seed(1)
    wrapped = ra.insert_attention(tvm.resnet18(weights=None), "apnet_c", input_size=(64, 32))
    result = wrapped.load_state_dict(checkpoint, strict=False)
    assert result.unexpected_keys == [] and all(".attention." in k for k in result.missing_keys)
    for key, value in checkpoint.items():
        assert torch.equal(wrapped.state_dict()[key], value)


def test_dtype_device_and_mode_follow_the_model():
    model = tvm.resnet18(weights=None).double().eval()
    ra.insert_attention(model, "apnet_c", sites=["layer2"], input_size=(64, 32))
    assert all(p.dtype == torch.float64 for p in model.layer2.attention.parameters())
    assert not model.layer2.attention.training
    assert model(torch.randn(2, 3, 64, 32, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- copies and tracing


def test_deepcopy_pickle_and_torch_save():
    model = tvm.resnet18(weights=None).eval()
    ra.insert_attention(model, "apnet_c", sites=["maxpool", "layer1"], input_size=(64, 32))
    x = torch.randn(2, 3, 64, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    with torch.no_grad():
        expected = model(x)
        for clone in copies:
            assert type(clone.maxpool) is type(model.maxpool)
            assert clone.maxpool.attention is not model.maxpool.attention
            torch.testing.assert_close(clone(x), expected)


def test_create_feature_extractor_sees_the_attention(no_onednn):
    model = tvm.densenet121(weights=None).eval()
    sites = ["features.pool0", "features.denseblock1"]
    ra.insert_attention(model, "apnet_c", sites=sites, input_size=(64, 64))
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for name in ("features.pool0.attention", "features.denseblock1_attention"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: maps.update({name: out}))
    with torch.no_grad():
        logits = model(x)
    leaves = fx_leaf_modules(model)
    assert leaves == [ra.APNetC]
    nodes = {"features.pool0": "pool0", "features.denseblock1_attention": "block1", "classifier": "logits"}
    extractor = create_feature_extractor(model, nodes, tracer_kwargs={"leaf_modules": leaves})
    with torch.no_grad():
        out = extractor(x)
    torch.testing.assert_close(out["pool0"], maps["features.pool0.attention"])
    torch.testing.assert_close(out["block1"], maps["features.denseblock1_attention"])
    torch.testing.assert_close(out["logits"], logits)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    ra.insert_attention(model, "rga_sc", sites=["maxpool", "layer1", "layer2"], input_size=(64, 32),
                        spatial_ratio=2, down_ratio=2)
    x = torch.randn(2, 3, 64, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture without codegen
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_export_dynamic_batch():
    torch.manual_seed(0)
    make, size = REAL["swin"]
    model = make().eval()
    ra.insert_attention(model, "apnet_c", input_size=size)  # NHWC adapters, an appended and a swapped site
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, *size),), dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


# --------------------------------------------------------------------------- errors


def test_unknown_site_lists_what_is_available():
    model = build(tvm.resnet18)
    with pytest.raises(ValueError, match=r"unknown site.*'layer5'.*stage ends: relu \(stride 2\), layer1"):
        ra.insert_attention(model, "pfsa", sites=["layer5"], input_size=(64, 32))
    with pytest.raises(ValueError, match="unknown site"):
        ra.insert_attention(model, "pfsa", sites=["layer1.0.relu"], input_size=(64, 32))  # called twice
    with pytest.raises(ValueError, match="twice"):
        ra.insert_attention(model, "pfsa", sites=["layer1", "layer1"], input_size=(64, 32))
    with pytest.raises(TypeError, match="sites"):
        ra.insert_attention(model, "pfsa", sites=[1], input_size=(64, 32))
    assert not any(isinstance(m, ra.ParameterFreeSpatialAttention) for m in model.modules())


def test_unknown_attention_and_bad_factories():
    model = build(tvm.resnet18)
    with pytest.raises(ValueError, match="unknown attention 'rga'.*rga_sc"):
        ra.insert_attention(model, "rga", input_size=(64, 32))
    with pytest.raises(TypeError, match="registered name"):
        ra.insert_attention(model, 3, input_size=(64, 32))
    with pytest.raises(TypeError, match="must return an nn.Module"):
        ra.insert_attention(model, lambda c, s: None, input_size=(64, 32))
    shared = Scale(64, (16, 8))
    with pytest.raises(ValueError, match="same module"):
        ra.insert_attention(model, lambda c, s: shared, input_size=(64, 32))
    with pytest.raises(ValueError, match=r"keep the map's shape \(2, 128, 8, 4\)"):
        ra.insert_attention(model, lambda c, s: nn.Conv2d(c, 2 * c, 1), sites=["layer2"], input_size=(64, 32))
    with pytest.raises(TypeError, match="nn.Module"):
        ra.insert_attention(None, "pfsa")
    assert len(list(model.modules())) == len(list(build(tvm.resnet18).modules()))  # nothing inserted


def test_build_errors_name_the_site_and_the_argument_to_change():
    model = build(tvm.resnet18)
    # layer1 of a 68x32 input is 17x8: no level above 1 splits 17 rows into stripes.
    message = r"built for site 'layer1' \(64 channels, feat_size \(17, 8\)\).*levels=1.*; " \
              r"pass levels= through insert_attention\(\.\.\., \*\*kwargs\)"
    with pytest.raises(ValueError, match=message):
        ra.insert_attention(model, "apnet_s", sites=["layer1"], input_size=(68, 32), levels=3)
    with pytest.raises(ValueError, match=r"site 'layer1'.*channel_ratio must be >= 1.*pass channel_ratio= "):
        ra.insert_attention(model, "rga_s", input_size=(64, 32), channel_ratio=0)
    with pytest.raises(TypeError, match=r"site 'layer1'.*unexpected keyword argument 'levels'"):
        ra.insert_attention(model, "rga_s", input_size=(64, 32), levels=2)
    assert not any(isinstance(m, (ra.RGA, ra.APNetS)) for m in model.modules())  # nothing half-inserted


def test_build_errors_carry_the_argument_as_data():
    """The remedy comes from the layer's structured error (its ``argument``), not from its text."""
    model = build(tvm.resnet18)
    with pytest.raises(ArgumentError) as info:
        ra.insert_attention(model, "rga_s", input_size=(64, 32), channel_ratio=0)
    assert (info.value.argument, info.value.value) == ("channel_ratio", 0)
    assert isinstance(info.value.__cause__, ArgumentError)  # the layer's own error, kept as the cause

    def plain(channels, feat_size, **kwargs):  # names a keyword in its text only: nothing to parse
        raise ValueError("min_width is too small here")

    def site_given(channels, feat_size, **kwargs):  # an argument insertion takes from the site's map
        raise ArgumentError("feat_size", feat_size, "this map is too small")

    generic = r"; the attention's arguments pass through insert_attention\(\.\.\., \*\*kwargs\)$"
    for factory in (plain, site_given):
        with pytest.raises(ValueError, match=generic):
            ra.insert_attention(model, factory, input_size=(64, 32), min_width=2)
    assert not any(isinstance(m, ra.RGA) for m in model.modules())


def test_small_maps_build_with_the_default_ratios():
    model = build(tvm.resnet18)  # 64x32 input: layer2 8x4, layer4 2x1, where the formulas give 0
    ra.insert_attention(model, "rga_sc", input_size=(64, 32))
    assert model.layer4.attention.feat_size == (2, 1)
    assert model.layer2.attention.widths["spatial"].hidden == 1  # (1 + 32 // 8) // 8 = 0, floored


def test_already_wrapped_site_is_refused():
    model = build(tvm.densenet121)
    ra.insert_attention(model, "pfsa", sites=["features.denseblock1", "features.norm5"], input_size=(64, 64))
    for site in ("features.denseblock1", "features.norm5"):
        with pytest.raises(ValueError, match=f"'{site}' already has attention.*features.denseblock2"):
            ra.insert_attention(model, "pfsa", sites=[site], input_size=(64, 64))
    with pytest.raises(ValueError, match="already has attention"):
        ra.insert_attention(model, "pfsa", input_size=(64, 64))


# --------------------------------------------------------------------------- set_last_stride


def test_set_last_stride_bottleneck_and_basic_block():
    model = ra.set_last_stride(build(tvm.resnet50), 1)
    assert model.layer4[0].conv2.stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    assert {s.name: s.feat_size for s in ra.list_sites(model, (256, 128))}["layer4"] == (16, 8)
    ra.set_last_stride(model, 2)
    assert {s.name: s.feat_size for s in ra.list_sites(model, (256, 128))}["layer4"] == (8, 4)

    basic = ra.set_last_stride(tvm.resnet18(weights=None).eval(), 1)
    assert basic.layer4[0].conv1.stride == (1, 1)
    feats = create_feature_extractor(basic, {"layer4": "f"})(torch.randn(1, 3, 64, 32))["f"]
    assert feats.shape == (1, 512, 4, 2)


def test_set_last_stride_errors():
    with pytest.raises(ValueError, match="ResNet-family model.*MobileNetV2"):
        ra.set_last_stride(build(tvm.mobilenet_v2), 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ra.set_last_stride(build(tvm.resnet18), 3)
    model = ra.insert_attention(build(tvm.resnet50), "pfsa", input_size=(256, 128))
    with pytest.raises(ValueError, match="before insert_attention"):
        ra.set_last_stride(model, 1)
