"""reid_attention.timm_models: the presets as timm models (offline, small inputs).

``timm.create_model`` gives a classifier, features or feature maps at the size asked for, timm's
interfaces work (feature_info, data config, layer decay, gradient checkpointing, intermediates),
and ``pretrained=True`` loads a local file (torchvision's ResNet-50, a preset's or the model's own
state_dict) or the torchvision URL's cached file, and refuses weights that do not fit.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

import reid_attention as ra

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")
tm = pytest.importorskip("reid_attention.timm_models")

NAMES = ["rga_resnet50", "rga_s_resnet50", "rga_c_resnet50", "apnet_resnet50", "apnet_s_resnet50"]
SIZE = (64, 32)  # small: maps 32x16, 16x8, 8x4, 4x2, 4x2
REDUCTIONS = [2, 4, 8, 16, 16]
CHANNELS = [64, 256, 512, 1024, 2048]


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, img_size=SIZE, **kwargs)


def images(batch: int = 2, size=SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network; torch.hub's cache (where timm keeps URL downloads) in a temporary folder."""

    def no_connect(self, address, *args, **kwargs):
        raise RuntimeError(f"tried to connect to {address}: the timm tests run offline")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision ResNet-50 state_dict (random: the ImageNet weights' stand-in) saved as a .pth."""
    torch.manual_seed(0)
    state = tvm.resnet50().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


def test_registered_with_the_papers_input_sizes():
    assert sorted(timm.list_models(module="timm_models")) == sorted(NAMES)
    assert set(NAMES) <= set(tm.__all__)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        size = (256, 128) if name.startswith("rga") else (384, 192)
        assert cfg["input_size"] == (3, *size) and cfg["fixed_input_size"] and cfg["crop_pct"] == 1.0
        assert cfg["pool_size"] == (size[0] // 16, size[1] // 16) and cfg["tag"] == "tv_in1k"
    # the URLs are torchvision's ResNet-50 ImageNet weights
    assert tm._TORCHVISION_URLS == {"tv_in1k": tvm.ResNet50_Weights.IMAGENET1K_V1.url,
                                    "tv2_in1k": tvm.ResNet50_Weights.IMAGENET1K_V2.url}


@pytest.mark.parametrize("name", NAMES)
def test_classifier_features_and_maps(name):
    torch.manual_seed(0)
    x = images()
    model = create(name, num_classes=751).eval()
    assert isinstance(model, tm.TimmReIDResNet) and isinstance(model.get_classifier(), torch.nn.Linear)
    assert model.num_classes == 751 and model.num_features == 2048
    with torch.no_grad():
        logits = model(x)
        fmap = model.forward_features(x)
    assert logits.shape == (2, 751) and torch.isfinite(logits).all() and fmap.shape == (2, 2048, 4, 2)
    # the preset's state_dict plus torchvision's fc: the keys of a torchvision ResNet-50 with attention
    preset = "rga_resnet50" if name.startswith("rga") else "apnet_resnet50"
    kwargs = {"rga_s_resnet50": dict(channel=False), "rga_c_resnet50": dict(spatial=False),
              "apnet_s_resnet50": dict(variant="s")}.get(name, {})
    with torch.device("meta"):
        preset_keys = getattr(ra.presets, preset)(input_size=SIZE, **kwargs).state_dict().keys()
    assert list(model.state_dict()) == [*preset_keys, "fc.weight", "fc.bias"]
    pooled = model.forward_head(fmap, pre_logits=True)
    torch.testing.assert_close(pooled, fmap.mean((2, 3)))
    torch.testing.assert_close(logits, model.fc(pooled))
    model.reset_classifier(0)  # timm's way to features: the preset's output, (B, 2048)
    torch.testing.assert_close(model.forward_head(fmap), pooled)

    maps = create(name, features_only=True).eval()
    assert maps.feature_info.reduction() == REDUCTIONS and maps.feature_info.channels() == CHANNELS
    assert maps.feature_info.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]
    outs = maps(x[:1])
    assert [tuple(o.shape) for o in outs] == [(1, c, SIZE[0] // r, SIZE[1] // r)
                                              for c, r in zip(CHANNELS, REDUCTIONS)]


def test_default_is_features_and_the_paper_size():
    with torch.device("meta"):
        rga, apnet = timm.create_model("rga_resnet50"), timm.create_model("apnet_s_resnet50")
    assert rga.num_classes == 0 and isinstance(rga.fc, torch.nn.Identity)
    assert rga.img_size == (256, 128) and rga.layer1.attention.feat_size == (64, 32)
    assert apnet.img_size == (384, 192) and apnet.layer1.attention.feat_size == (96, 48)
    assert isinstance(rga.layer4.attention, ra.RGA) and rga.layer4.attention.feat_size == (16, 8)
    assert isinstance(apnet.layer4.attention, ra.APNetS)


def test_img_size_builds_the_attention_and_the_data_config():
    model = create("rga_resnet50")
    assert model.layer1.attention.feat_size == (16, 8) and model.layer4.attention.feat_size == (4, 2)
    assert model.pretrained_cfg["input_size"] == (3, *SIZE) and model.pretrained_cfg["pool_size"] == (4, 2)
    assert timm.data.resolve_model_data_config(model)["input_size"] == (3, *SIZE)
    with pytest.raises(ValueError, match="feat_size"):
        model(images(1, (32, 16)))
    square = timm.create_model("rga_s_resnet50", img_size=32)  # an int: square, as in timm
    assert square.layer1.attention.feat_size == (8, 8)  # 32 / 4


def test_preset_arguments_pass_through_and_conflicts_fail():
    model = create("apnet_resnet50", levels=3, impl="reference")
    assert model.layer1.attention.num_levels == 3 and model.layer1.attention.impl == "reference"
    with pytest.raises(ValueError, match=r"rga_s_resnet50 is built with channel=False, got channel=True"):
        create("rga_s_resnet50", channel=True)
    with pytest.raises(ValueError, match="variant='s'"):
        create("apnet_s_resnet50", variant="c")
    with pytest.raises(ValueError, match="in_chans=3"):
        create("rga_resnet50", in_chans=1)
    with pytest.raises(ValueError, match="needs a global_pool"):
        create("rga_resnet50", num_classes=10, global_pool="")
    fmap = create("rga_c_resnet50", global_pool="")  # no pooling, no classifier: the map
    assert fmap(images()).shape == (2, 2048, 4, 2)


def test_timm_training_interfaces():
    """Layer-wise LR decay groups every parameter once; gradient checkpointing and
    forward_intermediates give what the plain forward gives."""
    torch.manual_seed(0)
    model = create("apnet_resnet50", num_classes=10, drop_rate=0.1)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]  # APNet-C's frozen BN bias is not
    assert len(grouped) == len(set(map(id, grouped))) == len(trainable)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert len(scales) > 5 and max(scales) == 1.0  # stem .. layer4 blocks and attention, head last

    x = images()
    model.eval()
    with torch.no_grad():
        plain = model.forward_features(x)
        model.set_grad_checkpointing(True)
        checkpointed = model.forward_features(x)
        last, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(last, plain)
    assert [t.shape[1] for t in intermediates] == CHANNELS
    model.train()
    model(x).logsumexp(1).mean().backward()  # checkpointed training step: gradients everywhere
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    getter = create("rga_resnet50", features_only=True, feature_cls="getter", out_indices=(3, 4))
    assert [tuple(o.shape) for o in getter(x)] == [(2, 1024, 4, 2), (2, 2048, 4, 2)]
    pruned = create("rga_resnet50")
    assert pruned.prune_intermediate_layers([0, 2]) == [0, 2]  # layer3, layer4 and the head go
    assert isinstance(pruned.layer3, torch.nn.Identity) and isinstance(pruned.layer4, torch.nn.Identity)
    assert [tuple(t.shape) for t in pruned.forward_intermediates(x, [0, 2], intermediates_only=True)] == [
        (2, 64, 32, 16), (2, 512, 8, 4)]


def _trunk_equal(model, state):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_pretrained_file_torchvision_resnet50(torchvision_file, offline):
    path, state = torchvision_file
    model = timm.create_model("rga_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=751, img_size=SIZE)
    assert _trunk_equal(model, state)
    assert model.fc.weight.shape == (751, 2048)  # the ImageNet classifier does not fit: left random
    imagenet = timm.create_model("apnet_resnet50", pretrained=True, num_classes=1000, img_size=SIZE,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert _trunk_equal(imagenet, state) and torch.equal(imagenet.fc.weight, state["fc.weight"])
    maps = timm.create_model("rga_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             features_only=True, img_size=SIZE)
    assert torch.equal(maps.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_pretrained_file_full_model_and_preset_state_dicts(tmp_path, offline):
    torch.manual_seed(1)
    trained = create("rga_resnet50", num_classes=751)
    trained.train()
    trained(images(4))  # BatchNorm statistics away from their initial values
    trained.eval()
    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)  # a training checkpoint
    loaded = timm.create_model("rga_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               num_classes=751, img_size=SIZE).eval()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))

    torch.manual_seed(2)  # a preset's state_dict (no fc), as reid_attention.convert gives
    preset = ra.presets.rga_resnet50(input_size=SIZE, channel=False)
    torch.save(preset.state_dict(), tmp_path / "preset.pth")
    model = timm.create_model("rga_s_resnet50", pretrained=True, img_size=SIZE,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "preset.pth")))
    preset.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), preset(x), rtol=0, atol=1e-6)


def test_pretrained_weights_that_do_not_fit_are_refused(tmp_path, torchvision_file, offline):
    torch.save(create("rga_resnet50").state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"other shapes: layer1\.attention.*img_size=\(128, 64\)"):
        timm.create_model("rga_resnet50", pretrained=True, img_size=(128, 64),
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "small.pth")))
    path, state = torchvision_file
    broken = {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}
    broken["backbone.rga_att1.W_spatial.0.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: backbone.rga_att1.*missing trunk keys: "
                                         r"layer2.0.conv1.weight.*from_official_rga"):
        timm.create_model("rga_resnet50", pretrained=True, img_size=SIZE,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "broken.pth")))
    with pytest.raises(ValueError, match="missing trunk keys"):  # the state_dict route is checked too
        timm.create_model("rga_resnet50", pretrained=True, img_size=SIZE,
                          pretrained_cfg_overlay=dict(state_dict=broken))


def test_pretrained_true_loads_the_torchvision_url_from_the_cache(torchvision_file, offline):
    """``pretrained=True`` = tag tv_in1k = torchvision's IMAGENET1K_V1 URL; from the cache here."""
    path, state = torchvision_file
    cache = offline / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet50-0676ba61.pth").symlink_to(path)
    model = timm.create_model("rga_c_resnet50", pretrained=True, img_size=SIZE)
    assert model.pretrained_cfg["tag"] == "tv_in1k" and _trunk_equal(model, state)
    with pytest.raises((RuntimeError, OSError)):  # tv2_in1k is not cached: it would download (offline here)
        timm.create_model("rga_c_resnet50.tv2_in1k", pretrained=True, img_size=SIZE)


def test_timm_is_imported_only_by_the_timm_module():
    code = """
import sys
import reid_attention as ra
assert "timm" not in sys.modules and "reid_attention.timm_models" not in sys.modules
sys.modules["timm"] = None  # as if not installed
try:
    import reid_attention.timm_models
except ImportError as err:
    print(type(err).__name__, err.name, err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ('MissingExtraError timm reid_attention.timm_models needs timm: '
                                   'pip install "reid-attention[timm]"')
