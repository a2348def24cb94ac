#!/usr/bin/env bash
# Regenerate every committed CPU result file (2 threads). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=benchmarks/results
mkdir -p $R
$PY benchmarks/rga_sites.py --threads 2
$PY benchmarks/pyramid_sites.py --threads 2
# the allocator-neutral comparison: fused vs loop (APNet-S) and PFSA vs its bound with freed memory reused
$PY benchmarks/pyramid_sites.py --threads 2 --only apnet_s --impl fused loop --malloc retain
$PY benchmarks/pyramid_sites.py --threads 2 --only pfsa --malloc retain --merge
$PY -m reid_attention bench --threads 2 --format json --out $R/default_cpu.json --quiet
$PY -m reid_attention bench network --threads 2 --batch 8 --memory-batch 32 --sites layer1,layer2,layer3,layer4 \
    --format json --out $R/network_resnet50_rga_sc_cpu.json --quiet
$PY -m reid_attention bench sweep --threads 2 --kind rga_s --batch 16 --format json --out $R/sweep_rga_s_cpu.json \
    --plot $R/sweep_rga_s_cpu.png --quiet
$PY benchmarks/inference_fold.py --threads 2
