"""GRPO rollouts: G samples per prompt with the KV-cache generator, scored by the verifiable rewards.

Every rank of a model replica (TP x PP) calls :func:`generate_rollouts` with the same prompts and gets the
same rollouts (the generator broadcasts its choices over TP/PP), so scoring and advantages need no further
communication inside a replica. Data-parallel replicas hold different prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from m2mega.data.loader import RLPrompt
from m2mega.inference.generate import generate
from m2mega.rewards import RewardConfig, compute_reward

__all__ = ["Rollouts", "generate_rollouts", "score_rollouts"]


@dataclass
class Rollouts:
    """N = n_prompts x G rollouts, grouped contiguously by prompt (rollout i belongs to group i // G)."""

    prompts: list[RLPrompt]
    group_size: int
    response_tokens: list[Tensor]  # int64 [len_i], EOS included when hit
    finished: Tensor  # bool [N]: stopped at EOS (False: ran into max_new_tokens)
    rollout_logprobs: list[Tensor] | None = None  # sampler's log-probs (diagnostics; old_logp is recomputed)
    texts: list[str] = field(default_factory=list)
    rewards: Tensor | None = None  # [N] total reward
    accuracy: Tensor | None = None  # [N] accuracy part in [0, 1] (EDNM value for spatial numbers)
    correct: Tensor | None = None  # [N] bool, for accuracy statistics
    format_ok: Tensor | None = None  # [N] format reward
    repetition: Tensor | None = None  # [N] n-gram repetition rate

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
) -> Rollouts:
    """Sample ``group_size`` continuations of every prompt in one ragged batch. Vision placeholder tokens
    (image/video pad, vision start/end) are never sampled: a response carrying them could not be re-run."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rep = [p for p in prompts for _ in range(group_size)]
    out = generate(
        model,
        [p.prompt_tokens for p in rep],
        pixel_values=[p.pixel_values for p in rep],
        image_grid_thw=[p.image_grid_thw if len(p.image_grid_thw) else None for p in rep],
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seed=seed,
        return_logprobs=True,
        suppress_token_ids=_vision_token_ids(model),
    )
    return Rollouts(
        prompts=list(prompts),
        group_size=group_size,
        response_tokens=[t.cpu() for t in out.tokens],
        finished=out.finished.cpu(),
        rollout_logprobs=[lp.cpu() for lp in out.logprobs] if out.logprobs is not None else None,
    )


def _vision_token_ids(model) -> list[int]:
    from m2mega.inference.generate import unwrap_model

    c = unwrap_model(model).cfg
    return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]


def score_rollouts(
    rollouts: Rollouts,
    decode: Callable[[list[int]], str],
    reward_config: RewardConfig,
) -> Rollouts:
    """Decode every response and fill the reward fields. Malformed responses score 0 (never raise)."""
    texts, total, acc, correct, fmt, rep = [], [], [], [], [], []
    for i, toks in enumerate(rollouts.response_tokens):
        info = rollouts.prompt_of(i).info
        text = decode(toks.tolist())
        r = compute_reward(text, info.answer, info.task, info.answer_type, reward_config)
        texts.append(text)
        total.append(r.total)
        acc.append(r.accuracy)
        correct.append(r.correct)
        fmt.append(r.format)
        rep.append(r.repetition_rate)
    rollouts.texts = texts
    rollouts.rewards = torch.tensor(total, dtype=torch.float32)
    rollouts.accuracy = torch.tensor(acc, dtype=torch.float32)
    rollouts.correct = torch.tensor(correct, dtype=torch.bool)
    rollouts.format_ok = torch.tensor(fmt, dtype=torch.float32)
    rollouts.repetition = torch.tensor(rep, dtype=torch.float32)
    return rollouts
