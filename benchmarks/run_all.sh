#!/usr/bin/env bash
# Regenerate every committed CPU result file (2 threads). Run on an otherwise idle machine.
# Every step runs even if one fails; the script exits non-zero at the end if any did (a row
# that failed other than by running out of memory fails its step).
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
step network $PY -m reid_attention bench network --threads 2 --batch 8 --memory-batch 32 \
    --sites layer1,layer2,layer3,layer4 --repeat 10 --format json --out $R/network_resnet50_rga_sc_cpu.json --quiet
step network_lean $PY -m reid_attention bench network --threads 2 --batch 8 --memory-batch 32 \
    --sites layer1,layer2,layer3,layer4 --repeat 10 --memory lean --format json \
    --out $R/network_resnet50_rga_sc_cpu_lean.json --quiet
step network_accumulate $PY -m reid_attention bench network --threads 2 --batch 8 --memory-batch 0 \
    --sites layer1,layer2,layer3,layer4 --repeat 10 --step accumulate --format json \
    --out $R/network_resnet50_rga_sc_cpu_accumulate.json --quiet
step network_alternating $PY benchmarks/network_alternating.py --threads 2 --rounds 15
step layer1_vs_official $PY -m reid_attention bench layers --threads 2 --kind rga_sc --sites first --batch 8 \
    --memory-batch 32 --memory full,lean --format json --out $R/layer1_rga_sc_vs_official_cpu.json --quiet
step sweep $PY -m reid_attention bench sweep --threads 2 --kind rga_s --batch 16 --format json \
    --out $R/sweep_rga_s_cpu.json --plot $R/sweep_rga_s_cpu.png --quiet
step projection_gemm $PY benchmarks/projection_gemm.py --threads 2
step inference_fold $PY benchmarks/inference_fold.py --threads 2

if ((${#failed[@]})); then
    echo "run_all: failed steps: ${failed[*]}" >&2
    exit 1
fi
echo "run_all: every step passed" >&2
