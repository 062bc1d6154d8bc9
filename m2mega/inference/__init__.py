"""Inference for m2mega models: batched KV-cache generation and the rollout engine (GRPO rollouts,
evaluation). See docs/generate.md."""

from .engine import EngineStats, Request, RolloutEngine, Sample
from .generate import GenerationOutput, generate
from .sampling import SamplingParams, filter_logits, select_next_tokens

__all__ = ["GenerationOutput", "generate", "RolloutEngine", "Request", "Sample", "EngineStats", "SamplingParams",
           "filter_logits", "select_next_tokens"]
