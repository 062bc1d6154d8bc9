"""Held-out evaluation of a policy: greedy (or sampled) answers to RL-style prompts, scored by the same
verifiable rewards as training, aggregated per task.

Every rank of a model replica calls :func:`evaluate_prompts` with the same prompts (generation is
collective over TP/PP); the returned table is identical on every rank.
"""

from __future__ import annotations

from typing import Callable, Sequence

from m2mega.rewards import RewardConfig

from .rollout import generate_rollouts
from .scoring import score_rollouts, task_metrics
from .tables import format_table, mean_ci  # noqa: F401 (re-exported)

__all__ = ["evaluate_prompts", "evaluate_sampled", "validation_table", "format_table", "mean_ci", "EVAL_METRICS"]

EVAL_METRICS = ("correct", "accuracy", "reward", "format", "response_len", "repetition")


def evaluate_prompts(
    model,
    prompts: Sequence,
    decode: Callable[[list[int]], str],
    reward_config: RewardConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    samples: list | None = None,
) -> dict[str, dict[str, float]]:
    """Per-task (and ``"all"``) means of :data:`EVAL_METRICS` over ``prompts`` (``RLPrompt`` objects).

    ``samples``, when given, receives ``(prompt id, task, response text, reward, response token ids)``."""
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            r = generate_rollouts(model, chunk, group_size=1, max_new_tokens=max_new_tokens, greedy=greedy,
                                  temperature=temperature, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                  seed=seed + start)
            score_rollouts(r, decode, reward_config)
            if samples is not None:
                for i, text in enumerate(r.texts):
                    p = r.prompt_of(i)
                    samples.append((p.info.id, p.info.task, text, float(r.rewards[i]),
                                    r.response_tokens[i].tolist()))
            tasks = r.tasks()
            for task, d in task_metrics(r).items():
                n = len(tasks) if task == "all" else tasks.count(task)
                acc = sums.setdefault(task, {k: 0.0 for k in EVAL_METRICS})
                for k in EVAL_METRICS:
                    acc[k] += d[k] * n
                counts[task] = counts.get(task, 0) + n
    finally:
        model.train(was_training)
    return {t: {"n": float(counts[t]), **{k: v / counts[t] for k, v in d.items()}} for t, d in sums.items()}


def evaluate_sampled(
    model,
    prompts: Sequence,
    decode: Callable[[list[int]], str],
    reward_config: RewardConfig,
    *,
    k: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``k`` sampled answers per prompt; per task (and ``"all"``): ``mean@k`` (mean correctness of the
    samples), ``pass@k`` (share of prompts with at least one correct sample) and ``reward_mean@k``.

    ``pass@k`` well above ``mean@k`` means the policy can find answers it does not yet give reliably: the
    room RL has to sharpen it."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    per_task: dict[str, list[tuple[float, float, float]]] = {}
    was_training = model.training
    model.eval()
    try:
        per_batch = max(1, batch_size // k)
        for start in range(0, len(prompts), per_batch):
            chunk = list(prompts[start : start + per_batch])
            r = generate_rollouts(model, chunk, group_size=k, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                  seed=seed + 7919 * start)
            score_rollouts(r, decode, reward_config)
            correct = r.correct.float().view(-1, k)
            rewards = r.rewards.view(-1, k)
            for j, p in enumerate(chunk):
                row = (float(correct[j].mean()), float(correct[j].max()), float(rewards[j].mean()))
                for task in (p.info.task, "all"):
                    per_task.setdefault(task, []).append(row)
    finally:
        model.train(was_training)
    return {t: {"n": float(len(rows)), f"mean@{k}": sum(x[0] for x in rows) / len(rows),
                f"pass@{k}": sum(x[1] for x in rows) / len(rows),
                f"reward_mean@{k}": sum(x[2] for x in rows) / len(rows)} for t, rows in per_task.items()}


def validation_table(model, prompts: Sequence, decode: Callable[[list[int]], str], reward_config: RewardConfig, *,
                     samples: int, eos_token_id: int | list[int], pad_token_id: int, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> dict[str, dict[str, float]]:
    """Greedy :func:`evaluate_prompts` merged with :func:`evaluate_sampled` (``samples`` > 0) per task: the
    held-out point GRPO logs every ``grpo.eval_interval`` steps."""
    kw = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens)
    table = evaluate_prompts(model, prompts, decode, reward_config, **kw)
    if samples > 0:
        sampled = evaluate_sampled(model, prompts, decode, reward_config, k=samples, temperature=temperature,
                                   top_p=top_p, seed=seed, **kw)
        for task, d in sampled.items():
            table.setdefault(task, {}).update({m: v for m, v in d.items() if m != "n"})
    return table
