"""Fused Triton kernels for GRPO training: linear log-prob over a vocab-parallel output layer and the GRPO
loss. Each has a plain-torch counterpart (``*_torch``) in the same module; ``KernelConfig.use_torch`` (or
``M2MEGA_KERNELS_TORCH=1``) switches every call to them for debugging."""

from .config import KernelConfig, get_kernel_config, kernel_config, set_kernel_config
from .fused_grpo_loss import GRPOLossFunction, dynamic_advantage_weights, fused_grpo_loss, grpo_loss_torch
from .fused_linear_logprob import LinearLogprobFunction, fused_linear_logprob, linear_logprob_torch

__all__ = [
    "KernelConfig",
    "get_kernel_config",
    "set_kernel_config",
    "kernel_config",
    "fused_linear_logprob",
    "linear_logprob_torch",
    "LinearLogprobFunction",
    "fused_grpo_loss",
    "grpo_loss_torch",
    "GRPOLossFunction",
    "dynamic_advantage_weights",
]
