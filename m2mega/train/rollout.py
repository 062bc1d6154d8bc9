"""GRPO rollouts: G samples per prompt with the KV-cache generator, scored by the verifiable rewards.

Every rank of a model replica (TP x PP) calls :func:`generate_rollouts` with the same prompts and gets the
same rollouts (the generator broadcasts its choices over TP/PP), so scoring and advantages need no further
communication inside a replica. Data-parallel replicas hold different prompts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from m2mega.data.loader import RLPrompt
from m2mega.inference.generate import generate
from m2mega.rewards import RewardConfig, compute_reward

__all__ = ["Rollouts", "generate_rollouts", "score_rollouts", "select_groups", "task_metrics", "write_rollouts"]


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
    )


def write_rollouts(*, checkpoint: str, input_path: str, output_path: str, num_rollouts: int,
                   batch_prompts: int = 16) -> int:
    """Sample ``num_rollouts`` responses per RL row of ``input_path`` (JSONL) with a training checkpoint and
    write ``{"id", "responses"}`` lines to ``output_path`` (what ``tools/score_difficulty.py`` scores).

    The model, sampling settings and preprocessing (tokenizer, system prompt, pixel bounds) are the
    checkpoint's own (its ``config.yaml`` and its training data's ``meta.json``). Runs in this process at
    TP1 (or under torchrun: TP = world size). Rows the preprocessor rejects get no line (score_difficulty
    reports them as missing) and are listed in ``output_path + ".rejects.jsonl"``. Returns rows written."""
    import dataclasses
    import json
    import os
    import tempfile

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import m2mega.runtime as rt
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.eval.run import load_policy, prefix_prompts, stop_token_ids

    from . import vlm
    from .checkpoint import find_latest
    from .config import load_config

    ckpt = checkpoint
    if not os.path.isfile(os.path.join(ckpt, "config.yaml")):
        found = find_latest(checkpoint)
        if found is None:
            raise FileNotFoundError(f"{checkpoint}: no complete checkpoint with a config.yaml")
        ckpt = found[1]
    cfg = load_config(os.path.join(ckpt, "config.yaml"))
    meta_path = (cfg.data.train_prefix or "") + ".meta.json"
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    pc = meta["config"]
    from m2mega.data.dataset_meta import dataset_tokenizer_path

    tok_path = dataset_tokenizer_path(cfg.data.train_prefix, meta, cfg.data.tokenizer)
    pre = PreprocessConfig(tokenizer_type=meta["tokenizer_type"], tokenizer_model=tok_path,
                           seq_length=pc["seq_length"], min_pixels=pc["min_pixels"], max_pixels=pc["max_pixels"],
                           system_prompt=pc["system_prompt"], order="input", progress=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not ps.model_parallel_is_initialized():
        rt.init(world, 1, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=world, pp=1))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "prompts")
        if dist.get_rank() == 0:
            preprocess([input_path], prefix, pre, reject_file=output_path + ".rejects.jsonl")
        dist.barrier()
        model = load_policy(cfg, ckpt)
        tok = vlm.tokenizer_from_prefix(cfg.data.train_prefix, cfg.data.tokenizer)
        prompts = prefix_prompts(prefix)
        g = cfg.grpo
        n = 0
        out = open(output_path, "w", encoding="utf-8") if dist.get_rank() == 0 else None
        try:
            for start in range(0, len(prompts), batch_prompts):
                chunk = prompts[start : start + batch_prompts]
                r = generate_rollouts(model, chunk, group_size=num_rollouts, max_new_tokens=g.max_new_tokens,
                                      temperature=g.temperature, top_p=g.top_p,
                                      eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_id,
                                      seed=cfg.seed + start)
                for k, p in enumerate(chunk):
                    texts = [tok.decode(r.response_tokens[k * num_rollouts + j].tolist(), skip_special_tokens=True)
                             for j in range(num_rollouts)]
                    if out is not None:
                        out.write(json.dumps({"id": p.info.id, "responses": texts}, ensure_ascii=False) + "\n")
                    n += 1
        finally:
            if out is not None:
                out.close()
    return n
