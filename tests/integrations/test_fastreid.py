"""fast-reid end to end: our backbones in its BACKBONE_REGISTRY, trained by its ``DefaultTrainer``
(one epoch: 4 iterations of 16 images) on the synthetic Market-1501 (reid_data.py, read by
fast-reid's own ``Market1501``) and evaluated by its ``ReidEvaluator``: a preset in this process,
the generic builder through docs/integrations.md's ``train_net.py`` and config, as printed, in a
fresh one; the mapping of fast-reid's config keys (size, norm, last stride, depth, feature dim,
local-only pretrained weights); the patches for torch 2; the missing extra. Skipped where fastreid
is not installed (``make test-integrations`` installs it: the extra, then ``pip install --no-deps
fastreid==1.4.0``).

Images are 64x32, CPU only, ``patch_for_torch2(compile_evaluator=False)``: fast-reid evaluates in
Python unless its Cython module is already built (same numbers; one slow test builds a copy). A
training test takes ~15-30 s of 2 CPU cores (ResNet-50 preset), ~10 s (ResNet-18).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import reid_attention as ra
from reid_attention.integrations import fastreid as rf

SIZE = [64, 32]
DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP")


@pytest.fixture(scope="module")
def fastreid():
    """fastreid, patched for torch 2 and with our backbones registered; unpatched afterwards."""
    fastreid = pytest.importorskip("fastreid")
    rf.patch_for_torch2(compile_evaluator=False)
    rf.register()
    yield fastreid
    rf.unpatch_for_torch2()


def config(name="build_rga_resnet50_backbone", **keys):
    """fast-reid's default config with ours added, sized for the synthetic data set; ``keys``:
    dotted config keys (``"MODEL.BACKBONE.NORM"`` as ``MODEL__BACKBONE__NORM``)."""
    from fastreid.config import get_cfg

    cfg = rf.add_attention_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = SIZE
    for key, value in keys.items():
        node, *path, leaf = key.split("__")
        target = getattr(cfg, node)
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg


def training_config(cfg, market1501, tmp_path):
    """Small, fast settings for one epoch on the synthetic data: 64 training images of 8
    identities, batches of 16 = 4 identities x 4 images (NaiveIdentitySampler), so 4 iterations."""
    cfg.merge_from_list([
        "DATALOADER.SAMPLER_TRAIN", "NaiveIdentitySampler", "DATALOADER.NUM_INSTANCE", 4,
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 16, "SOLVER.MAX_EPOCH", 1,
        "SOLVER.WARMUP_ITERS", 0, "SOLVER.CHECKPOINT_PERIOD", 1, "TEST.EVAL_PERIOD", 1,
        "TEST.IMS_PER_BATCH", 32, "INPUT.FLIP.ENABLED", True, "OUTPUT_DIR", str(tmp_path / "logs"),
        "MODEL.LOSSES.NAME", ("CrossEntropyLoss", "TripletLoss"), "MODEL.HEADS.WITH_BNNECK", True,
        "MODEL.HEADS.NECK_FEAT", "after",
    ])
    return cfg


def train_and_evaluate(cfg, market1501, monkeypatch):
    """fast-reid's DefaultTrainer for one epoch, then its final evaluation; returns (trainer,
    results: fast-reid's ReidEvaluator metrics, in percent)."""
    from fastreid.engine import DefaultTrainer
    from fastreid.utils.env import seed_all_rng

    monkeypatch.setattr("fastreid.data.build._root", str(market1501.dataset_dir))  # $FASTREID_DATASETS
    seed_all_rng(0)
    rf.prepare_output_dir(cfg)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert trainer.iter == 4 and len(trainer.storage.history("total_loss").values()) == 4
    for key in METRICS:
        assert isinstance(float(results[key]), float) and 0.0 <= results[key] <= 100.0, (key, results[key])
    assert results["Rank-1"] <= results["Rank-5"] <= results["Rank-10"]
    return trainer, results


def report(capsys, what, results):
    line = ", ".join(f"{key} {float(results[key]):.2f}%" for key in METRICS)
    with capsys.disabled():
        print(f"\n[fast-reid] {what}: 4 iterations; fast-reid's ReidEvaluator: {line}")


@pytest.mark.slow
def test_default_trainer_trains_and_evaluates_a_preset(fastreid, market1501, tmp_path, monkeypatch, capsys):
    from fastreid.utils.checkpoint import Checkpointer

    cfg = training_config(config("build_rga_resnet50_backbone"), market1501, tmp_path)
    trainer, results = train_and_evaluate(cfg, market1501, monkeypatch)
    report(capsys, "build_rga_resnet50_backbone (RGA-SC)", results)
    model = trainer.model
    assert isinstance(model.backbone, rf.AttentionBackbone)
    assert all(isinstance(model.backbone.get_submodule(f"layer{i}.attention"), ra.RGA) for i in range(1, 5))

    # the checkpoint fast-reid wrote loads into a fresh model with its own Checkpointer: same features
    fresh = trainer.build_model(cfg)
    Checkpointer(fresh).load(str(tmp_path / "logs" / "model_final.pth"))
    images = torch.rand(4, 3, *SIZE) * 255  # 0..255: fast-reid's models normalise (in place) themselves
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh({"images": images.clone()}), model({"images": images.clone()}))
        assert model.backbone(images).shape == (4, 2048, 4, 2)  # the layer4 map, last stride 1


def doc_blocks(lang):
    """The ``lang`` code blocks of the "## fast-reid" section of docs/integrations.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("\n## fast-reid\n"):]
    following = section.find("\n## ", 1)
    section = section if following < 0 else section[:following]
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


def test_the_documented_preset_config_builds(fastreid, tmp_path):
    from fastreid.config import get_cfg
    from fastreid.modeling import build_model

    preset, generic = doc_blocks("yaml")
    (tmp_path / "rga_market.yml").write_text(preset)
    cfg = rf.add_attention_config(get_cfg())
    cfg.merge_from_file(str(tmp_path / "rga_market.yml"))
    assert cfg.MODEL.BACKBONE.NAME == "build_rga_resnet50_backbone" and rf.input_size(cfg) == (256, 128)
    cfg.merge_from_list(["MODEL.BACKBONE.PRETRAIN", False, "MODEL.DEVICE", "cpu",
                         "MODEL.HEADS.NUM_CLASSES", 751])
    model = build_model(cfg).eval()
    assert model.backbone.layer4.attention.feat_size == (16, 8)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 256, 128) * 255).shape == (1, 2048)
    (tmp_path / "generic.yml").write_text(generic)
    cfg = rf.add_attention_config(get_cfg())
    cfg.merge_from_file(str(tmp_path / "generic.yml"))
    attention = cfg.MODEL.BACKBONE.ATTENTION
    assert (attention.KIND, dict(attention.KWARGS)) == ("rga_s", {"spatial_ratio": 4})


@pytest.mark.slow
def test_the_documented_script_trains_the_generic_backbone(fastreid, market1501, tmp_path, capsys):
    """docs/integrations.md's train_net.py and generic config, as printed, in a fresh interpreter;
    command-line keys make it small (ResNet-18, 64x32, one epoch on the CPU)."""
    (script,) = doc_blocks("python")
    (tmp_path / "train_net.py").write_text(script)
    (tmp_path / "generic.yml").write_text(doc_blocks("yaml")[1])
    output = tmp_path / "logs"
    opts = training_config(config(), market1501, tmp_path)  # the small settings, as command-line keys
    keys = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
            "INPUT.SIZE_TRAIN", str(SIZE), "INPUT.SIZE_TEST", str(SIZE), "OUTPUT_DIR", str(output)]
    for key in ("DATALOADER.SAMPLER_TRAIN", "DATALOADER.NUM_INSTANCE", "DATALOADER.NUM_WORKERS",
                "SOLVER.IMS_PER_BATCH", "SOLVER.MAX_EPOCH", "SOLVER.WARMUP_ITERS", "TEST.EVAL_PERIOD",
                "TEST.IMS_PER_BATCH", "MODEL.LOSSES.NAME", "MODEL.HEADS.WITH_BNNECK"):
        keys += [key, str(functools.reduce(getattr, key.split("."), opts))]
    env = {**os.environ, "FASTREID_DATASETS": str(market1501.dataset_dir)}
    done = subprocess.run([sys.executable, "train_net.py", "--config-file", "generic.yml", *keys],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = (output / "log.txt").read_text() if (output / "log.txt").is_file() else ""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)  # termcolor's colours, where it thinks there is a terminal
    assert done.returncode == 0, (done.stderr or done.stdout)[-3000:]
    assert "Model:\nBaseline(" in log and "(layer4): SequentialWithAttention(" in log  # our backbone
    assert re.search(r"epoch/iter: 0/3 ", log), log[-2000:]  # 4 iterations (0 .. 3)
    header, row = (line for line in log.splitlines() if line.startswith(("| Dataset", "| Market1501")))
    names, values = header.split("|")[2:-1], row.split("|")[2:-1]
    results = {name.strip(): float(value) for name, value in zip(names, values)}
    for key in METRICS:  # fast-reid's ReidEvaluator, as it logs them
        assert 0.0 <= results[key] <= 100.0, results
    report(capsys, "docs' train_net.py, build_attention_backbone (resnet18, rga_s)", results)


def test_fastreids_market1501_reads_the_synthetic_layout(fastreid, market1501):
    from fastreid.data.datasets import DATASET_REGISTRY

    dataset = DATASET_REGISTRY.get("Market1501")(root=str(market1501.dataset_dir))
    assert len(dataset.train) == 64 and len(dataset.query) == 16 and len(dataset.gallery) == 48
    assert len({pid for _, pid, _ in dataset.train}) == market1501.num_train_ids


def test_train_loader_runs_on_the_cpu(fastreid, market1501, tmp_path, monkeypatch):
    from fastreid.data import build_reid_train_loader

    monkeypatch.setattr("fastreid.data.build._root", str(market1501.dataset_dir))
    cfg = training_config(config(), market1501, tmp_path)
    loader = build_reid_train_loader(cfg)
    assert type(loader).__mro__[1].__module__ == "fastreid.data.data_utils"  # a DataLoaderX subclass
    batch = next(iter(loader))
    assert batch["images"].shape == (16, 3, *SIZE) and batch["images"].device.type == "cpu"
    assert sorted(batch["targets"].bincount(minlength=8).tolist()) == [0] * 4 + [4] * 4  # 4 ids x 4 images


# ---------------------------------------------------------------------------------------------
# fast-reid's config keys


def test_norm_names():
    pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    assert rf.norm_layer("BN") is None
    assert rf.norm_layer("syncBN") is nn.SyncBatchNorm
    assert rf.norm_layer("FrozenBN") is FrozenBatchNorm2d
    gn = rf.norm_layer("GN")
    assert [gn(c).num_groups for c in (64, 2048, 8, 24)] == [32, 32, 8, 8]
    for name in ("GhostBN", "bn", ""):
        with pytest.raises(ValueError, match=r"MODEL\.BACKBONE\.NORM is .*BN, syncBN, FrozenBN, GN"):
            rf.norm_layer(name)


def _norms(module):
    return [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
            or type(m).__name__ == "FrozenBatchNorm2d"]


@pytest.mark.parametrize("norm", ["BN", "syncBN", "GN", "FrozenBN"])
def test_norm_builds_and_trains(fastreid, norm):
    from torchvision.ops import FrozenBatchNorm2d

    cfg = config("build_attention_backbone", MODEL__BACKBONE__NORM=norm, MODEL__BACKBONE__DEPTH="18x",
                 MODEL__BACKBONE__FEAT_DIM=512)
    cfg.MODEL.BACKBONE.ATTENTION.KIND = "rga_sc"
    backbone = rf.build_backbone(cfg)
    trunk_bn = backbone.layer2[0].bn1
    attention = [m for m in backbone.modules() if isinstance(m, ra.RGA)]
    attention_norms = [n for a in attention for n in _norms(a)]
    expected = {"BN": nn.BatchNorm2d, "syncBN": nn.SyncBatchNorm, "GN": nn.GroupNorm,
                "FrozenBN": FrozenBatchNorm2d}[norm]
    assert type(trunk_bn) is expected or (norm == "GN" and isinstance(trunk_bn, nn.GroupNorm))
    if norm == "FrozenBN":  # the ResNet's norms frozen, the attention's trainable
        assert attention_norms and all(type(n) is nn.BatchNorm2d for n in attention_norms)
        assert not any(isinstance(n, nn.BatchNorm2d) for n in _norms(backbone) if n not in attention_norms)
    else:
        assert attention_norms and all(isinstance(n, expected) for n in attention_norms)
    backbone.train()
    out = backbone(torch.randn(2, 3, *SIZE))
    assert out.shape == (2, 512, 4, 2)
    out.mean().backward()


def test_last_stride(fastreid):
    for stride, shape in ((1, (4, 2)), (2, (2, 1))):
        cfg = config("build_attention_backbone", MODEL__BACKBONE__LAST_STRIDE=stride,
                     MODEL__BACKBONE__DEPTH="34x", MODEL__BACKBONE__FEAT_DIM=512)
        cfg.MODEL.BACKBONE.ATTENTION.KIND = "pfsa"
        with torch.no_grad():
            assert rf.build_backbone(cfg).eval()(torch.randn(1, 3, *SIZE)).shape == (1, 512, *shape)
    with pytest.raises(ValueError, match=r"LAST_STRIDE is 2: build_rga_resnet50_backbone is the paper's"):
        rf.build_backbone(config(MODEL__BACKBONE__LAST_STRIDE=2))
    with pytest.raises(ValueError, match="LAST_STRIDE is 3: expected 1 or 2"):
        rf.build_backbone(config(MODEL__BACKBONE__LAST_STRIDE=3))


def test_the_attention_is_built_for_the_config_size(fastreid):
    cfg = config("build_rga_s_resnet50_backbone", INPUT__SIZE_TRAIN=[128, 64], INPUT__SIZE_TEST=[128, 64])
    assert rf.input_size(cfg) == (128, 64)
    backbone = rf.build_backbone(cfg).eval()
    assert backbone.layer1.attention.feat_size == (32, 16) and backbone.layer4.attention.feat_size == (8, 4)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 128, 64)).shape == (1, 2048, 8, 4)
        with pytest.raises(ValueError, match=r"\(32, 16\)|32x16"):
            backbone(torch.randn(1, 3, 64, 32))
    crop = config(INPUT__SIZE_TRAIN=[144, 72], INPUT__SIZE_TEST=[144, 72])
    crop.INPUT.CROP.ENABLED, crop.INPUT.CROP.SIZE = True, [128, 64]
    assert rf.input_size(crop) == (128, 64)  # RandomResizedCrop in training, CenterCrop in test
    crop.INPUT.CROP.SIZE = [96]
    assert rf.input_size(crop) == (96, 96)
    with pytest.raises(ValueError, match=r"INPUT\.SIZE_TEST is \[128, 64\] and INPUT\.SIZE_TRAIN \[64, 32\]"):
        rf.build_backbone(config(INPUT__SIZE_TEST=[128, 64]))
    with pytest.raises(ValueError, match=r"INPUT\.SIZE_TRAIN is \[256\].*no fixed size"):
        rf.input_size(config(INPUT__SIZE_TRAIN=[256], INPUT__SIZE_TEST=[256]))


def test_depth_feat_dim_and_fastreid_resnet_options(fastreid):
    with pytest.raises(ValueError, match=r"DEPTH is '101x': build_rga_resnet50_backbone is a ResNet-50"):
        rf.build_backbone(config(MODEL__BACKBONE__DEPTH="101x"))
    cfg = config("build_attention_backbone", MODEL__BACKBONE__DEPTH="18x")
    cfg.MODEL.BACKBONE.ATTENTION.KIND = "apnet_c"
    with pytest.raises(ValueError, match=r"FEAT_DIM is 2048, but resnet18 with apnet_c ends in 512 .*: 512"):
        rf.build_backbone(cfg)
    cfg.MODEL.BACKBONE.ATTENTION.ARCH = "densenet121"
    with pytest.raises(ValueError, match=r"ATTENTION\.ARCH gives 'densenet121'.*ResNet-family"):
        rf.build_backbone(cfg)
    with pytest.raises(ValueError, match=r"WITH_IBN is on"):
        rf.build_backbone(config(MODEL__BACKBONE__WITH_IBN=True))


def test_attention_keys(fastreid):
    from fastreid.config import get_cfg

    with pytest.raises(ValueError, match=r"ATTENTION\.KIND: call .*add_attention_config\(cfg\)"):
        rf.build_backbone(config("build_attention_backbone"))
    cfg = get_cfg()  # without add_attention_config
    cfg.MODEL.BACKBONE.NAME = "build_attention_backbone"
    with pytest.raises(ValueError, match=r"add_attention_config"):
        rf.build_backbone(cfg)
    cfg = config("build_attention_backbone")
    cfg.MODEL.BACKBONE.ATTENTION.KIND = "se"
    with pytest.raises(ValueError, match=r"ATTENTION\.KIND is 'se': expected one of .*rga_sc"):
        rf.build_backbone(cfg)
    preset = config()
    preset.MODEL.BACKBONE.ATTENTION.KIND = "rga_s"
    with pytest.raises(ValueError, match=r"the preset build_rga_resnet50_backbone fixes all three"):
        rf.build_backbone(preset)
    apnet = config("build_apnet_resnet50_backbone")  # preset arguments from KWARGS
    apnet.MODEL.BACKBONE.ATTENTION.KWARGS.levels = 1
    assert rf.build_backbone(apnet).layer2.attention.num_levels == 1
    assert rf.add_attention_config(apnet) is apnet and apnet.MODEL.BACKBONE.ATTENTION.KWARGS.levels == 1
    sites = config("build_attention_backbone", MODEL__BACKBONE__DEPTH="18x", MODEL__BACKBONE__FEAT_DIM=512)
    sites.MODEL.BACKBONE.ATTENTION.KIND, sites.MODEL.BACKBONE.ATTENTION.SITES = "pfsa", ["layer3"]
    modules = rf.build_backbone(sites).named_modules()
    assert [n for n, m in modules if isinstance(m, ra.ParameterFreeSpatialAttention)] == ["layer3.attention"]


@pytest.mark.parametrize("name", list(rf.PRESETS))
def test_every_preset_builds_through_fastreids_registry(fastreid, name):
    from fastreid.modeling import build_model

    cfg = config(name)
    cfg.MODEL.HEADS.NUM_CLASSES = 5
    model = build_model(cfg).eval()  # fast-reid's Baseline: build_backbone(cfg) looks the name up
    assert type(model.backbone) is rf.AttentionBackbone
    with torch.no_grad():
        assert model(torch.rand(2, 3, *SIZE) * 255).shape == (2, 2048)


def test_register_is_idempotent_and_replaces_nothing(fastreid, monkeypatch):
    from fastreid.modeling.backbones import BACKBONE_REGISTRY

    assert rf.register() == rf.register() == list(rf.BACKBONES)
    assert BACKBONE_REGISTRY.get("build_rga_resnet50_backbone") is rf.build_rga_resnet50_backbone
    assert BACKBONE_REGISTRY.get("build_resnet_backbone")  # fast-reid's own are still there
    theirs = BACKBONE_REGISTRY.get("build_resnet_backbone")
    monkeypatch.setitem(BACKBONE_REGISTRY._obj_map, "build_attention_backbone", theirs)
    with pytest.raises(ValueError, match=r"already has \['build_attention_backbone'\]; not replacing"):
        rf.register()


# ---------------------------------------------------------------------------------------------
# pretrained weights: local files only


def test_pretrained_weights_from_a_local_file_never_downloaded(fastreid, tmp_path, monkeypatch):
    from torchvision.models import ResNet50_Weights, resnet50

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    imagenet = resnet50().state_dict()  # stands in for the ImageNet file
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet, path)

    with pytest.raises(FileNotFoundError, match=r"torch hub cache, not found at .*resnet50-0676ba61\.pth"):
        rf.build_backbone(config(MODEL__BACKBONE__PRETRAIN=True))
    for norm in ("BN", "FrozenBN"):
        cfg = config("build_apnet_resnet50_backbone", MODEL__BACKBONE__PRETRAIN=True,
                     MODEL__BACKBONE__PRETRAIN_PATH=str(path), MODEL__BACKBONE__NORM=norm)
        state = rf.build_backbone(cfg).state_dict()
        shared = [k for k in imagenet if k in state]
        # all but fc.weight and fc.bias; FrozenBN has no num_batches_tracked (53 norms)
        assert len(shared) == len(imagenet) - 2 - (53 if norm == "FrozenBN" else 0)
        assert all(torch.equal(state[k], imagenet[k]) for k in shared)

    cached = tmp_path / "torch" / "hub" / "checkpoints" / ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    shutil.copy(path, cached)
    state = rf.build_backbone(config(MODEL__BACKBONE__PRETRAIN=True)).state_dict()
    assert torch.equal(state["layer3.2.conv2.weight"], imagenet["layer3.2.conv2.weight"])

    with pytest.raises(ValueError, match=r"PRETRAIN with NORM 'GN'"):
        rf.build_backbone(config(MODEL__BACKBONE__PRETRAIN=True, MODEL__BACKBONE__NORM="GN"))
    with pytest.raises(FileNotFoundError, match=r"PRETRAIN_PATH: no file at"):
        rf.build_backbone(config(MODEL__BACKBONE__PRETRAIN=True,
                                 MODEL__BACKBONE__PRETRAIN_PATH=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="weights do not fit the preset"):  # another architecture's weights
        torch.save({"model": {"conv1.weight": torch.zeros(3)}}, tmp_path / "other.pth")
        rf.build_backbone(config(MODEL__BACKBONE__PRETRAIN=True,
                                 MODEL__BACKBONE__PRETRAIN_PATH=str(tmp_path / "other.pth")))


# ---------------------------------------------------------------------------------------------
# the patches


def test_patches_are_idempotent_and_reversible(fastreid):
    import collections

    from fastreid.data import build

    assert rf.patch_for_torch2(compile_evaluator=False) == []  # applied by the fixture already
    assert hasattr(collections, "Mapping") and "torch._six" in sys.modules
    patched = build.DataLoaderX
    undone = rf.unpatch_for_torch2()
    try:
        assert set(undone) == {"torch._six", "collections.Mapping", "fastreid.data.DataLoaderX",
                               "fastreid.evaluation.compile_helper"}
        assert not hasattr(collections, "Mapping") and "torch._six" not in sys.modules
        assert build.DataLoaderX is not patched and build.DataLoaderX is patched.__mro__[1]
        import fastreid.evaluation.reid_evaluation as evaluation

        assert evaluation.compile_helper.__module__ == "fastreid.evaluation.rank_cylib"
        assert rf.unpatch_for_torch2() == []
    finally:
        assert len(rf.patch_for_torch2(compile_evaluator=False)) == 4
    with pytest.raises(TypeError, match="compile_evaluator must be a bool"):
        rf.patch_for_torch2(compile_evaluator="no")


@pytest.mark.slow
def test_the_cython_evaluator_builds_with_this_interpreter_and_agrees(fastreid, tmp_path):
    """fast-reid's own compile runs ``python3`` from PATH and exits the process on failure; ours
    builds a copy here with this interpreter. Its CMC and mAP equal fast-reid's Python ones."""
    if importlib.util.find_spec("Cython") is None or shutil.which("cc") is None:
        pytest.skip("needs Cython and a C compiler")
    import fastreid.evaluation.rank_cylib as cylib
    from fastreid.evaluation.rank import evaluate_py

    directory = tmp_path / "rank_cylib"
    shutil.copytree(cylib.__path__[0], directory, ignore=shutil.ignore_patterns("*.so", "*.c", "build"))
    assert rf.build_cython_evaluator(str(directory))
    built = next(directory.glob("rank_cy*.so"))
    spec = importlib.util.spec_from_file_location("rank_cy", built)
    rank_cy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rank_cy)
    rng = torch.Generator().manual_seed(0)
    dist = torch.rand(16, 48, generator=rng).numpy()
    q_pids, g_pids = torch.arange(16).numpy() % 8, torch.arange(48).numpy() % 8
    q_cams, g_cams = torch.zeros(16, dtype=torch.long).numpy(), (torch.arange(48) % 2).numpy()
    cmc_cy, ap_cy, _ = rank_cy.evaluate_cy(dist, q_pids, g_pids, q_cams, g_cams, 10, False)
    cmc_py, ap_py, _ = evaluate_py(dist, q_pids, g_pids, q_cams, g_cams, 10, False)
    assert math.isclose(float(sum(ap_cy) / len(ap_cy)), float(sum(ap_py) / len(ap_py)), rel_tol=1e-5)
    torch.testing.assert_close(torch.as_tensor(cmc_cy[:10]), torch.as_tensor(cmc_py[:10]))


# ---------------------------------------------------------------------------------------------
# without the extra


INSTALL = 'pip install "reid-attention[fastreid]" && pip install --no-deps fastreid==1.4.0'


@pytest.mark.parametrize("hidden, package, call", [
    ("fastreid", "fastreid", "register"),
    ("fastreid", "fastreid", "patch_for_torch2"),
    ("yacs", "yacs", "register"),
])
def test_missing_extra_is_one_line(hidden, package, call):
    if hidden != "fastreid" and importlib.util.find_spec("fastreid") is None:
        pytest.skip("a missing fastreid dependency shows only where fastreid is installed")
    code = (f"import sys, json\nsys.modules[{hidden!r}] = None\n"
            "from reid_attention.integrations import fastreid as rf\n"
            "from reid_attention._extras import MissingExtraError\n"
            f"try:\n    rf.{call}()\n"
            "except MissingExtraError as err:\n    print(json.dumps([err.name, str(err)]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    name, message = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == package and "\n" not in message
    if package == "fastreid":
        assert message == f"reid_attention.integrations.fastreid.{call} needs fastreid: {INSTALL}"
    else:
        assert message == (f"reid_attention.integrations.fastreid.{call} needs {package}, which fastreid "
                           'imports: pip install "reid-attention[fastreid]"')
