"""Held-out evaluation of a policy: greedy (or sampled) answers to RL-style prompts, scored by the same
verifiable rewards as training, aggregated per task.

Every rank of a model replica calls :func:`evaluate_prompts` with the same prompts (generation is
collective over TP/PP); the returned table is identical on every rank.
"""

from __future__ import annotations

from typing import Callable, Sequence

from m2mega.rewards import RewardConfig

__all__ = ["evaluate_prompts", "EVAL_METRICS"]

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

    ``samples``, when given, receives ``(prompt id, task, response text, reward)`` for inspection."""
    from m2mega.train.grpo import task_metrics
    from m2mega.train.rollout import generate_rollouts, score_rollouts

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
                    samples.append((p.info.id, p.info.task, text, float(r.rewards[i])))
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
