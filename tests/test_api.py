"""The public surface: ``reid_attention.__all__`` is exactly the documented API (design.md
section 3), every name in it exists, and nothing private leaks into it."""

from __future__ import annotations

import reid_attention as ra

PUBLIC = {
    "APNetC", "APNetS", "ParameterFreeSpatialAttention", "RGA",
    "convert", "presets",
    "create_attention", "list_attentions", "register_attention",
    "insert_attention", "list_sites", "resize_attention", "set_last_stride",
    "fold_batchnorm_scales", "recalibrate_norms",
}


def test_all_is_the_public_api():
    assert set(ra.__all__) == PUBLIC
    assert len(ra.__all__) == len(set(ra.__all__))
    for name in ra.__all__:
        assert getattr(ra, name) is not None, name


def test_no_deprecated_alias():
    assert not hasattr(ra, "fuse_for_inference")
