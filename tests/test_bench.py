"""The benchmark engine and the ``reid-attention bench`` CLI, on tiny configurations."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import torch

import reid_attention as ra
from reid_attention.bench.cli import main, parse_sites
from reid_attention.bench.measure import count_flops, peak_memory
from reid_attention.bench.suites import layer_spec

TINY = ["--kind", "rga_sc", "--sites", "64:16x8", "--batch", "2", "--repeat", "0.01", "--quiet"]
RECORD_FIELDS = {"kind", "site", "impl", "batch", "dtype", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_iqr_ms",
                 "samples_per_s", "gflops", "params", "memory_batch", "peak_mib"}


def rga_flops(kind, channels, feat_size, batch, impl, cr=8, sr=8, dr=8):
    """Forward FLOPs (2 x multiply-adds) of RGA, derived by hand.

    One axis with n tokens of d features, d' = inner feature width, m = n/s embedded relation
    channels, k = (1 + m) // down_ratio, counts 2 * B * n * [...] with [...] =
      reference: 3 d' d (theta, phi, g) + n d' (R = theta^T phi) + 2 n m (embedding of 2n-vectors)
                 + k (1 + m) + k (the W network)
      fused:     3 d' d + 2 d' m (Ar, Ac) + 2 d' m (E = Ar theta + Ac phi) + k m + k
                 (the feature term g enters W's first conv as a rank-1 product, not a GEMM)
    """
    n_pos = feat_size[0] * feat_size[1]
    axes = {"spatial": (channels, n_pos, channels // cr, n_pos // sr),
            "channel": (n_pos, channels, n_pos // sr, channels // cr)}
    used = {"rga_s": ["spatial"], "rga_c": ["channel"], "rga_sc": ["spatial", "channel"]}[kind]
    total = 0
    for axis in used:
        d, n, d_in, m = axes[axis]
        k = (1 + m) // dr
        if impl == "reference":
            per_token = 3 * d_in * d + n * d_in + 2 * n * m + k * (1 + m) + k
        else:
            per_token = 3 * d_in * d + 4 * d_in * m + k * m + k
        total += 2 * batch * n * per_token
    return total


@pytest.mark.parametrize("kind", ["rga_s", "rga_c", "rga_sc"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("channels,feat_size", [(64, (16, 8)), (256, (64, 32)), (2048, (16, 8))])
def test_flop_count_matches_hand_formula(kind, impl, channels, feat_size):
    m = ra.create_attention(kind, channels, feat_size=feat_size, impl=impl)
    x = torch.randn(2, channels, *feat_size)
    assert count_flops(m, x) == rga_flops(kind, channels, feat_size, 2, impl)


def test_paper_model_flop_reduction_from_formula():
    """The design's claim: fused RGA-SC over the four paper sites needs >= 5.5x fewer FLOPs."""
    sites = [(256, (64, 32)), (512, (32, 16)), (1024, (16, 8)), (2048, (16, 8))]
    ref = sum(rga_flops("rga_sc", c, fs, 1, "reference") for c, fs in sites)
    fused = sum(rga_flops("rga_sc", c, fs, 1, "fused") for c, fs in sites)
    assert ref / fused >= 5.5


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_cli_layers_every_format(fmt, capsys, tmp_path):
    out = tmp_path / f"result.{fmt}"
    assert main(["layers", *TINY, "--format", fmt, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text().strip() == text.strip()
    if fmt == "json":
        data = json.loads(text)
        assert {"date", "torch", "device", "device_name", "threads"} <= set(data["environment"])
        assert len(data["records"]) == 2
        for r in data["records"]:
            assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
            assert r["fwd_bwd_ms"] > 0 and r["gflops"] > 0 and r["peak_mib"] >= 0 and r["params"] > 0
        assert {r["impl"] for r in data["records"]} == {"reference", "fused"}
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["impl"] for r in rows] == ["reference", "fused"]
        assert float(rows[0]["gflops"]) > float(rows[1]["gflops"])
    elif fmt == "markdown":
        assert "| kind | site | impl |" in text and "| rga_sc | 64:16x8 | fused |" in text
    else:
        assert "fwd+bwd ms" in text and "rga_sc" in text and "2 x multiply-adds" in text


def test_cli_sweep_writes_plot(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["sweep", "--kind", "rga_s", "--channels", "64", "--resolutions", "64x32,96x64", "--batch", "2",
            "--repeat", "0.01", "--quiet", "--format", "json", "--out", str(out)]
    assert main(argv) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["input"], r["impl"]) for r in records] == [
        ("64x32", "reference"), ("64x32", "fused"), ("96x64", "reference"), ("96x64", "fused")]
    assert records[2]["site"] == "64:24x16"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_memory_is_recorded_not_raised():
    """Under a 300 MiB cap the reference path's (B, n, n) relation does not fit; fused does."""
    cap = 300 * 2**20
    ref = dict(layer_spec("rga_s", 64, (64, 32), batch=16, impl="reference"), memory_limit=cap)
    assert peak_memory(ref) == {"error": "out of memory"}
    fused = dict(ref, kwargs=dict(ref["kwargs"], impl="fused"))
    assert 0 < peak_memory(fused)["peak_bytes"] < cap


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "reid_attention", "bench", "layers", *TINY, "--format", "json",
                           "--impl", "fused"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["records"][0]["impl"] == "fused"
    bad = subprocess.run([sys.executable, "-m", "reid_attention", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "available: bench" in bad.stderr


def test_parse_sites_and_bad_kind():
    assert parse_sites("256:64x32,512:32x16") == [(256, (64, 32)), (512, (32, 16))]
    with pytest.raises(Exception, match="C:HxW"):
        parse_sites("256-64x32")
    with pytest.raises(SystemExit, match="unknown --kind nope"):
        main(["layers", "--kind", "nope", "--quiet"])


def test_cli_network_overhead(capsys):
    argv = ["network", "--backbone", "resnet18", "--attention", "rga_s", "--input-size", "128x64",
            "--sites", "layer1,layer2", "--batch", "2", "--memory-batch", "2", "--repeat", "0.01", "--quiet",
            "--format", "json"]
    assert main(argv) == 0
    plain, wrapped = json.loads(capsys.readouterr().out)["records"]
    assert (plain["model"], wrapped["model"]) == ("resnet18", "resnet18 + rga_s")
    assert plain["time_x"] == 1 and plain["params_x"] == 1
    extra = sum(p.numel() for s in ((64, (32, 16)), (128, (16, 8)))
                for p in ra.create_attention("rga_s", s[0], feat_size=s[1]).parameters())
    assert wrapped["params"] - plain["params"] == extra
    assert wrapped["gflops_x"] > 1 and wrapped["peak_mib"] > 0 and wrapped["time_x"] > 0


def test_options_without_a_command_run_the_default():
    from reid_attention.bench.cli import build_parser, normalise_argv

    assert normalise_argv([]) == ["default"]
    assert normalise_argv(["--threads", "2"]) == ["default", "--threads", "2"]
    assert normalise_argv(["layers", "--batch", "2"]) == ["layers", "--batch", "2"]
    args = build_parser().parse_args(normalise_argv(["--threads", "2", "--format", "json"]))
    assert (args.command, args.threads, args.format) == ("default", 2, "json")


_FAULTS = """
import resource, sys, torch
from reid_attention.bench.measure import set_malloc
set_malloc(sys.argv[1])
def touch():
    torch.ones(16 * 2**20)  # 64 MiB, allocated, written, freed
touch(), touch()  # (an aligned block may not fit the first hole, the merged holes it does)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_retain_reuses_freed_memory():
    """'retain' serves large tensors mostly from freed ones (system: a fresh fault per 4 KiB page).

    Not always all of them: a 64-byte-aligned block sometimes misses a hole of its own size by
    the alignment slack and the heap grows once more.
    """
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("system", "retain")}
    assert faults["retain"] < faults["system"] / 3, faults


def test_malloc_option_is_validated_and_recorded(capsys):
    from reid_attention.bench.measure import set_malloc

    with pytest.raises(ValueError, match="malloc must be one of"):
        set_malloc("jemalloc")
    assert main(["layers", *TINY, "--format", "json", "--malloc", "system"]) == 0
    assert json.loads(capsys.readouterr().out)["environment"]["malloc"] == "system"
