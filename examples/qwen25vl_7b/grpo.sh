#!/usr/bin/env bash
# Multi-task RLVR with GRPO (M2-Reasoning stage 2) from the SFT checkpoint, on NNODES x GPUS_PER_NODE GPUs.
#   NNODES=4 NODE_RANK=$RANK MASTER_ADDR=node0 examples/qwen25vl_7b/grpo.sh --tp 4 --pp 1
# Options and environment: see _launch.sh. Runs `python -m m2mega.train.grpo` (the GRPO entry point).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_launch.sh"
m2mega_launch m2mega.train.grpo "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/grpo.yaml" "$@"
