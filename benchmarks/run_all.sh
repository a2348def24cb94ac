#!/usr/bin/env bash
# Regenerate every committed CPU result file (2 threads). Run on an otherwise idle machine.
# Every step runs even if one fails; the script exits non-zero at the end if any did (a row
# that failed other than by running out of memory fails its step).
# SKIP="name ..." leaves those steps out (e.g. steps whose code did not change since their files were written).
# Then: python benchmarks/readme_tables.py > /tmp/tables.md
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
mkdir -p $R
failed=()

step() {  # step NAME COMMAND...: run it, remember a failure, go on
    local name=$1
    shift
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "== $name: skipped" >&2
        return
    fi
    echo "== $name: $*" >&2
    "$@" || failed+=("$name")
}

step rga_sites $PY benchmarks/rga_sites.py --threads 2
step pyramid_sites $PY benchmarks/pyramid_sites.py --threads 2
# the allocator-neutral comparison: fused vs loop (APNet-S) and PFSA vs its bound with freed memory reused
step pyramid_sites_retain_apnet_s $PY benchmarks/pyramid_sites.py --threads 2 --only apnet_s --impl fused loop \
    --malloc retain
step pyramid_sites_retain_pfsa $PY benchmarks/pyramid_sites.py --threads 2 --only pfsa --malloc retain --merge
step default $PY -m reid_attention bench --threads 2 --format json --out $R/default_cpu.json --quiet
# ResNet-50 + RGA-SC (the preset's four sites) vs ResNet-50: training at the default memory="auto", then
# each explicit mode; inference in PyTorch and ONNX Runtime
NET=(-m reid_attention bench network --threads 2 --sites layer1,layer2,layer3,layer4)
step network $PY "${NET[@]}" --batch 8 --memory-batch 32 --repeat 10 --format json \
    --out $R/network_resnet50_rga_sc_cpu.json --quiet
step network_full $PY "${NET[@]}" --batch 8 --memory-batch 32 --repeat 10 --memory full --format json \
    --out $R/network_resnet50_rga_sc_cpu_full.json --quiet
step network_lean $PY "${NET[@]}" --batch 8 --memory-batch 32 --repeat 10 --memory lean --format json \
    --out $R/network_resnet50_rga_sc_cpu_lean.json --quiet
step network_eval $PY "${NET[@]}" --mode eval --format json --out $R/network_eval_cpu.json --quiet
step ort_profile $PY benchmarks/ort_profile.py --threads 2
step torch_profile_train $PY benchmarks/torch_profile.py --threads 2 --compile
step torch_profile_eval $PY benchmarks/torch_profile.py --threads 2 --mode eval
step network_alternating $PY benchmarks/network_alternating.py --threads 2 --rounds 15
step layer1_vs_official $PY -m reid_attention bench layers --threads 2 --kind rga_sc --sites first --batch 8 \
    --memory-batch 32 --memory auto,full,lean --format json --out $R/layer1_rga_sc_vs_official_cpu.json --quiet
step projection_gemm $PY benchmarks/projection_gemm.py --threads 2
step lean_vs_default $PY benchmarks/lean_vs_default.py --threads 2
step launch_counts $PY benchmarks/launch_counts.py
step sweep $PY -m reid_attention bench sweep --threads 2 --kind rga_s --batch 16 --format json \
    --out $R/sweep_rga_s_cpu.json --plot $R/sweep_rga_s_cpu.png --quiet
step inference_fold $PY benchmarks/inference_fold.py --threads 2
step resize_transfer $PY benchmarks/resize_transfer.py
step eval_collapse $PY benchmarks/eval_collapse.py

if ((${#failed[@]})); then
    echo "run_all: failed steps: ${failed[*]}" >&2
    exit 1
fi
echo "run_all: every step passed" >&2
