"""Sharing the presets: hubconf.py (torch.hub), reid_attention.hub.ReIDModel (Hugging Face Hub),
and the timm / torch.hub / Hugging Face Hub sections of docs/integrations.md, whose Python blocks
run here as printed. Everything offline: local folders, HF_HUB_OFFLINE=1, no socket connects.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reid_attention as ra

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrations.md"
MY_SECTIONS = ("timm", "torch.hub", "Hugging Face Hub")  # docs/integrations.md has others' sections too
ENTRY_POINTS = ["apnet_resnet50", "apnet_s_resnet50", "rga_c_resnet50", "rga_resnet50", "rga_s_resnet50"]
SIZE = (64, 32)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def no_connect(self, address, *args, **kwargs):
        raise RuntimeError(f"tried to connect to {address}: the hub tests run offline")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "huggingface_hub" in sys.modules:  # read at its import (here, perhaps by timm)
        monkeypatch.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_home" / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def images(batch: int = 2, size=SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))


# --- torch.hub ---------------------------------------------------------------------------------


def test_hubconf_lists_the_presets(offline):
    """torch.hub.list's rule (GitHub repositories only in torch 2.x): callables not starting with _."""
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")]
    assert sorted(entry_points) == ENTRY_POINTS
    assert set(hubconf.dependencies) == {"torch", "torchvision", "einops"}
    assert "RGA-S only" in hubconf.rga_s_resnet50.__doc__  # what torch.hub.help prints


def test_hubconf_loads_what_the_preset_builds(offline):
    torch.manual_seed(0)
    model = torch.hub.load(str(ROOT), "rga_resnet50", source="local", input_size=SIZE)
    torch.manual_seed(0)
    preset = ra.presets.rga_resnet50(input_size=SIZE)
    assert isinstance(model, ra.presets.ReIDResNet) and model.layer1.attention.feat_size == (16, 8)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), preset.state_dict().values()))
    with torch.no_grad():
        assert model.eval()(images()).shape == (2, 2048)


@pytest.mark.parametrize("name, kind, check", [
    ("rga_s_resnet50", ra.RGA, lambda a: a.spatial and not a.channel),
    ("rga_c_resnet50", ra.RGA, lambda a: a.channel and not a.spatial),
    ("apnet_resnet50", ra.APNetC, lambda a: a.num_levels == 3),
    ("apnet_s_resnet50", ra.APNetS, lambda a: a.num_levels == 3),
])
def test_hubconf_entry_points(name, kind, check, offline):
    extra = {"levels": 3} if name.startswith("apnet") else {}
    with torch.device("meta"):
        model = torch.hub.load(str(ROOT), name, source="local", **extra)
    attention = model.layer4.attention
    assert isinstance(attention, kind) and check(attention)
    wrong = {"rga_s_resnet50": {"channel": True}, "rga_c_resnet50": {"spatial": True},
             "apnet_resnet50": {"variant": "s"}, "apnet_s_resnet50": {"variant": "c"}}[name]
    with pytest.raises(ValueError, match=f"{name} is built with"):
        torch.hub.load(str(ROOT), name, source="local", **wrong)


def test_hubconf_uses_the_repository_copy(tmp_path):
    """A clone that is not installed: hubconf puts its src/ first; reid_attention already imported
    from elsewhere: that copy, with a warning."""
    clone = tmp_path / "clone"
    (clone / "src").mkdir(parents=True)
    shutil.copy2(ROOT / "hubconf.py", clone / "hubconf.py")
    shutil.copytree(ROOT / "src" / "reid_attention", clone / "src" / "reid_attention",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import warnings, torch
warnings.simplefilter("error")
model = torch.hub.load({str(clone)!r}, "apnet_resnet50", source="local", input_size=(64, 32))
import reid_attention
print(reid_attention.__file__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(clone / "src" / "reid_attention" / "__init__.py")
    with pytest.warns(UserWarning, match="reid_attention was already imported from"):
        with torch.device("meta"):
            torch.hub.load(str(clone), "rga_resnet50", source="local")


# --- Hugging Face Hub --------------------------------------------------------------------------


@pytest.fixture
def hub():
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("safetensors")
    from reid_attention import hub

    return hub


@pytest.mark.parametrize("config", [
    dict(preset="rga_resnet50", input_size=SIZE, channel=False),
    dict(preset="apnet_resnet50", input_size=SIZE, variant="s", levels=2),
], ids=["rga_s", "apnet_s"])
def test_save_and_load_round_trip(hub, config, offline):
    torch.manual_seed(0)
    model = hub.ReIDModel(**config)
    model.train()
    model(images())  # BatchNorm statistics away from their initial values
    model.eval()
    model.save_pretrained(offline / "saved")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (offline / "saved").iterdir()}
    saved = json.loads((offline / "saved" / "config.json").read_text())
    assert saved == {**config, "input_size": list(SIZE)} == model.config

    loaded = hub.ReIDModel.from_pretrained(offline / "saved")
    assert not loaded.training and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_weights_file_loads_into_the_preset_and_timm(hub, offline):
    """model.safetensors is the preset's state_dict under its own keys."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = hub.ReIDModel(preset="rga_resnet50", input_size=SIZE, channel=False).eval()
    model.save_pretrained(offline / "saved")
    weights = offline / "saved" / "model.safetensors"
    x = images()
    preset = ra.presets.rga_resnet50(input_size=SIZE, channel=False, weights=load_file(weights)).eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(preset(x), expected)
    timm = pytest.importorskip("timm")
    import reid_attention.timm_models  # noqa: F401

    timm_model = timm.create_model("rga_s_resnet50", pretrained=True, img_size=SIZE,
                                   pretrained_cfg_overlay=dict(file=str(weights))).eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), expected, rtol=0, atol=1e-6)


def test_loading_is_strict_and_config_is_json(hub, offline):
    model = hub.ReIDModel(preset="rga_resnet50", input_size=SIZE)
    model.save_pretrained(offline / "saved")
    config = offline / "saved" / "config.json"
    config.write_text(json.dumps({"preset": "rga_resnet50", "input_size": [128, 64]}))
    with pytest.raises(RuntimeError, match="size mismatch"):  # the attention is built for 64x32
        hub.ReIDModel.from_pretrained(offline / "saved")
    with pytest.raises(ValueError, match="preset= one of"):
        hub.ReIDModel(preset="resnet50")
    with pytest.raises(TypeError, match="norm_layer=.* is not a JSON value"):
        hub.ReIDModel(preset="rga_resnet50", norm_layer=torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="saves its own config"):
        model.save_pretrained(offline / "other", config={"preset": "apnet_resnet50"})
    with pytest.raises(Exception, match="cache"):  # HF_HUB_OFFLINE=1: a Hub id must be in the cache
        hub.ReIDModel.from_pretrained("someone/rga-market")
    config.unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        hub.ReIDModel.from_pretrained(offline / "saved")


def test_weights_initialise_but_are_not_saved(hub, offline):
    torch.manual_seed(0)
    state = ra.presets.rga_resnet50(input_size=SIZE).state_dict()
    model = hub.ReIDModel(preset="rga_resnet50", input_size=SIZE, weights=state)
    key = "layer1.attention.W_spatial.0.weight"
    assert torch.equal(model.state_dict()[key], state[key])
    assert "weights" not in model.config


def test_extras_are_imported_by_their_modules_only():
    code = """
import sys
import reid_attention as ra
loaded = [m for m in ("timm", "huggingface_hub", "safetensors") if m in sys.modules]
assert not loaded, loaded
sys.modules["huggingface_hub"] = None  # as if not installed
try:
    import reid_attention.hub
except ImportError as err:
    print(type(err).__name__, err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ('MissingExtraError reid_attention.hub needs huggingface_hub: '
                                   'pip install "reid-attention[hf]"')


# --- docs/integrations.md ----------------------------------------------------------------------


def doc_blocks(lang: str):
    """(line, section, code) of the ``lang`` blocks in MY_SECTIONS of docs/integrations.md."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    section, blocks, i = None, [], 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        elif lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if lines[i][3:].strip() == lang and section in MY_SECTIONS:
                blocks.append((i + 1, section, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def test_every_section_has_a_python_block():
    assert sorted({section for _, section, _ in doc_blocks("python")}) == sorted(MY_SECTIONS)


def test_doc_extras_exist():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [m for _, _, code in doc_blocks("bash") for m in re.findall(r"reid-attention\[(\w+)\]", code)]
    assert named and all(extra in extras for extra in named), named


def _expected_prints(code: str):
    """The comments of ``print(...)  # value`` lines: the printed line starts with value (less
    a trailing ``...]`` / ``...}``)."""
    out = []
    for line in code.splitlines():
        match = re.match(r"\s*print\(.*\)\s*#\s*(.+)$", line)
        if match:
            out.append(re.sub(r"(, )?\.\.\.[\]}]$", "", match.group(1).strip()))
    return out


@pytest.mark.parametrize("line, section, code", doc_blocks("python"),
                         ids=[f"L{line}-{section}" for line, section, _ in doc_blocks("python")])
def test_doc_python_blocks_run(line, section, code, offline):
    if section == "timm":
        pytest.importorskip("timm")
    if section == "Hugging Face Hub":
        pytest.importorskip("huggingface_hub")
    (offline / "reid-attention").symlink_to(ROOT)  # "a clone" in the torch.hub section
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"docs/integrations.md:{line}", "exec"), namespace)
    for name, shape in re.findall(r"^(\w+) = .*#\s*\((\d+(?:, \d+)*)\)", code, flags=re.M):
        assert tuple(namespace[name].shape) == tuple(map(int, shape.split(", "))), name
    lines = printed.getvalue().splitlines()
    expected = _expected_prints(code)
    assert len(lines) == len(expected), printed.getvalue()
    for got, want in zip(lines, expected):
        assert got.startswith(want), (got, want)
