"""Render the committed result files (benchmarks/results/*.json) as the markdown tables of
benchmarks/README.md.

    python benchmarks/readme_tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import pathlib

import inference_fold  # the scripts beside this one: their tables' columns
import launch_counts
import lean_vs_default
import ort_profile
import projection_gemm
import torch_profile

from reid_attention.bench.report import format_flagged

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HEADERS = {"step_ms": "step ms", "gflops": "GFLOP fwd", "peak_mib": "peak MiB", "fwd_ms": "fwd ms",
           "samples_per_s": "samples/s", "memory_batch": "mem batch", "time_x": "time x",
           "memory_x": "memory x", "params_x": "params x", "gflops_x": "FLOP x",
           "time_per_flop_x": "time/FLOP x", "eval_ms": "eval fwd ms", "step_iqr_ms": "IQR ms",
           "time_x_iqr": "IQR of time x",
           "time_x_over_floor": "time x / FLOP x", "time_x_spread": "spread", "time_x_rounds": "rounds",
           "kernels": "kernels/step",
           "moved_mib": "moved MiB", "parity": "vs torch", "runtime": "runtime"}
NETWORK = ["model", "batch", "step_ms", "gflops", "params", "memory_batch", "peak_mib", "time_x",
           "time_x_spread", "memory_x", "params_x", "gflops_x", "time_per_flop_x"]
STEPS = {"optimizer": "training step = forward, loss, backward, SGD momentum step, "
                      "zero_grad(set_to_none=True)",
         "accumulate": "step = forward().backward(grad), gradients accumulating"}


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def machine(env) -> str:
    malloc = f", malloc {env['malloc']}" if "malloc" in env else ""
    step = f"; {STEPS[env['step']]}" if env.get("step") in STEPS else ""
    return (f"{env['date']}, {env['device_name']}, {env['threads']} threads, "
            f"torch {env['torch']}{malloc}{step}")


def section(title: str, result, columns, note: str = "", headers=None) -> str:
    if result is None:
        return ""
    headers = {**HEADERS, **(headers or {})}
    table = format_flagged(result["records"], ["flag", *columns], "markdown", headers=headers)
    summary = result.get("summary")
    tail = f"\n\nSummary: `{json.dumps(summary)}`" if summary else ""
    return f"#### {title}\n\n{machine(result['environment'])}. {note}\n\n{table}{tail}\n"


def split(result, key):
    """The records of a result that have ``key`` (the default run holds layer and network rows)."""
    return None if result is None else dict(result, records=[r for r in result["records"] if key in r])


def split_training(result):
    """The default run's network training rows (not its inference rows)."""
    if result is None:
        return None
    return dict(result, records=[r for r in result["records"] if "model" in r and "runtime" not in r])


def cuda_sections():
    """The files of ``benchmarks/gpu_check.sh`` (absent until a GPU run was committed)."""
    layer_columns = ["kind", "site", "impl", "batch", "fwd_ms", "step_ms", "gflops", "peak_mib", "error"]
    pyramid_columns = ["kind", "level", "site", "impl", "batch", "step_ms", "gflops", "peak_mib", "error"]
    return [
        section("CUDA: layers at their papers' sites, float32", load("layers_cuda.json"), layer_columns,
                "Batch 64."),
        section("CUDA: layers at their papers' sites, bfloat16 autocast", load("layers_cuda_bfloat16.json"),
                layer_columns, "Batch 64."),
        section("CUDA: ResNet-50 + RGA-SC (fused) vs plain ResNet-50",
                load("network_resnet50_rga_sc_cuda.json"),
                ["model", "batch", "step_ms", "samples_per_s", "gflops", "memory_batch", "peak_mib", "time_x",
                 "memory_x", "gflops_x", "time_per_flop_x"], "Last stride 1, 256x128."),
        section("CUDA: the same with `memory=\"lean\"`", load("network_resnet50_rga_sc_cuda_lean.json"),
                ["model", "batch", "step_ms", "memory_batch", "peak_mib", "time_x", "memory_x", "gflops_x",
                 "time_per_flop_x"], "Last stride 1, 256x128."),
        section("CUDA: PFSA and APNet-S comparisons", load("pyramid_sites_cuda.json"), pyramid_columns, ""),
        section("CUDA: the same under torch.compile", load("pyramid_sites_cuda_compiled.json"),
                pyramid_columns, "Level 2; no memory probe."),
    ]


def main() -> None:
    default = load("default_cpu.json")
    parts = [
        section("Default run (`make bench`): layers", split(default, "kind"),
                ["kind", "site", "impl", "batch", "fwd_ms", "step_ms", "gflops", "params", "peak_mib",
                 "error"],
                "Each kind at one paper site (RGA and PFSA: layer1; APNet: layer3), batch 8; peak memory of "
                "one training step at batch 8; 0.5 s of timed runs per row."),
        section("Default run (`make bench`): layers, kernels and bytes", split(default, "kind"),
                ["kind", "site", "impl", "kernels", "moved_mib"],
                "One training step at batch 8: ATen ops that compute and their tensor bytes."),
        section("Default run (`make bench`): network", split_training(default),
                ["model", "batch", "step_ms", "gflops", "params", "time_x", "time_x_spread", "params_x",
                 "gflops_x", "time_per_flop_x"],
                "ResNet-50 (last stride 1, 256x128) with fused RGA-SC at layer1..4 vs plain, one training "
                "step; time x: the two steps timed alternately."),
        section("Default run (`make bench`): inference", split(default, "runtime"),
                ["model", "runtime", "batch", "fwd_ms", "time_x", "time_x_spread", "gflops_x",
                 "time_per_flop_x", "parity"],
                "Eval-mode forward, PyTorch and ONNX Runtime (parity: max |ORT - torch| / max |torch|)."),
        section("RGA at the paper's four sites", load("rga_sites_cpu.json"),
                ["kind", "site", "impl", "step_ms", "gflops", "params", "peak_mib"],
                "Training step at batch 8; FLOPs at batch 8; peak memory of the same step at batch 32."),
        section("ResNet-50 + RGA-SC (fused, `memory=\"auto\"`: the default) vs plain ResNet-50, last "
                "stride 1, 256x128", load("network_resnet50_rga_sc_cpu.json"), NETWORK,
                "Training step at batch 8, time x from the two steps timed alternately; memory of the "
                "same step at batch 32. time/FLOP x = time x / FLOP x: 1.0 would mean the extra time is "
                "exactly the extra forward FLOPs (the floor of the exact maths)."),
        section("The same with `memory=\"full\"`", load("network_resnet50_rga_sc_cpu_full.json"), NETWORK,
                "`bench network --memory full`."),
        section("The same with `memory=\"lean\"`", load("network_resnet50_rga_sc_cpu_lean.json"), NETWORK,
                "`bench network --memory lean`."),
        section("Inference: eval forward in PyTorch and ONNX Runtime", load("network_eval_cpu.json"),
                ["model", "runtime", "batch", "fwd_ms", "time_x", "time_x_spread", "time_x_rounds", "gflops",
                 "gflops_x", "time_per_flop_x", "parity"],
                "`bench network --mode eval`, RGA-SC at layer1..4: eval-mode forward under no_grad; each "
                "model exported with a dynamic batch for ONNX Runtime (parity: max |ORT - torch| / "
                "max |torch|)."),
        section("Where ONNX Runtime spends the eval forward", load("ort_profile_cpu.json"),
                ort_profile.COLUMNS, "`benchmarks/ort_profile.py`, batch 64, RGA-SC at layer1..4: ONNX "
                "Runtime's per-node profile, each node's fastest of 5 runs, summed per operator type.",
                headers=ort_profile.HEADERS),
        section("Where PyTorch spends the training step", load("torch_profile_train_cpu.json"),
                torch_profile.COLUMNS, "`benchmarks/torch_profile.py --compile`, batch 8, RGA-SC at "
                "layer1..4: PyTorch's profiler, operators' self times per class, mean of 3 profiled steps "
                "(autograd & Python includes the wall time no operator covers).",
                headers=torch_profile.HEADERS),
        section("Where PyTorch spends the eval forward", load("torch_profile_eval_cpu.json"),
                torch_profile.COLUMNS, "`benchmarks/torch_profile.py --mode eval`, batch 64, under "
                "no_grad.", headers=torch_profile.HEADERS),
        section("The three networks alternated every round", load("network_alternating_cpu.json"),
                ["model", "step_ms", "step_iqr_ms", "time_x", "time_x_iqr", "gflops_x", "time_x_over_floor"],
                "`benchmarks/network_alternating.py`: time x is the median of the per-round ratios."),
        section("Layer-1 RGA-SC vs the official computation", load("layer1_rga_sc_vs_official_cpu.json"),
                ["kind", "site", "impl", "memory", "batch", "step_ms", "peak_mib"],
                "Training step at batch 8; peak memory of the same step at batch 32."),
        section("The projection GEMM: `linear` vs 1x1 conv", load("projection_gemm_cpu.json"),
                projection_gemm.COLUMNS, "`benchmarks/projection_gemm.py`: forward + backward of one "
                "token-major projection at batch 8, the two timed alternately.",
                headers=projection_gemm.HEADERS),
        section("`memory=\"lean\"` against `\"full\"`, per site and batch",
                load("lean_vs_default_cpu.json"), lean_vs_default.COLUMNS[1:],
                "`benchmarks/lean_vs_default.py`: lean time x = lean step / full "
                "step, timed alternately; memory = peak RSS of two steps in a fresh subprocess.",
                headers=lean_vs_default.HEADERS),
        section("Kernels and bytes per training step (what a GPU would run)", load("launch_counts.json"),
                launch_counts.COLUMNS, "`benchmarks/launch_counts.py`, batch 8; floors on an H100-class GPU: "
                "kernels x 5 us, bytes / 3.35 TB/s.", headers=launch_counts.HEADERS),
        section("PFSA and attention pyramids at their papers' sites", load("pyramid_sites_cpu.json"),
                ["kind", "level", "site", "impl", "batch", "step_ms", "gflops", "peak_mib"],
                "PFSA at batch 64, APNet at batch 8; peak memory at the timed batch."),
        section("The same comparisons with freed memory retained (`--malloc retain`)",
                load("pyramid_sites_cpu_retain.json"),
                ["kind", "level", "site", "impl", "batch", "step_ms", "gflops", "peak_mib"],
                "PFSA (all rows) and APNet-S (fused vs loop) timed with glibc told to reuse freed memory "
                "instead of mapping each large block afresh."),
        section("RGA-S at the layer1 site as the input grows", load("sweep_rga_s_cpu.json"),
                ["input", "site", "impl", "batch", "step_ms", "peak_mib", "error"],
                "Batch 16; 'out of memory' = the run did not fit the available memory (capped subprocess)."),
        section("Inference folding (eval forward, RGA-SC, `fold_batchnorm_scales`, deprecated)",
                load("inference_fold_cpu.json"), inference_fold.COLUMNS,
                "`benchmarks/inference_fold.py`, batch 8: the two timed alternately.",
                headers=inference_fold.HEADERS),
        *cuda_sections(),
    ]
    print("\n".join(p for p in parts if p))


if __name__ == "__main__":
    main()
