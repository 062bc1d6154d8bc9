#!/usr/bin/env bash
# Cold-start SFT of Qwen2.5-VL-7B (M2-Reasoning stage 1) on NNODES x GPUS_PER_NODE GPUs.
#   NNODES=4 NODE_RANK=$RANK MASTER_ADDR=node0 examples/qwen25vl_7b/sft.sh --tp 4 --pp 1
# Options and environment: see _launch.sh; any config key can be appended as --section.key=value.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_launch.sh"
m2mega_launch m2mega.train.sft "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/sft.yaml" "$@"
