"""Next-token selection: greedy, or temperature / top-k / top-p sampling, as HF ``generate`` does it.

Works on full-vocabulary logits ``[B, V]`` (the generator gathers TP slices first, so every TP rank sees
bit-identical logits and, with the same seeded generator, draws the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "select_next_tokens", "filter_logits"]


@dataclass(frozen=True)
class SamplingParams:
    """``greedy`` (or ``temperature == 0``) takes the argmax; otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0 = all) and the
    smallest set whose probability reaches ``top_p`` (1.0 = all)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf (HF's TopK then TopP warpers' order and
    tie rules: top-p drops tokens whose cumulative ascending probability is <= 1 - top_p, always keeping
    the most likely one)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next_tokens(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick one token per row of ``logits [B, V]``. Returns ``(tokens [B] int64, logprobs [B] fp32)``.

    ``logprobs`` is the log-probability of the chosen token under ``softmax(logits / temperature)``
    *before* top-k/top-p filtering (plain ``log_softmax(logits)`` when greedy): the policy distribution
    GRPO's old-policy ratio needs, independent of the exploration filter.
    """
    logits = logits.float()
    if params.is_greedy:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        scaled = logits / params.temperature
        logp = torch.log_softmax(scaled, -1)
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
