"""Training: config, optimizer/schedule, checkpoints, the megatron-core loop, SFT (and GRPO)."""
