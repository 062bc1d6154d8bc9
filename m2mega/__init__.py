"""m2mega: M2-Reasoning (Qwen2.5-VL + cold-start SFT + multi-task GRPO) on megatron-core."""

__version__ = "0.1.0"
