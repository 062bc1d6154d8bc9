"""Scoring rollouts with the verifiable rewards, and their per-task means (training log and validation)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Callable

import torch

from m2mega.rewards import RewardConfig, compute_reward

from .rollout import Rollouts

__all__ = ["score_rollouts", "task_metrics"]


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
        # The record's fields reach a user's reward.custom_function as extra_info (verl's convention).
        r = compute_reward(text, info.answer, info.task, info.answer_type, reward_config, extra=asdict(info))
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


def task_metrics(rollouts: Rollouts) -> dict[str, dict[str, float]]:
    """Per-task means of reward, accuracy, correctness, response length and repetition rate."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tasks = rollouts.tasks()
    for i, task in enumerate(tasks):
        for key in (task, "all"):
            d = acc[key]
            d["reward"].append(float(rollouts.rewards[i]))
            d["accuracy"].append(float(rollouts.accuracy[i]))
            d["correct"].append(float(rollouts.correct[i]))
            d["format"].append(float(rollouts.format_ok[i]))
            d["response_len"].append(float(rollouts.response_tokens[i].numel()))
            d["repetition"].append(float(rollouts.repetition[i]))
    return {t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in acc.items()}
