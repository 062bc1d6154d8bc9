#!/usr/bin/env bash
# Shared multi-node torchrun launcher for sft.sh / grpo.sh (not meant to be run directly).
#
#   [NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8] \
#       examples/qwen25vl_7b/sft.sh [--tp 4] [--pp 1] [--config FILE] [--section.key=value ...]
#
# Environment: NNODES (1), NODE_RANK (0), GPUS_PER_NODE (GPUs nvidia-smi lists, else 1),
# MASTER_ADDR (127.0.0.1) / MASTER_PORT (29500) for a static rendezvous, or RDZV_ENDPOINT=host:port
# (+ RDZV_ID) for torchrun's c10d rendezvous (elastic, no fixed node ranks), PYTHON (.venv/bin/python if
# present, else python3), DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

m2mega_launch() {
  local module=$1 default_config=$2
  shift 2
  local here root tp=4 pp=1 config=$default_config
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  root=$(cd "$here/../.." && pwd)
  local extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --tp) tp=$2; shift 2 ;;
      --tp=*) tp=${1#*=}; shift ;;
      --pp) pp=$2; shift 2 ;;
      --pp=*) pp=${1#*=}; shift ;;
      --config) config=$2; shift 2 ;;
      --config=*) config=${1#*=}; shift ;;
      -h|--help) sed -n '2,12p' "$here/_launch.sh"; return 0 ;;
      *) extra+=("$1"); shift ;;
    esac
  done
  [[ "$tp" =~ ^[1-9][0-9]*$ ]] || { echo "error: --tp must be a positive integer, got '$tp'" >&2; return 2; }
  [[ "$pp" =~ ^[1-9][0-9]*$ ]] || { echo "error: --pp must be a positive integer, got '$pp'" >&2; return 2; }
  [[ -f "$config" ]] || { echo "error: config file '$config' not found" >&2; return 2; }

  local python=${PYTHON:-}
  if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
  fi
  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} gpus=${GPUS_PER_NODE:-}
  if [[ -z "$gpus" ]]; then
    gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$gpus" -ge 1 ]] || gpus=1
  fi
  local rdzv=()
  if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-m2mega}")
  else
    rdzv=(--node-rank "$node_rank" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
  fi
  # megatron: one CUDA connection keeps TP/SP communication ordered behind compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  local cmd=("$python" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$gpus" "${rdzv[@]}"
             -m "$module" --config "$config" "--parallel.tp=$tp" "--parallel.pp=$pp" "${extra[@]}")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  if ! "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    echo "error: python module $module is not available (see docs/training.md)" >&2
    return 2
  fi
  cd "$root"
  exec "${cmd[@]}"
}
