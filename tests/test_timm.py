"""timm models: default insertion of every kind (six families, also features_only models),
real training steps on timm's small test models, the layers as timm ``attn_layer``, ViT's error."""

from __future__ import annotations

import pytest
import torch
from insertion_checks import SIZES, check_default_insertion, check_real_step, tensors

import reid_attention as ra

timm = pytest.importorskip("timm")

FAMILIES = ["resnet50", "resnet50d", "seresnext26d_32x4d", "convnext_tiny", "efficientnet_b0", "regnety_016"]


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).train()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", FAMILIES)
def test_default_insertion_of_every_kind(name, size):
    check_default_insertion(meta_model(name), size)


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_models(name):
    """features_only models return one map per stage: the probe and insertion take the list."""
    model = meta_model(name, features_only=True)
    assert len(tensors(model(torch.empty(2, 3, 256, 128, device="meta")))) == len(model.feature_info)
    check_default_insertion(model, (256, 128))


@pytest.mark.parametrize("name, kwargs", [("test_efficientnet", {}), ("test_convnext", {}),
                                          ("test_resnet", {"features_only": True})])
def test_default_insertion_trains_for_real(name, kwargs):
    """Real forward and backward of every kind at 128x64 on timm's small test models."""
    torch.manual_seed(0)
    check_real_step(timm.create_model(name, pretrained=False, **kwargs), (128, 64))


@pytest.mark.parametrize("layer", [ra.APNetC, ra.ParameterFreeSpatialAttention])
def test_layers_as_timm_attn_layer(layer):
    """timm builds ``attn_layer(channels, device=..., dtype=...)`` inside every block."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, block_args=dict(attn_layer=layer)).train()
    assert sum(isinstance(m, layer) for m in model.modules()) == 16  # one per bottleneck
    x = torch.randn(2, 3, 64, 32)  # APNet-C trains with batch >= 2
    logits = model(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, layer)]
    assert all(p.grad is not None for m in layers for p in m.parameters() if p.requires_grad)


def test_vit_feature_maps_end_at_the_patch_embedding():
    """timm's ViT takes any image size; its only 4-D map is the patch grid (NHWC), the blocks
    work on token sequences and are no sites."""
    model = meta_model("test_vit")
    sites = ra.list_sites(model, (160, 160), stages_only=False)
    assert [(s.name, s.layout) for s in sites][-1] == ("patch_embed", "NHWC")
    assert not any(s.name.startswith("blocks") for s in sites)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['blocks.0'\]"):
        ra.insert_attention(model, "pfsa", sites="blocks.0", input_size=(160, 160))
