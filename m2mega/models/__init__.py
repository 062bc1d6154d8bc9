"""Model definitions on megatron-core. ``m2mega.models.qwen25vl``: Qwen2.5-VL (the M2-Reasoning base)."""
