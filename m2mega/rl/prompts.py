"""The prompts a policy is rolled out on: every RL row of a preprocessed prefix, and where a response stops."""

from __future__ import annotations

from m2mega.data.loader import PromptDataset, RLPrompt

__all__ = ["prefix_prompts", "stop_token_ids"]


def prefix_prompts(prefix: str) -> list[RLPrompt]:
    """Every RL prompt of a preprocessed prefix, in stored order."""
    ds = PromptDataset(prefix, 1, order="sequential")
    return [ds.prompt(int(i)) for i in ds.plan.indices]


def stop_token_ids(tok) -> list[int]:
    """Generation stops at the end of the assistant turn (``<|im_end|>``) or ``<|endoftext|>``."""
    return [tok.eos_id, tok.endoftext_id]
