"""GRPO rollouts: G samples per prompt with the rollout engine (scored by :mod:`m2mega.rl.scoring`).

:func:`generate_rollouts` runs :class:`m2mega.inference.RolloutEngine`: each prompt (and its images) is
prefilled once and its G samples continue from copies of that KV cache, with continuous batching. Sample j
of prompt k draws from its own random stream keyed by ``(seed, k, j)`` (docs/generate.md). Every rank of a
model replica (TP x PP) calls it with the same prompts and gets the same rollouts (the engine broadcasts its
choices over TP/PP), so scoring and advantages need no further communication inside a replica.
Data-parallel replicas hold different prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from m2mega.data.loader import RLPrompt
from m2mega.inference import Request, RolloutEngine, SamplingParams
from m2mega.models.wrappers import unwrap_vlm

__all__ = ["Rollouts", "generate_rollouts", "select_groups"]


@dataclass
class Rollouts:
    """N = n_prompts x G rollouts, grouped contiguously by prompt (rollout i belongs to group i // G)."""

    prompts: list[RLPrompt]
    group_size: int
    response_tokens: list[Tensor]  # int64 [len_i], EOS included when hit
    finished: Tensor  # bool [N]: stopped at EOS (False: ran into max_new_tokens)
    # The sampler's log-probs of the response tokens under softmax(logits / temperature): the train/rollout
    # mismatch diagnostic, and pi_old under grpo.old_logprobs: rollout.
    rollout_logprobs: list[Tensor] | None = None
    texts: list[str] = field(default_factory=list)
    rewards: Tensor | None = None  # [N] total reward
    accuracy: Tensor | None = None  # [N] accuracy part in [0, 1] (EDNM value for spatial numbers)
    correct: Tensor | None = None  # [N] bool, for accuracy statistics
    format_ok: Tensor | None = None  # [N] format reward
    repetition: Tensor | None = None  # [N] n-gram repetition rate
    stats: dict = field(default_factory=dict)  # the engine's EngineStats of the call (seconds, tokens, ...)

    @property
    def n(self) -> int:
        return len(self.response_tokens)

    def prompt_of(self, i: int) -> RLPrompt:
        return self.prompts[i // self.group_size]

    def tasks(self) -> list[str]:
        return [self.prompt_of(i).info.task for i in range(self.n)]


@torch.no_grad()
def generate_rollouts(
    model,
    prompts: Sequence[RLPrompt],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    seed: int,
    greedy: bool = False,
    max_batch: int = 256,
    max_kv_tokens: int | None = None,
) -> Rollouts:
    """Sample ``group_size`` continuations of every prompt. Vision placeholder tokens (image/video pad,
    vision start/end) are never sampled: a response carrying them could not be re-run. ``max_batch`` /
    ``max_kv_tokens``: the engine's decode slots and KV-slab bound (:class:`RolloutEngine`).
    ``pad_token_id`` is not needed by the engine (no padding); it is checked to be a vocabulary id."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    vocab = unwrap_vlm(model).vocab_size
    if not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab})")
    some = lambda t: t if t is not None and t.numel() else None  # noqa: E731 - the loader's "none" is empty
    reqs = [Request(p.prompt_tokens, p.pixel_values, some(p.image_grid_thw), num_samples=group_size, key=k,
                    pixel_values_videos=p.pixel_values_videos, video_grid_thw=some(p.video_grid_thw),
                    second_per_grid_ts=some(p.second_per_grid_ts))
            for k, p in enumerate(prompts)]
    engine = RolloutEngine(model, max_batch=max_batch, max_kv_tokens=max_kv_tokens)
    out = engine.generate(reqs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, seed=seed,
                          sampling=SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p),
                          suppress_token_ids=_vision_token_ids(model))
    samples = [s for group in out for s in group]
    st = engine.stats
    return Rollouts(
        prompts=list(prompts),
        group_size=group_size,
        response_tokens=[s.tokens for s in samples],
        finished=torch.tensor([s.finished for s in samples], dtype=torch.bool),
        rollout_logprobs=[s.logprobs for s in samples],
        stats={"seconds": st.total_s, "prefill_s": st.prefill_s, "decode_s": st.decode_s,
               "tokens": float(st.generated_tokens), "slot_occupancy": st.slot_occupancy},
    )


def _vision_token_ids(model) -> list[int]:
    c = unwrap_vlm(model).cfg
    return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]


def select_groups(groups: list[tuple[Rollouts, int]], G: int) -> Rollouts:
    """One Rollouts of the chosen ``(rollouts, group index)`` pairs, in order."""
    idx = [(r, k * G + j) for r, k in groups for j in range(G)]
    pick = lambda attr: torch.stack([getattr(r, attr)[i] for r, i in idx]) if idx else None  # noqa: E731
    return Rollouts(
        prompts=[r.prompts[k] for r, k in groups],
        group_size=G,
        response_tokens=[r.response_tokens[i] for r, i in idx],
        finished=pick("finished"),
        texts=[r.texts[i] for r, i in idx],
        rewards=pick("rewards"),
        accuracy=pick("accuracy"),
        correct=pick("correct"),
        format_ok=pick("format_ok"),
        repetition=pick("repetition"),
        rollout_logprobs=None if any(r.rollout_logprobs is None for r, _ in idx)
        else [r.rollout_logprobs[i] for r, i in idx],
    )
