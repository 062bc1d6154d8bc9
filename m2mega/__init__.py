"""m2mega: M2-Reasoning (Qwen2.5-VL + cold-start SFT + multi-task GRPO) on megatron-core."""

from .runtime.optional_libs import quiet_fallback_warnings as _quiet_fallback_warnings

__version__ = "0.1.0"

# megatron-core warns "Transformer Engine and Apex are not installed ..." at import time, in every rank;
# the root package is the one hook that runs before any megatron import. The runtime prints one line per
# missing library on rank 0 instead (m2mega.runtime.optional_libs).
_quiet_fallback_warnings()
