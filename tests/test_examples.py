"""The examples run as scripts (subprocess, CPU) and do what they say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import reid_attention as ra

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_wrap_torchvision(tmp_path):
    out = run("wrap_torchvision.py", cwd=tmp_path)
    for site in ("relu", "layer1", "layer2", "layer4"):
        assert re.search(rf"^\s+{site}\s+\d+\s+\d+x\d+\s+\d+ NCHW$", out, re.M), site
    assert re.search(r"baseline: 25\.5\d M parameters, [\d.]+ GFLOPs \(2 x MACs\)", out)
    rows = dict(re.findall(r"^\s+(\w+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+%$", out, re.M))
    assert sorted(rows) == ra.list_attentions()  # every kind fits ResNet-50 at 256x128, last stride 1
    assert float(rows["pfsa"]) == 0 and float(rows["rga_sc"]) > float(rows["rga_s"]) > 0


def test_train_step_loss_goes_down(tmp_path):
    out = run("train_step.py", "--steps", "3", cwd=tmp_path)
    assert len(re.findall(r"^step \d+: loss", out, re.M)) == 3
    first, last = map(float, re.search(r"^loss ([\d.]+) -> ([\d.]+)$", out, re.M).groups())
    assert last < first


def test_attention_maps_writes_a_png(tmp_path):
    out = run("attention_maps.py", "--out", "maps.png", cwd=tmp_path)
    assert "saved 4 attention maps" in out
    png = (tmp_path / "maps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height  # one row: the input and four overlays
