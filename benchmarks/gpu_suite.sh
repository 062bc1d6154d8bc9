#!/usr/bin/env bash
# The GPU check in one command, under 8 minutes on one H100/H200 (see docs/kernels.md, "GPU suite"):
#   1. install what the device lacks from .whl/ (filled by benchmarks/fetch_wheels.sh; no network needed),
#   2. build m2mega and its CUDA extension with nvcc against the device's CUDA torch,
#   3. run benchmarks/gpu_suite.py: pytest -m gpu, kernel benchmarks, vision pack, model, GRPO step, each
#      with its own time cap, writing benchmarks/results/<device>.json.
# Usage: benchmarks/gpu_suite.sh [--dry-run] [gpu_suite.py options]
#   --dry-run: skip installing/building and run the same driver on CPU at tiny sizes (CI does this).
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
log=$(mktemp -t gpu_suite_setup.XXXXXX)
start=$(date +%s)
if [ "$dry" = 0 ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    # Only what is missing gets installed: pip keeps satisfied requirements (the device's torch, triton).
    timeout 120 "$PY" -m pip install --no-index --find-links .whl \
      megatron-core==0.16.1 liger-kernel pytest pytest-benchmark pytest-timeout transformers >> "$log" 2>&1 \
      || echo "gpu_suite: installing from .whl/ failed (see the JSON's setup_log_tail)" | tee -a "$log"
  else
    echo "gpu_suite: no .whl/ folder (run benchmarks/fetch_wheels.sh where the registry is reachable)" | tee -a "$log"
  fi
  # The extension: setup.py builds csrc/*.cu for sm_90a when torch has CUDA and nvcc is found.
  MAX_JOBS=${MAX_JOBS:-16} timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1 \
    || echo "gpu_suite: building m2mega with nvcc failed (see the JSON's setup_log_tail)" | tee -a "$log"
  echo "gpu_suite: setup took $(( $(date +%s) - start )) s" | tee -a "$log"
fi
# The parts share what is left of 8 minutes (a later --budget in "$@" overrides).
budget=$(( 470 - ($(date +%s) - start) ))
[ "$dry" = 1 ] && budget=240
"$PY" benchmarks/gpu_suite.py --setup-log "$log" --budget "$budget" "$@"
