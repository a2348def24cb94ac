"""``reid-attention sites MODEL --input HxW``: table, JSON, --all, timm names, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reid_attention.__main__ import main


def run(capsys, *argv):
    code = main(["sites", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_marks_the_default_sites(capsys):
    code, out, err = run(capsys, "resnet18", "--input", "256x128")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "channels", "map", "stride", "layout", "default"]
    assert lines[1].split() == ["relu", "64", "128x64", "2", "NCHW"]  # the stem: a site, not a default
    assert lines[2].split() == ["layer1", "64", "64x32", "4", "NCHW", "yes"]
    assert lines[-1].split() == ["layer4", "512", "8x4", "32", "NCHW", "yes"]


def test_json_all_and_regnet_built_off_meta(capsys):
    # RegNet computes its widths from tensor data: built on the CPU instead of the meta device
    code, out, _ = run(capsys, "regnet_y_400mf", "--input", "224x224", "--format", "json", "--all")
    report = json.loads(out)
    assert code == 0 and report["model"] == "regnet_y_400mf" and report["input_size"] == [224, 224]
    by_name = {site["name"]: site for site in report["sites"]}
    assert by_name["trunk_output.block1"] == {
        "name": "trunk_output.block1", "channels": 48, "feat_size": [56, 56], "stride": 4, "layout": "NCHW",
        "default": True,
    }
    assert "stem.0" in by_name and not by_name["stem.0"]["default"]  # --all: inner modules too


def test_timm_model_and_nhwc_layout(capsys):
    pytest.importorskip("timm")
    code, out, _ = run(capsys, "seresnext26d_32x4d", "--input", "128x64", "--format", "json")  # timm only
    sites = json.loads(out)["sites"]
    assert code == 0 and [s["name"] for s in sites] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert sites[-1]["feat_size"] == [4, 2] and sites[-1]["channels"] == 2048
    code, out, _ = run(capsys, "swin_t", "--input", "224x224")  # torchvision's Swin: NHWC stages
    assert code == 0 and out.splitlines()[1].split() == ["features.1", "96", "56x56", "4", "NHWC", "yes"]


ERRORS = [
    (["no_such_net"], "unknown model 'no_such_net'"),
    (["vit_b_16", "--input", "224x224"], "shape probe could not run VisionTransformer"),  # one size only
    (["resnet18", "--input", "1x1"], "resnet18 outputs no feature map that follows the input size at 1x1"),
    (["resnet18", "--input", "256"], "argument --input: expected HxW"),
    (["resnet18", "--input", "256x0"], "argument --input: expected HxW"),
    (["resnet18", "--input", "axb"], "argument --input: expected HxW"),
    (["resnet18", "--format", "csv"], "argument --format: invalid choice"),
]


@pytest.mark.parametrize("argv,expected", ERRORS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_errors_are_one_line_and_status_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sites", *argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("reid-attention sites: error: "), err
    assert expected in err


def test_console_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "reid_attention", "sites", "resnet18", "--input", "64x32", "--format", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [s["name"] for s in json.loads(done.stdout)["sites"] if s["default"]] == [
        "layer1", "layer2", "layer3", "layer4"]
