#!/usr/bin/env bash
# Shared multi-node torchrun launcher for sft.sh / grpo.sh (not meant to be run directly).
#
#   [NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8] \
#       examples/qwen25vl_7b/sft.sh [--tp 4] [--pp 1] [--config FILE] [--section.key=value ...]
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE or GPUS_PER_NODE (processes per node; default:
# GPUs nvidia-smi lists, else 1), MASTER_ADDR (127.0.0.1) / MASTER_PORT (29500) for a static rendezvous,
# or RDZV_ENDPOINT=host:port (+ RDZV_ID) for torchrun's c10d rendezvous (elastic, no fixed node ranks),
# RDZV_TIMEOUT (600): seconds every node has to join before the run ends with an error, CONFIG (the
# example's YAML; --config wins), PYTHON (.venv/bin/python if present, else python3), DRY_RUN=1 prints
# the command instead of running it.
set -euo pipefail

m2mega_launch() {
  local module=$1 default_config=$2
  shift 2
  local here root tp=4 pp=1 config=${CONFIG:-$default_config}
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
      -h|--help) sed -n '2,14p' "$here/_launch.sh"; return 0 ;;
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
  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} gpus=${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}
  local rdzv_timeout=${RDZV_TIMEOUT:-600}
  if [[ -z "$gpus" ]]; then
    gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$gpus" -ge 1 ]] || gpus=1
  fi
  local n
  for n in nnodes:"$nnodes" node_rank:"$node_rank" nproc_per_node:"$gpus" rdzv_timeout:"$rdzv_timeout"; do
    [[ "${n#*:}" =~ ^[0-9]+$ ]] || { echo "error: ${n%%:*} must be a non-negative integer, got '${n#*:}'" >&2; return 2; }
  done
  (( node_rank < nnodes )) || { echo "error: NODE_RANK=$node_rank must be < NNODES=$nnodes" >&2; return 2; }
  local rdzv=()
  if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-m2mega}"
          --rdzv-conf "join_timeout=$rdzv_timeout")
  else
    # static rendezvous: node 0 hosts the store; every node waits at most RDZV_TIMEOUT for the others.
    rdzv=(--node-rank "$node_rank" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}"
          --rdzv-conf "timeout=$rdzv_timeout")
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
  # Not exec: when a node never joins, torchrun's traceback ends in "waiting for clients" / "failed to
  # connect"; the line below says what that means for this launch.
  local log rc=0
  log=$(mktemp "${TMPDIR:-/tmp}/m2mega-launch.XXXXXX")
  "${cmd[@]}" 2> >(tee "$log" >&2) || rc=$?
  wait  # the tee above
  if [[ $rc -ne 0 ]] && grep -q -E "waiting for clients|clients joined|failed to connect|Connection refused|RendezvousTimeoutError" "$log"; then
    echo "error: node $node_rank: the $nnodes nodes did not all join the rendezvous at" \
         "${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}} within RDZV_TIMEOUT=${rdzv_timeout}s" \
         "(start every node with the same NNODES, MASTER_ADDR and MASTER_PORT, NODE_RANK 0..$((nnodes - 1)))" >&2
  fi
  rm -f "$log"
  return $rc
}
