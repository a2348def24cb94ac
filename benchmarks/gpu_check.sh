#!/usr/bin/env bash
# The GPU check: everything this project can only learn on a CUDA GPU, in one run of under
# 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh             run every step
#   benchmarks/gpu_check.sh --dry-run   list the steps and their time limits, run nothing
#
# Steps (in this order, so that the most wanted results come first):
#   cuda_tests             the CUDA-only tests (pytest -k cuda: autocast on the GPU, bench on CUDA)
#   layers_float32         bench layers, every kind at its papers' sites, batch 64, float32
#   layers_bfloat16        the same under bfloat16 autocast
#   network                bench network, ResNet-50 + RGA-SC at layer1..4 vs plain, batch 64
#   network_lean           the same with memory="lean"
#   pyramid_eager          benchmarks/pyramid_sites.py: the PFSA and APNet-S comparisons
#   pfsa_compiled          PFSA fused vs the per-sample loop, under torch.compile
#   apnet_s_compiled       APNet-S fused vs the per-stripe loop, level 2, under torch.compile
# Results: benchmarks/results/{layers_cuda,layers_cuda_bfloat16,network_resnet50_rga_sc_cuda[_lean],
# pyramid_sites_cuda,pyramid_sites_cuda_compiled}.json, and benchmarks/results/gpu_check_cuda.txt
# (the GPU as nvidia-smi and torch.cuda.get_device_name name it, versions, each step's status).
#
# Python: $PY if set; else .venv/bin/python if it imports torch; else a .venv made over the
# machine's own python3 when that already has torch and torchvision (a CUDA image that cannot
# download: --system-site-packages, the package installed without dependencies); else
# `make install-test` (downloads the pinned torch, a CUDA build on PyPI).
#
# Each step has its own time limit, and all steps share a budget (GPU_CHECK_BUDGET seconds,
# default 420): a step gets at most what is left, and none starts with under 15 s left. A
# failed step does not stop the others; the script exits 1 at the end if any step failed,
# timed out or was skipped. Per-step logs go to LOG_DIR (default /tmp/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."

R=benchmarks/results
SUMMARY=$R/gpu_check_cuda.txt
LOG_DIR=${LOG_DIR:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-420}
SITES=layer1,layer2,layer3,layer4

# name | time limit (s) | command (run by bash, with PY and R set)
STEPS=(
    "cuda_tests|100|\$PY -m pytest tests -q -k cuda -p no:cacheprovider"
    "layers_float32|80|\$PY -m reid_attention bench layers --device cuda --batch 64 --repeat 0.2 --quiet --format json --out \$R/layers_cuda.json"
    "layers_bfloat16|80|\$PY -m reid_attention bench layers --device cuda --batch 64 --dtype bfloat16 --repeat 0.2 --quiet --format json --out \$R/layers_cuda_bfloat16.json"
    "network|45|\$PY -m reid_attention bench network --device cuda --batch 64 --memory-batch 64 --sites $SITES --repeat 1 --quiet --format json --out \$R/network_resnet50_rga_sc_cuda.json"
    "network_lean|45|\$PY -m reid_attention bench network --device cuda --batch 64 --memory-batch 64 --sites $SITES --repeat 1 --memory lean --quiet --format json --out \$R/network_resnet50_rga_sc_cuda_lean.json"
    "pyramid_eager|60|\$PY benchmarks/pyramid_sites.py --device cuda --only pfsa apnet_s --min-run-time 0.2"
    "pfsa_compiled|75|\$PY benchmarks/pyramid_sites.py --device cuda --only pfsa --impl loop fused --compile --memory-batch 0 --min-run-time 0.2"
    "apnet_s_compiled|100|\$PY benchmarks/pyramid_sites.py --device cuda --only apnet_s --impl loop fused --levels 2 --compile --memory-batch 0 --min-run-time 0.2 --merge"
)

list_steps() {
    local entry name limit command
    echo "gpu_check: ${#STEPS[@]} steps, budget ${BUDGET} s (each step at most its own limit)"
    for entry in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$entry"
        printf '  %-18s %4s s  %s\n' "$name" "$limit" "$command"
    done
}

ensure_python() {  # sets PY to a python that imports torch and this package
    if [[ -n ${PY:-} ]]; then
        return
    fi
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, torchvision, reid_attention" 2>/dev/null; then
        PY=.venv/bin/python
        return
    fi
    if python3 -c "import torch, torchvision, pytest, hypothesis" 2>/dev/null; then
        echo "gpu_check: reusing python3's torch in .venv (--system-site-packages)" >&2
        python3 -m venv --system-site-packages .venv
        if ! .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; then
            echo "gpu_check: editable install failed; importing the package from src/" >&2
            export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
        fi
    else
        echo "gpu_check: installing with the Makefile (make install-test)" >&2
        make install-test
    fi
    PY=.venv/bin/python
}

record_device() {  # the GPU and versions, at the top of the summary file
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        "$PY" -c "import sys, torch, reid_attention as ra
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| reid-attention', ra.__version__)
print('torch.cuda.get_device_name:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
            nvidia-smi || true
        else
            echo "nvidia-smi: not found"
        fi
        echo
    } >"$SUMMARY" 2>&1
    cat "$SUMMARY"
}

run_steps() {  # runs every step; sets FAILED to the number that did not pass
    local start entry name limit command left rc status began took
    start=$SECONDS
    FAILED=0
    mkdir -p "$LOG_DIR" "$R"
    printf '%-18s %-22s %6s\n' step status seconds >>"$SUMMARY"
    for entry in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$entry"
        left=$((BUDGET - (SECONDS - start)))
        if ((left < 15)); then
            status="skipped (no time left)"
            took=0
        else
            ((limit > left)) && limit=$left
            echo "== $name (limit ${limit} s): $command" >&2
            began=$SECONDS
            rc=0
            PY=$PY R=$R timeout --kill-after=10 "$limit" bash -c "$command" >"$LOG_DIR/$name.log" 2>&1 || rc=$?
            took=$((SECONDS - began))
            case $rc in
                0) status=ok ;;
                124 | 137) status="timed out" ;;
                *) status="failed (exit $rc)" ;;
            esac
            if ((rc != 0)); then
                tail -n 20 "$LOG_DIR/$name.log" >&2
            fi
        fi
        [[ $status == ok ]] || FAILED=$((FAILED + 1))
        printf '%-18s %-22s %6s\n' "$name" "$status" "$took" | tee -a "$SUMMARY" >&2
    done
}

main() {
    if [[ ${1:-} == --dry-run ]]; then
        list_steps
        return 0
    fi
    if [[ $# -gt 0 ]]; then
        echo "usage: benchmarks/gpu_check.sh [--dry-run]" >&2
        return 2
    fi
    ensure_python
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA GPU here ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
        return 1
    fi
    record_device
    run_steps
    echo >>"$SUMMARY"
    ls "$R"/*_cuda*.json >>"$SUMMARY" 2>/dev/null || true
    echo "gpu_check: $FAILED of ${#STEPS[@]} steps did not pass; summary in $SUMMARY, logs in $LOG_DIR" >&2
    ((FAILED == 0))
}

main "$@"
