"""The benchmark engine and the ``reid-attention bench`` CLI, on tiny configurations."""

from __future__ import annotations

import csv
import importlib
import io
import json
import pathlib
import subprocess
import sys

import pytest
import torch

import reid_attention as ra
from reid_attention.bench import jobs
from reid_attention.bench.args import build_parser, help_text, parse_sites
from reid_attention.bench.cli import main
from reid_attention.bench.jobs import with_overhead
from reid_attention.bench.measure import count_flops, is_out_of_memory, peak_memory, train_step
from reid_attention.bench.paired import PairedRatio, paired_ratio
from reid_attention.bench.render import LAYER_COLUMNS, render
from reid_attention.bench.suites import failed, layer_spec, measure, unreliable_reasons

TINY = ["--kind", "rga_sc", "--sites", "64:16x8", "--batch", "2", "--repeat", "0.01", "--quiet"]
RECORD_FIELDS = {"kind", "site", "impl", "batch", "dtype", "step", "fwd_ms", "fwd_runs", "step_ms",
                 "step_iqr_ms", "step_runs", "samples_per_s", "gflops", "params", "memory_batch", "peak_mib",
                 "unreliable"}
PAPER_RGA_SITES = [(256, (64, 32)), (512, (32, 16)), (1024, (16, 8)), (2048, (16, 8))]


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
    """The design's claim: fused RGA-SC over the four paper sites needs >= 5.5x fewer FLOPs,
    counted by the library on the real modules and equal to the hand formula."""
    counted = {}
    for impl in ("reference", "fused"):
        counted[impl] = sum(count_flops(ra.create_attention("rga_sc", c, feat_size=fs, impl=impl),
                                        torch.randn(1, c, *fs)) for c, fs in PAPER_RGA_SITES)
        assert counted[impl] == sum(rga_flops("rga_sc", c, fs, 1, impl) for c, fs in PAPER_RGA_SITES)
    assert counted["reference"] / counted["fused"] >= 5.5


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
            assert r["step_ms"] > 0 and r["gflops"] > 0 and r["params"] > 0 and r["peak_mib"] >= 0
            assert r["step"] == "optimizer" and isinstance(r["unreliable"], list)
        assert data["environment"]["step"] == "optimizer"
        assert {r["impl"] for r in data["records"]} == {"reference", "fused"}
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["impl"] for r in rows] == ["reference", "fused"]
        assert float(rows[0]["gflops"]) > float(rows[1]["gflops"])
    elif fmt == "markdown":
        assert "| kind | site | impl |" in text and "| rga_sc | 64:16x8 | fused |" in text
    else:
        assert ("step ms" in text and "rga_sc" in text and "2 x multiply-adds" in text
                and "SGD momentum" in text)


def test_cli_layers_memory_modes(capsys):
    """--memory full,lean: one fused row per mode for RGA / APNet-S kinds, one row otherwise."""
    tiny = ["--sites", "64:16x8", "--batch", "2", "--repeat", "0.01", "--quiet", "--format", "json"]
    assert main(["layers", "--kind", "rga_s,pfsa", "--memory", "full,lean", *tiny]) == 0
    rows = [(r["kind"], r["impl"], r.get("memory")) for r in json.loads(capsys.readouterr().out)["records"]]
    assert rows == [("rga_s", "reference", None), ("rga_s", "fused", "full"), ("rga_s", "fused", "lean"),
                    ("pfsa", "reference", None), ("pfsa", "fused", None)]
    assert main(["layers", "--kind", "rga_s", *tiny]) == 0  # the default mode only: no memory field
    assert all("memory" not in r for r in json.loads(capsys.readouterr().out)["records"])


def test_default_run_builds_its_rows(monkeypatch, capsys):
    """The default run (``make bench``) assembles every row: every kind at its default site in
    both impls, then plain and wrapped ResNet-50 (measurement stubbed: only the specs are seen)."""
    specs = []

    def fake(spec, label=None, **_):
        specs.append(spec)
        return dict(label or {}, **{k: v for k, v in spec["kwargs"].items() if k in ("name", "impl")},
                    step_ms=1.0, peak_mib=1.0, params=1, gflops=1.0, unreliable=[])

    def fake_eval(specs_, names, *, batches, runtimes, **_):
        return [dict(model=n, runtime=r, batch=b) for r in runtimes for b in batches for n in names]

    pair = PairedRatio(ratio=1.3, spread=0.01, rounds=6, base_ms=1.0, other_ms=1.3)
    monkeypatch.setattr(jobs, "measure_layer", lambda spec, **kw: fake(spec, **kw))
    monkeypatch.setattr(jobs, "measure", fake)
    monkeypatch.setattr(jobs, "paired_step", lambda base, spec, **kw: specs.append(spec) or pair)
    monkeypatch.setattr(jobs, "eval_rows", fake_eval)
    monkeypatch.setattr(jobs, "available_runtimes", lambda: ["torch", "onnxruntime"])
    assert main(["--quiet", "--format", "json"]) == 0
    layers = [s for s in specs if s["factory"].endswith("create_attention")]
    assert len(layers) == 2 * len(ra.list_attentions())
    assert all("memory" not in s["kwargs"] for s in specs)
    # plain and wrapped ResNet-50 timed alone, then the wrapped one's step paired with the plain one's
    assert [s["kwargs"]["attention"] for s in specs[len(layers):]] == [None, "rga_sc", "rga_sc"]
    records = json.loads(capsys.readouterr().out)["records"]
    network = [r for r in records if "model" in r and "runtime" not in r]
    assert [r.get("time_x") for r in network] == [1.0, 1.3]
    evals = [(r["runtime"], r["batch"]) for r in records if "runtime" in r]
    assert evals == [(rt, b) for rt in ("torch", "onnxruntime") for b in (1, 8) for _ in range(2)]


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
    done = subprocess.run([sys.executable, "-m", "reid_attention", "bench", "layers", *TINY, "--format",
                           "json", "--impl", "fused"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["records"][0]["impl"] == "fused"
    bad = subprocess.run([sys.executable, "-m", "reid_attention", "frobnicate"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr == "reid-attention: error: unknown command 'frobnicate'; expected bench or sites\n"


def test_parse_sites():
    assert parse_sites("256:64x32,512:32x16") == [(256, (64, 32)), (512, (32, 16))]
    for bad in ("256-64x32", "256:0x32", "0:64x32", ""):
        with pytest.raises(Exception, match="C:HxW"):
            parse_sites(bad)


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
    assert wrapped["gflops_x"] > 1 and wrapped["peak_mib"] > 0
    # time x is the paired ratio: a number whose spread settled, or none and the row says why
    assert 6 <= wrapped["time_x_rounds"] <= 30
    if wrapped["time_x"] is None:
        assert wrapped["time_x_spread"] > 0.05 and any("paired ratio" in u for u in wrapped["unreliable"])
    else:
        assert wrapped["time_x"] > 0 and wrapped["time_x_spread"] <= 0.05


def test_options_without_a_command_run_the_default():
    from reid_attention.bench.args import normalise_argv

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


# --- the timed training step ---------------------------------------------------------------------


def _tiny_layer():
    torch.manual_seed(0)
    return ra.create_attention("rga_s", 16, feat_size=(4, 2)), torch.randn(2, 16, 4, 2, requires_grad=True)


def test_optimizer_step_updates_weights_and_frees_gradients():
    module, x = _tiny_layer()
    before = [p.detach().clone() for p in module.parameters()]
    step = train_step(module, x)
    step()
    assert all(p.grad is None for p in module.parameters()) and x.grad is None  # zero_grad(set_to_none=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))  # the optimiser stepped
    assert x.requires_grad  # the layer's input gradient is computed (and dropped), as mid-network


def test_accumulate_step_accumulates():
    module, x = _tiny_layer()
    before = [p.detach().clone() for p in module.parameters()]
    step = train_step(module, x, step="accumulate")
    step()
    first = [p.grad.clone() for p in module.parameters()]
    step()
    for g1, p in zip(first, module.parameters()):
        torch.testing.assert_close(p.grad, 2 * g1)  # eval-independent: BN in train mode, same batch
    assert all(torch.equal(a, p) for a, p in zip(before, module.parameters()))
    with pytest.raises(ValueError, match="step must be one of"):
        train_step(module, x, step="adam")


def test_parameter_free_layer_trains_without_an_optimizer():
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    train_step(ra.create_attention("pfsa", 8), x)()
    assert x.grad is None


def test_network_spec_images_need_no_gradient():
    from reid_attention.bench.suites import network_spec

    spec = network_spec("resnet18", "rga_s", (64, 32), batch=2)
    assert spec["input_grad"] is False and spec["step"] == "optimizer"


# --- failures: out of memory is a result, anything else an error ---------------------------------

_FAILING = '''
import torch

class Fails(torch.nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.exc == "runtime":
            raise RuntimeError("boom: not a memory problem")
        if self.exc == "oom":
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
        return x * self.w

def make(name, channels, feat_size, impl=None):
    return Fails(name)
'''


@pytest.mark.parametrize("exc,is_failure", [("runtime", True), ("oom", False)])
def test_measure_classifies_errors(tmp_path, exc, is_failure):
    path = tmp_path / "failing.py"
    path.write_text(_FAILING)
    spec = layer_spec(exc, 4, (2, 2), batch=2, impl=None, factory=f"{path}:make")
    record = measure(spec, {"kind": exc}, memory_batch=0, min_run_time=0.01)
    assert record["error"].startswith("RuntimeError: ")
    assert record["oom"] is (not is_failure) and failed(record) is is_failure


def test_is_out_of_memory():
    assert is_out_of_memory(MemoryError()) and is_out_of_memory("CUDA out of memory. Tried to allocate 2 GiB")
    assert is_out_of_memory("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory("exit 1: ValueError")


def _fake_row(**fields):
    return {"kind": "rga_sc", "site": "64:16x8", "impl": "fused", "batch": 2, "step_ms": 1.0, **fields}


@pytest.mark.parametrize("error,oom,status", [(None, None, 0), ("out of memory", True, 0),
                                              ("RuntimeError: boom", False, 1)])
def test_exit_status_of_the_cli(monkeypatch, capsys, error, oom, status):
    """A row that failed other than by running out of memory makes the command exit 1."""
    row = _fake_row(error=error, oom=oom)
    monkeypatch.setattr(jobs, "measure_layer", lambda spec, **kw: dict(row))
    assert main(["layers", *TINY]) == status
    err = capsys.readouterr().err
    assert ("rga_sc 64:16x8 fused failed: RuntimeError: boom" in err) is (status == 1)


# --- unreliable timings ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields,expected", [
    ({"step_ms": 10.0, "step_iqr_ms": 1.0, "step_runs": 5, "fwd_ms": 4.0, "fwd_iqr_ms": 0.2, "fwd_runs": 9},
     []),
    ({"step_ms": 10.0, "step_iqr_ms": 2.0, "step_runs": 5}, []),  # exactly 20%: not above
    ({"step_ms": 10.0, "step_iqr_ms": 0.0, "step_runs": 1}, ["step: a single measured block"]),
    ({"step_ms": 10.0, "step_iqr_ms": 2.5, "step_runs": 5}, ["step: IQR 25% of the median"]),
    ({"step_ms": 10.0, "step_iqr_ms": 1.0, "step_runs": 5, "fwd_ms": 12.0, "fwd_iqr_ms": 4.0, "fwd_runs": 1},
     ["forward: a single measured block", "forward: IQR 33% of the median",
      "forward slower than the whole step"]),
    ({}, []),  # nothing timed (an out-of-memory row): nothing to judge
])
def test_unreliable_reasons(fields, expected):
    assert unreliable_reasons(fields) == expected


def _result(records):
    env = {"date": "2026-01-01", "device_name": "cpu", "threads": 2, "torch": "x", "dtype": "float32",
           "step_text": "forward + ..."}
    return {"environment": env, "records": records, "tables": [(records, LAYER_COLUMNS)]}


def test_unreliable_rows_are_flagged_in_every_format():
    rows = [_fake_row(unreliable=[]),
            _fake_row(impl="reference", unreliable=["step: a single measured block"])]
    table = render(_result(rows), "table").splitlines()
    body = [line for line in table if "rga_sc" in line and "64:16x8" in line and not line.startswith("! rga")]
    assert [line.startswith("!") for line in body] == [False, True]
    assert "! rga_sc 64:16x8 reference: step: a single measured block" in table
    assert "| ! | rga_sc | 64:16x8 | reference |" in render(_result(rows), "markdown")
    csv_rows = list(csv.DictReader(io.StringIO(render(_result(rows), "csv"))))
    assert [r["unreliable"] for r in csv_rows] == ["", "step: a single measured block"]
    assert json.loads(render(_result(rows), "json"))["records"][1]["unreliable"] == rows[1]["unreliable"]
    clean = render(_result([rows[0]]), "table")
    assert "!" not in clean


def test_overhead_ratios():
    """time x is the paired ratio (not the ratio of the two rows' own medians, here 2.0)."""
    plain = {"model": "r", "step_ms": 100.0, "peak_mib": 50.0, "params": 10, "gflops": 2.0}
    wrapped = {"model": "r + a", "step_ms": 200.0, "peak_mib": 60.0, "params": 12, "gflops": 2.5}
    pair = PairedRatio(ratio=1.5, spread=0.02, rounds=6, base_ms=100.0, other_ms=150.0)
    assert with_overhead([plain, wrapped, {"paired": pair}]) == [plain, wrapped]
    assert (wrapped["time_x"], wrapped["memory_x"], wrapped["gflops_x"]) == (1.5, 1.2, 1.25)
    assert (wrapped["time_x_spread"], wrapped["time_x_rounds"]) == (0.02, 6)
    assert wrapped["time_per_flop_x"] == pytest.approx(1.2) and plain["time_x"] == 1


def test_an_unsettled_ratio_is_no_number():
    plain = {"model": "r", "step_ms": 100.0, "gflops": 2.0}
    wrapped = {"model": "r + a", "step_ms": 30.0, "gflops": 2.5, "unreliable": []}
    pair = PairedRatio(ratio=None, spread=0.4, rounds=30, base_ms=100.0, other_ms=30.0, reason="not settled")
    with_overhead([plain, wrapped, {"paired": pair}])
    assert wrapped["time_x"] is None and "time_per_flop_x" not in wrapped
    assert wrapped["unreliable"] == ["not settled"]
    table = render(_result([plain, wrapped]), "table")
    assert "0.3" not in table and "! r + a: not settled" in table


class _Clock:
    """A fake ``time.perf_counter`` that the timed callables advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from reid_attention.bench import paired

    fake = _Clock()
    monkeypatch.setattr(paired.time, "perf_counter", fake)
    return fake


def test_paired_ratio_alternates_and_stops_when_settled(clock):
    calls = []

    def timed(name, seconds):
        def fn():
            calls.append(name)
            clock.now += seconds
        return fn

    result = paired_ratio(timed("a", 0.1), timed("b", 0.2), block_time=0.2, min_rounds=4, max_rounds=10)
    assert result.ratio == pytest.approx(2) and result.spread == pytest.approx(0)
    assert result.rounds == 4 and result.reason is None
    assert (result.base_ms, result.other_ms) == (pytest.approx(100), pytest.approx(200))
    # after the warm-up and one call each to size the blocks (0.2 s: a twice, b once), ABBA order
    assert "".join(calls[4:]) == "aa" "b" "b" "aa" "aa" "b" "b" "aa"


def test_paired_ratio_refuses_a_ratio_that_does_not_settle(clock):
    state = {"n": 0}

    def base():
        clock.now += 0.1

    def noisy():  # 0.1 s, then 0.3 s, then 0.1 s ...: ratios 1 and 3
        state["n"] += 1
        clock.now += 0.1 if state["n"] % 2 else 0.3

    result = paired_ratio(base, noisy, block_time=0.05, min_rounds=3, max_rounds=8, max_spread=0.1)
    assert result.ratio is None and result.rounds == 8 and result.spread > 0.1
    assert "not settled" in result.reason and "8 rounds" in result.reason
    with pytest.raises(ValueError, match="min_rounds"):
        paired_ratio(base, noisy, min_rounds=5, max_rounds=4)


def test_cli_network_eval_rows(capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    argv = ["network", "--mode", "eval", "--backbone", "resnet18", "--attention", "pfsa", "--input-size",
            "64x32", "--eval-batches", "1,2", "--max-rounds", "2", "--quiet", "--format", "json"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    keys = [(r["model"], r["runtime"], r["batch"]) for r in records]
    assert keys == [(m, rt, b) for rt in ("torch", "onnxruntime") for b in (1, 2)
                    for m in ("resnet18", "resnet18 + pfsa")]
    for r in records:
        assert r["fwd_ms"] > 0 and r["gflops"] > 0
        assert (r["parity"] is None) == (r["runtime"] == "torch")
        if r["model"] == "resnet18":
            assert r["time_x"] == 1
        else:
            assert r["gflops_x"] >= 1 and r["time_x_rounds"] == 2  # PFSA's products count no FLOPs
    # ONNX Runtime ran the exported models: its outputs are finite and compared with torch's
    assert all(r["parity"] < 1 for r in records if r["runtime"] == "onnxruntime")


# --- a CLI that survives users --------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["layers", "--sites", "foo"], "--sites: expected 'paper', 'first', 'default' or C:HxW"),
    (["layers", "--sites", "256:0x32"], "positive"),
    (["layers", "--kind", "nope"], "unknown attention kind 'nope'"),
    (["layers", "--impl", "foo"], "unknown impl 'foo'; expected reference, fused"),
    (["layers", "--batch", "0"], "--batch: expected a positive integer"),
    (["layers", "--repeat", "-1"], "--repeat: expected a positive number"),
    (["layers", "--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["network", "--backbone", "notamodel"], "unknown torchvision classification model 'notamodel'"),
    (["network", "--attention", "rgasc"], "did you mean 'rga_sc'?"),
    (["network", "--input-size", "256x0"], "expected HxW with positive H and W"),
    (["network", "--sites", "layer9"], "cannot build resnet50 + rga_sc: unknown site(s) ['layer9']"),
    (["network", "--backbone", "mobilenet_v2"], "--last-stride 0"),
    (["network", "--max-spread", "1.5"], "--max-spread: expected a fraction between 0 and 1"),
    (["network", "--eval-batches", "1,0"], "--eval-batches: expected a positive integer"),
    (["network", "--runtimes", "tensorrt"], "unknown runtime 'tensorrt'"),
    (["sweep", "--resolutions", "2x2"], "cannot build rga_s at site 256:0x0"),
    (["--kind", "rga_s"], "--kind is an option of bench layers and bench sweep"),
    (["network", "--kind", "rga_s"], "--kind is an option of bench layers"),
    (["layer", "--batch", "2"], "'layer' is not a command (expected one of layers, network, sweep, default)"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["layers", "--device", "cuda"], "CUDA is not available here"))


@pytest.mark.parametrize("argv,expected", BAD_ARGUMENTS,
                         ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_arguments_get_one_line_and_status_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and expected in lines[0], captured.err
    assert captured.out == ""


def test_output_paths_are_checked_before_any_row(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["layers", "--out", f"{a_file}/r.json"],
         f"--out: cannot write '{a_file}/r.json': '{a_file}' is not a"),
        (["network", "--out", str(tmp_path)], f"--out: '{tmp_path}' is a directory"),
        (["sweep", "--plot", f"{a_file}/deeper/x.png"], f"--plot: cannot write '{a_file}/deeper/x.png'"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.out == "", captured.err
        assert len(captured.err.splitlines()) == 1 and expected in captured.err, captured.err
    new = tmp_path / "new" / "dir" / "r.json"
    assert build_parser().parse_args(["layers", "--out", str(new)]).out == new
    assert not (tmp_path / "new").exists()  # made when the file is written


def test_misplaced_option_hint_from_the_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "reid_attention", "bench", "--kind", "rga_s"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "e.g. reid-attention bench layers --kind rga_s" in done.stderr


def test_help_is_plain_text_and_shows_every_default():
    parser = build_parser()
    for name, sub in parser.commands.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and "None" not in text, name
        for action in sub.arguments:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
                assert "(default" in help_text(action), (name, action.option_strings)
    assert "``" not in parser.format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reid-attention {ra.__version__}"


def test_out_file_survives_a_broken_pipe(tmp_path):
    """``... --format json --out r.json | head -c 20``: the file is complete, no traceback."""
    out = tmp_path / "r.json"
    command = [sys.executable, "-m", "reid_attention", "bench", "layers", *TINY, "--impl", "fused",
               "--memory-batch", "0", "--format", "json", "--out", str(out)]
    reader = subprocess.Popen(["head", "-c", "20"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run(command, stdout=reader.stdin, stderr=subprocess.PIPE, text=True)
    reader.stdin.close()
    reader.wait()
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert json.loads(out.read_text())["records"][0]["impl"] == "fused"


def test_top_level_version(capsys):
    from reid_attention.__main__ import main as top_main

    assert top_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"reid-attention {ra.__version__}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cli_layers_on_cuda(capsys):
    """The CUDA paths: the in-process memory probe and the optimiser step on the GPU."""
    assert main(["layers", *TINY, "--device", "cuda", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["device"] == "cuda"
    assert all(r["peak_mib"] > 0 and r["step_ms"] > 0 and not r.get("error") for r in data["records"])


# --- benchmarks/gpu_check.sh ------------------------------------------------------------------------

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
GPU_CHECK = BENCHMARKS / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash_and_lists_its_steps():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, check=True)
    steps = ["cuda_tests", "layers_float32", "layers_bfloat16", "network", "network_lean", "pyramid_eager",
             "pfsa_compiled", "apnet_s_compiled"]
    listed = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert listed == steps, done.stdout
    assert "pytest tests -q -k cuda" in done.stdout and "--dtype bfloat16" in done.stdout
    assert "--compile" in done.stdout and "--device cuda" in done.stdout
    bad = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr


# --- benchmarks/network_alternating.py -----------------------------------------------------------


def test_network_alternating_quick_run(tmp_path):
    """The alternating network benchmark's smoke run: three models, ratios to the plain step."""
    script = BENCHMARKS / "network_alternating.py"
    out = tmp_path / "alt.json"
    subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    records = {r["model"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == ["resnet50", "resnet50 + rga_sc (full)", "resnet50 + rga_sc (lean)"]
    assert records["resnet50"]["time_x"] == 1.0 and records["resnet50"]["gflops_x"] == 1.0
    for name in list(records)[1:]:
        assert records[name]["gflops_x"] > 1 and records[name]["step_ms"] > 0
    bad = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--rounds" in bad.stderr


# --- the launch-count view ----------------------------------------------------------------------


def test_dispatch_counts_computing_ops_and_their_bytes():
    from reid_attention.bench.dispatch import count_dispatch

    a, b = torch.ones(4, 8), torch.ones(4, 8)
    result = count_dispatch(lambda: (a + b).view(-1).sum())  # add, sum; the view launches nothing
    assert result["kernels"] == 2
    assert result["moved_mib"] * 2**20 == (3 * 32 + 32 + 1) * 4  # add: 2 in, 1 out; sum: 1 in, 1 out


def test_layer_rows_count_kernels_and_bytes(capsys):
    """APNet-S's fused path launches fewer kernels and moves fewer bytes than the stripe loop
    (the official-style reference), which materialises every stripe's relation matrix."""
    argv = ["layers", "--kind", "apnet_s", "--sites", "64:32x16", "--batch", "2", "--repeat", "0.01",
            "--memory-batch", "0", "--quiet", "--format", "json"]
    assert main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(capsys.readouterr().out)["records"]}
    assert rows["fused"]["kernels"] < rows["reference"]["kernels"]
    assert rows["fused"]["moved_mib"] < rows["reference"]["moved_mib"]


def _script_result(name, tmp_path, *args):
    """The JSON a benchmark script's smoke run (``--quick``) writes."""
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(BENCHMARKS / name), "--quick", "--out", str(out), *args],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def _run_script(name, tmp_path, *args):
    return _script_result(name, tmp_path, *args)["records"]


def test_launch_counts_quick_run(tmp_path):
    records = _run_script("launch_counts.py", tmp_path)
    assert [(r["kind"], r["impl"]) for r in records] == [
        (k, i) for k in ("pfsa", "apnet_s") for i in ("reference", "fused")]
    for r in records:
        assert r["kernels"] > 0 and r["bound"] in ("launches", "bytes")
        assert max(r["launch_floor_ms"], r["traffic_floor_ms"]) > 0
    assert all(r["floor_x"] > 0 for r in records if r["impl"] == "fused")


def test_lean_vs_default_quick_run(tmp_path):
    records = _run_script("lean_vs_default.py", tmp_path)
    assert [r["kind"] for r in records] == ["rga_sc", "apnet_s"]
    for r in records:
        assert r["time_x_rounds"] == 2 and r["default_mib"] > 0 and r["lean_mib"] > 0


def test_projection_gemm_quick_run(tmp_path):
    """The script checks that the conv and the linear compute the same projection, then times them."""
    records = _run_script("projection_gemm.py", tmp_path)
    assert [(r["site"], r["axis"]) for r in records] == [("32:16x8", "channel")]
    assert records[0]["linear_x_rounds"] == 2 and records[0]["conv_ms"] > 0 and records[0]["linear_ms"] > 0


def test_ort_profile_quick_run(tmp_path):
    """ONNX Runtime's profile of plain and RGA-SC networks: the attention's GEMMs are profiled as
    MatMul nodes (plain ResNet has none), and the per-operator times sum to each network's time.
    Times themselves are not compared (a smoke run of one batch-2 run)."""
    for module in ("onnxruntime", "onnxscript", "torchvision"):
        pytest.importorskip(module)
    result = _script_result("ort_profile.py", tmp_path, "--threads", "1")
    records = {r["op"]: r for r in result["records"]}
    gemms = [records[op] for op in ("MatMul", "FusedMatMul") if op in records]
    assert gemms and all(r["plain_ms"] == 0 < r["rga_sc_ms"] for r in gemms)
    summary = result["summary"]
    for key in ("plain_ms", "rga_sc_ms"):
        assert sum(r[key] for r in records.values()) == pytest.approx(summary[key], rel=1e-9)
    assert summary["attention_gemm_ms"] == pytest.approx(sum(r["extra_ms"] for r in gemms), rel=1e-9)
    assert summary["flop_x"] > 1


def test_torch_profile_op_classes(monkeypatch):
    """The profile's operator classes: names that contain others' fragments go to the right class."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    torch_profile = importlib.import_module("torch_profile")
    expected = {
        "aten::mkldnn_convolution": "convolution", "aten::convolution_backward": "convolution",
        "aten::bmm": "matmul", "aten::baddbmm": "matmul", "aten::addmm": "matmul",
        "aten::native_batch_norm_backward": "batch norm", "aten::copy_": "copies, layout & allocation",
        "aten::t": "copies, layout & allocation", "aten::transpose": "copies, layout & allocation",
        "aten::empty_strided": "copies, layout & allocation",
        "aten::threshold_backward": "elementwise & reductions",
        "aten::mul": "elementwise & reductions", "aten::max_pool2d_with_indices": "elementwise & reductions",
        "Optimizer.step#SGD.step": "autograd & Python", "DoubleGateBackward": "autograd & Python",
    }
    assert {name: torch_profile.op_class(name) for name in expected} == expected


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_profile_quick_run(tmp_path, mode):
    """PyTorch's profile of plain and RGA-SC networks by operator class: every class present,
    and the classes' times sum to each model's profiled wall time (the time no operator covers
    is counted as autograd & Python), so their extra times sum to the extra wall time. Times
    themselves are not compared (a smoke run of one step)."""
    pytest.importorskip("torchvision")
    result = _script_result("torch_profile.py", tmp_path, "--mode", mode, "--threads", "1")
    records = {r["op_class"]: r for r in result["records"]}
    assert list(records) == ["convolution", "matmul", "batch norm", "copies, layout & allocation",
                             "elementwise & reductions", "autograd & Python"]
    summary = result["summary"]
    for key in ("plain_ms", "rga_sc_ms"):
        assert sum(r[key] for r in records.values()) == pytest.approx(summary[key], rel=1e-6)
    assert records["matmul"]["rga_sc_ms"] > 0  # the attention's GEMMs were recorded
    assert summary["flop_x"] > 1 and summary["paired_time_x"] > 0 and summary["paired_rounds"] == 1
