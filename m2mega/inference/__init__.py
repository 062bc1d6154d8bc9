"""Inference for m2mega models: batched KV-cache generation (GRPO rollouts, evaluation). See docs/generate.md."""

from .generate import GenerationOutput, generate, unwrap_model
from .sampling import SamplingParams, filter_logits, select_next_tokens

__all__ = ["GenerationOutput", "generate", "unwrap_model", "SamplingParams", "filter_logits", "select_next_tokens"]
