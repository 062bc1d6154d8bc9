"""Multi-task GRPO with verifiable rewards: ``python -m m2mega.train.grpo --config grpo.yaml [--k=v ...]``.

One step (every rank of a replica does the same; DP replicas take different prompts):

1. prompts of this step from the RL set (``PromptDataset``: curriculum order or shuffled, a config switch);
2. ``group_size`` rollouts per prompt with the KV-cache generator (temperature / top-p / max new tokens);
3. rewards per rollout (``m2mega.rewards``: answer extraction, choice / numeric / math match, EDNM for
   spatial numbers, format, optional repetition penalty), per task;
4. group-relative advantages ``(r - mean) / (std + eps)``; zero-variance groups dropped or kept; dynamic
   sampling draws extra prompts while too few informative groups are left; Eq. 6 weights
   ``w = sigma * acc * (1 - acc)`` per group (or 1: static);
5. reference log-probs from the frozen reference model when beta > 0 (KL coefficient from Eq. 7's cosine
   schedule or constant); old-policy log-probs from a forward-only pass when the rollouts are used for
   more than one update (with one update, pi_old == pi_theta and the policy's own detached log-probs are
   exact, which saves a forward pass);
6. ``updates_per_rollout`` optimizer steps through ``Trainer.train_step`` with the fused log-prob + GRPO
   loss (:mod:`m2mega.train.grpo_update`).

Per-task metrics (reward, accuracy, response length, repetition rate) plus clip fraction, KL, entropy and
the step's filtering counts go to TensorBoard and the progress line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional


def build_parser() -> argparse.ArgumentParser:
    """The command line. Defined above the torch/megatron imports so ``--help`` does not wait for them."""
    p = argparse.ArgumentParser(prog="python -m m2mega.train.grpo", description=__doc__.split("\n")[0],
                                epilog="Any other --section.key=value overrides the YAML config.")
    p.add_argument("--config", help="YAML config (see examples/tiny/ or examples/qwen25vl_7b/grpo.yaml)")
    from m2mega.train.config import add_print_config_flag  # config.py imports no torch: --help stays fast

    add_print_config_flag(p)
    p.add_argument("--eval-prefix", help="preprocessed held-out prompts to score after training "
                                         "(with --schedule.train_iters=0: evaluate model.init_from only)")
    p.add_argument("--eval-json", help="write the held-out table (per task) here (rank 0)")
    p.add_argument("--history-json", help="write per-step rollout metrics here (rank 0)")
    p.add_argument("--validation-json", help="write the held-out curve (grpo.eval_interval) here (rank 0)")
    return p


if __name__ == "__main__":
    build_parser().parse_known_args()  # --help / usage errors answer here, before ~5-10 s of imports

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from m2mega.rewards import RewardConfig  # noqa: E402
from m2mega.rl import DynamicSampler, KLSchedule, group_advantages, group_weights  # noqa: E402

from .config import TrainConfig, load_config, to_yaml  # noqa: E402
from .grpo_update import make_forward_step, split_into_microbatches  # noqa: E402
from .loop import Trainer, describe_checkpoint  # noqa: E402
from .rollout import (  # noqa: E402
    Rollouts, generate_rollouts, score_rollouts, select_groups, task_metrics, write_rollouts,
)

__all__ = ["GRPORunner", "StepStats", "task_metrics", "run_grpo", "write_rollouts", "main"]


@dataclass
class StepStats:
    iteration: int
    beta: float
    metrics: dict[str, float] = field(default_factory=dict)
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)


class GRPORunner:
    """Drives GRPO steps on top of a :class:`Trainer` (optimizer, checkpoints, logging).

    ``prompts(step) -> list[RLPrompt]`` gives this rank's prompts of a step (and, for dynamic sampling,
    of later "refill" draws); ``decode(ids) -> str`` detokenises responses; ``ref_model`` is the frozen
    reference (None when beta is 0 throughout).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        trainer: Trainer,
        prompts: Callable[[int], list],
        decode: Callable[[list[int]], str],
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        ref_model: Optional[torch.nn.Module] = None,
    ) -> None:
        g = cfg.grpo
        self.cfg, self.trainer, self.prompts, self.decode = cfg, trainer, prompts, decode
        self.eos, self.pad = eos_token_id, pad_token_id
        self.reward_config = RewardConfig.from_dict(g.reward_config_dict())
        if g.kl_schedule == "cosine":
            self.kl = KLSchedule("cosine", total_steps=cfg.schedule.train_iters, beta_min=g.beta_min,
                                 beta_max=g.beta_max)
        else:
            self.kl = KLSchedule("constant", beta=g.beta)
        self.ref_model = ref_model
        self.refill_draws = 0  # prompts drawn beyond the regular schedule by dynamic sampling
        self.no_signal_steps = 0  # rollout steps without an informative group (no update made)
        self.no_signal_run = 0  # ... of them in a row, up to the last step
        trainer.register_state("grpo_no_signal_steps", lambda: self.no_signal_steps,
                               lambda v: setattr(self, "no_signal_steps", int(v)))
        trainer.register_state("grpo_refill_draws", lambda: self.refill_draws,
                               lambda v: setattr(self, "refill_draws", int(v)))
        if self.ref_model is None and g.uses_kl():
            raise ValueError("a KL coefficient > 0 needs ref_model (the frozen reference policy)")

    # ------------------------------------------------------------------ pieces
    @property
    def policy(self):
        return self.trainer.model[0]

    def _rollouts(self, prompts, seed: int) -> Rollouts:
        g = self.cfg.grpo
        for chunk in self.trainer.model:
            chunk.eval()
        try:
            r = generate_rollouts(self.policy, prompts, group_size=g.group_size, max_new_tokens=g.max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p, eos_token_id=self.eos,
                                  pad_token_id=self.pad, seed=seed)
        finally:
            for chunk in self.trainer.model:
                chunk.train()
        return score_rollouts(r, self.decode, self.reward_config)

    def _advantages(self, r: Rollouts):
        g = self.cfg.grpo
        G = g.group_size
        rewards = r.rewards.view(-1, G)
        adv, keep = group_advantages(rewards, eps=g.adv_eps, drop_zero_variance=g.drop_zero_variance)
        w = group_weights(r.accuracy.view(-1, G).clamp(0, 1), g.advantage_weighting, g.sigma)
        return adv.reshape(-1), keep, w.repeat_interleave(G)

    def _collect(self, step: int) -> tuple[Rollouts, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Rollouts of this step. With ``grpo.dynamic_sampling``, :class:`m2mega.rl.DynamicSampler` draws
        extra prompts (from a separate, deterministic refill stream) while too few groups are informative."""
        g = self.cfg.grpo
        seed0 = self.cfg.seed * 1_000_003
        if not g.dynamic_sampling:
            r = self._rollouts(self.prompts(step), seed=seed0 + step)
            adv, keep, w = self._advantages(r)
            return r, adv, keep, w, {"groups": float(keep.numel()), "degenerate_groups": float((~keep).sum()),
                                     "refill_rounds": 0.0}
        G = g.group_size
        first = [True]

        def generate(k: int) -> list[tuple[Rollouts, int]]:
            if first[0]:
                first[0] = False
                r = self._rollouts(self.prompts(step), seed=seed0 + step)
            else:
                self.refill_draws += 1
                # a stream of its own, far from the regular steps, so refills never repeat a step's prompts
                r = self._rollouts(self.prompts(10_000_000 + self.refill_draws)[:k],
                                   seed=seed0 + 10_000_000 + self.refill_draws)
            return [(r, i) for i in range(r.n // G)]

        sampler = DynamicSampler(batch_groups=len(self.prompts(step)), max_extra_rounds=g.max_refill_rounds,
                                 tol=g.adv_eps, pad_with_degenerate=False,
                                 rewards_of=lambda grp: grp[0].rewards[grp[1] * G : (grp[1] + 1) * G])
        res = sampler.fill(generate)
        r = select_groups(res.groups, G)
        adv, keep, w = self._advantages(r)
        info = {"groups": float(res.generated), "degenerate_groups": float(res.filtered),
                "refill_rounds": float(res.rounds - 1)}
        return r, adv, keep, w, info

    @torch.no_grad()
    def _forward_logprobs(self, model, mbs) -> list[torch.Tensor]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        record: list[torch.Tensor] = []
        fs = make_forward_step(temperature=self.cfg.grpo.temperature, clip_low=0, clip_high=0, dual_clip=None,
                               beta=0.0, logprob_only=True, record=record)
        was_training = model.training
        model.eval()
        try:
            get_forward_backward_func()(forward_step_func=fs, data_iterator=iter(mbs), model=[model],
                                        num_microbatches=len(mbs), seq_length=max(m.num_tokens for m in mbs),
                                        micro_batch_size=1, forward_only=True)
        finally:
            model.train(was_training)
        return record

    # ------------------------------------------------------------------ the step
    def step(self) -> StepStats:
        """One rollout step = ``updates_per_rollout`` optimizer updates (verl's mini-batches): the kept
        prompt groups are split into that many parts, each one optimizer step. ``trainer.iteration``
        counts optimizer updates, so ``schedule.train_iters`` = rollout steps x updates_per_rollout.

        A step where no group (on any data-parallel replica) carries a signal makes no update: it is
        warned about and counted (``no_signal_steps``), and ``grpo.max_no_signal_steps`` such steps in a
        row raise an error."""
        g = self.cfg.grpo
        U = max(1, int(g.updates_per_rollout))
        it = self.trainer.iteration
        beta = float(self.kl(it))
        r, adv, keep, w, info = self._collect(it // U)
        G = g.group_size
        stats = StepStats(iteration=it + U, beta=beta, per_task=task_metrics(r))
        stats.metrics.update(info)
        groups = [k for k in range(keep.numel()) if bool(keep[k])]
        parts = [groups[i::U] for i in range(U)] if len(groups) >= U else [[k] for k in groups]
        parts = [sorted(p) for p in parts if p]
        # Data-parallel replicas hold different prompts, so they may keep different numbers of groups; every
        # replica must still run the same number of optimizer steps (each is a DP all-reduce).
        n_kept, n_parts = _dp_agree(len(groups), len(parts))
        dev = _device()
        pad = dict(pad_to_multiple_of=self.cfg.parallel.tp if self.cfg.parallel.sequence_parallel else 1,
                   pad_token_id=self.pad)
        seq = self.cfg.schedule.seq_length
        batches = [
            [m.to(dev) for m in split_into_microbatches(r, [k * G + j for k in part for j in range(G)], seq, adv, w,
                                                        **pad)]
            for part in parts
        ]
        while len(batches) < n_parts:  # this replica ran out of groups: a step that adds no gradient
            batches.append([m.to(dev) for m in _no_loss(split_into_microbatches(r, [0], seq, adv, w, **pad))])
        flat = [m for b in batches for m in b]
        if flat and beta != 0.0:
            for m, lp in zip(flat, self._forward_logprobs(self.ref_model, flat)):
                m.ref_logp = lp
        if len(batches) > 1:
            # Later parts are updated by an already-updated policy: they need pi_old from before the first
            # update. With a single update pi_old == pi_theta, and the policy's detached log-probs are exact.
            for m, lp in zip(flat, self._forward_logprobs(self.policy, flat)):
                m.old_logp = lp
        fs = make_forward_step(temperature=g.temperature, clip_low=g.clip_low, clip_high=g.clip_high,
                               dual_clip=g.dual_clip, beta=beta)
        sums: dict[str, float] = defaultdict(float)
        for mbs in batches:
            res = self.trainer.train_step(iter(mbs), fs, num_microbatches=len(mbs))
            for k, v in res.metrics.items():
                sums[k] += float(v) / len(batches)
            if res.grad_norm is not None:
                sums["grad_norm"] += float(res.grad_norm) / len(batches)
        stats.metrics.update(sums)
        # Updates that had no data (too few informative groups) still count, keeping the schedule aligned.
        self.trainer.iteration = it + U
        stats.metrics["updates"] = float(len(batches))
        stats.metrics["beta"] = beta
        self._count_no_signal(n_kept == 0, stats)
        self._log(stats)
        return stats

    def _count_no_signal(self, no_signal: bool, stats: StepStats) -> None:
        max_run = self.cfg.grpo.max_no_signal_steps
        if not no_signal:
            self.no_signal_run = 0
        else:
            self.no_signal_steps += 1
            self.no_signal_run += 1
            a = stats.per_task.get("all", {})
            if dist.get_rank() == 0:
                self.trainer._say(
                    f"warning: grpo step {stats.iteration}: no informative group (every group's rollouts scored "
                    f"the same; mean reward {a.get('reward', float('nan')):.3f}): no update "
                    f"({self.no_signal_steps} such steps so far, {self.no_signal_run} in a row)")
            if max_run and self.no_signal_run >= max_run:
                raise RuntimeError(
                    f"{self.no_signal_run} GRPO steps in a row had no informative group (all rollouts of every "
                    f"prompt scored the same, mean reward {a.get('reward', float('nan')):.3f}), so the policy "
                    f"cannot learn: the prompts are too easy or too hard for it, group_size is too small, or "
                    f"the reward never varies (grpo.max_no_signal_steps={max_run}; 0 disables this check)")
        stats.metrics["no_signal_steps"] = float(self.no_signal_steps)

    def _log(self, stats: StepStats) -> None:
        w = self.trainer._writer
        if w is None:
            return
        for task, d in stats.per_task.items():
            for k, v in d.items():
                w.add_scalar(f"rollout/{task}/{k}", v, stats.iteration)
        for k, v in stats.metrics.items():
            if math.isfinite(v):
                w.add_scalar(f"grpo/{k}", v, stats.iteration)


def _dp_agree(kept_groups: int, parts: int) -> tuple[int, int]:
    """(kept groups summed over data-parallel replicas, the most update parts any replica has)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_data_parallel_world_size() == 1:
        return kept_groups, parts
    kept = torch.tensor([float(kept_groups)], device=_device())
    most = torch.tensor([float(parts)], device=_device())
    dist.all_reduce(kept, group=ps.get_data_parallel_group())
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(kept.item()), int(most.item())


def _no_loss(mbs: list) -> list:
    """Micro-batches that run the model but carry no loss token (their gradient is exactly 0)."""
    for m in mbs:
        m.loss_mask = torch.zeros_like(m.loss_mask)
        m.advantages = torch.zeros_like(m.advantages)
    return mbs


def _device() -> torch.device:
    from m2mega.runtime import device

    return device()


def frozen_copy(model: torch.nn.Module, provider: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The reference policy: a fresh build of the same stage (``provider()``) holding ``model``'s weights,
    with gradients off. (A deepcopy would copy megatron's process-group handles, which cannot be copied.)"""
    from m2mega.inference.generate import unwrap_model

    ref = provider()
    ref.load_state_dict(unwrap_model(model).state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _prompt_order(order: str) -> str:
    # the preprocessed files are already in curriculum order: read them sequentially
    return {"curriculum": "sequential"}.get(order, order)


def run_grpo(cfg: TrainConfig, *, eval_prefix: Optional[str] = None,
             decode: Optional[Callable[[list[int]], str]] = None) -> dict:
    """Initialise the runtime, build policy + reference + data, run ``schedule.train_iters`` GRPO steps.

    ``decode`` replaces the dataset tokenizer's detokeniser (tests use it to script rewards).
    Returns ``{"history": [StepStats...], "eval": {...} or None, "validation": [{"iteration", "table"}...]}``
    on every rank (``validation``: the held-out curve of ``grpo.eval_interval``, empty when off)."""
    import m2mega.runtime as rt
    from megatron.core import parallel_state as ps

    from m2mega.data.loader import PromptDataset
    from m2mega.eval.run import prefix_prompts, stop_token_ids

    from . import vlm
    from .families import get_model_family

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.tp * cfg.parallel.pp > world:
        raise ValueError(f"TP{cfg.parallel.tp} x PP{cfg.parallel.pp} needs at least that many ranks, got {world}")
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    rt.init(cfg.parallel.tp, cfg.parallel.pp, backend=backend, seed=cfg.seed, timeout_s=cfg.parallel.timeout_s)
    if not cfg.data.train_prefix:
        raise ValueError("data.train_prefix must name the preprocessed RL prompts (tools/preprocess_data.py)")
    tok = vlm.tokenizer_from_prefix(cfg.data.train_prefix, cfg.data.tokenizer)
    prompts = PromptDataset(cfg.data.train_prefix, cfg.grpo.prompts_per_step, dp_rank=ps.get_data_parallel_rank(),
                            dp_size=ps.get_data_parallel_world_size(), order=_prompt_order(cfg.data.order),
                            seed=cfg.data.seed, num_buckets=cfg.data.num_buckets)
    fam = get_model_family(cfg.model.family)
    trainer = Trainer(cfg, fam.provider, flops_per_token=fam.flops_per_token)
    if dist.get_rank() == 0:
        print("# m2mega GRPO\n# config\n" + to_yaml(cfg), flush=True)
    g = cfg.grpo
    # The reference is the policy we start from (model.init_from), copied before any resume.
    ref = frozen_copy(trainer.model[0], lambda: fam.provider(cfg)) if g.uses_kl() else None
    decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))
    runner = GRPORunner(cfg, trainer, prompts.prompts, decode,
                        eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_id, ref_model=ref)
    trainer.resume()
    if dist.get_rank() == 0:
        if cfg.model.init_from:
            trainer._say(f"policy (and KL reference) initialised from {describe_checkpoint(cfg.model.init_from)}")
        trainer._say("# grpo step N: rollout means over this step's prompts; loss = policy-gradient + beta x KL "
                     "per response token; kept = prompt groups whose rollouts' rewards differ (they carry the "
                     "gradient) / groups rolled out; no-signal = steps so far without any kept group")
    history: list[StepStats] = []
    validation: list[dict] = []
    eval_prompts = prefix_prompts(g.eval_prefix) if g.eval_interval else None
    U = max(1, g.updates_per_rollout)

    def validate() -> None:
        validation.append(_validate(runner, eval_prompts, trainer.iteration))
        if dist.get_rank() == 0:
            v = validation[-1]["table"].get("all", {})
            extra = "".join(f" {k} {x:.3f}" for k, x in v.items() if "@" in k and not k.startswith("reward"))
            trainer._say(f"held-out @ {trainer.iteration}: acc {v.get('correct', float('nan')):.3f} "
                         f"reward {v.get('reward', float('nan')):.3f}{extra}")

    trainer.start_progress(cfg.schedule.train_iters)
    start_it = trainer.iteration
    try:
        if eval_prompts is not None:
            validate()
        while trainer.iteration < cfg.schedule.train_iters:
            s = runner.step()
            history.append(s)
            a = s.per_task.get("all", {})
            if dist.get_rank() == 0:
                kept = s.metrics.get("groups", 0) - s.metrics.get("degenerate_groups", 0)
                loss = s.metrics.get("loss")
                trainer._say(f"grpo step {s.iteration}: reward {a.get('reward', float('nan')):.3f} "
                             f"acc {a.get('correct', float('nan')):.3f} len {a.get('response_len', 0):.1f} "
                             f"loss {'-' if loss is None else f'{loss:.4f}'} beta {s.beta:.2e} "
                             f"kept {kept:.0f}/{s.metrics.get('groups', 0):.0f} "
                             f"no-signal {runner.no_signal_steps}")
            c = cfg.checkpoint
            if c.save_dir and c.save_interval and trainer.iteration % c.save_interval == 0:
                trainer.save()
            if eval_prompts is not None and ((trainer.iteration // U) % g.eval_interval == 0
                                             or trainer.iteration >= cfg.schedule.train_iters):
                validate()
        if cfg.checkpoint.save_dir and cfg.checkpoint.save_at_end:
            trainer.save()
        updates = int(sum(h.metrics.get("updates", 0) for h in history))
        if dist.get_rank() == 0:
            trainer._say(f"GRPO done: {len(history)} rollout steps (iteration {start_it} -> {trainer.iteration}), "
                         f"{updates} optimizer updates, {runner.no_signal_steps} steps without an informative "
                         f"group; checkpoint: {trainer.last_checkpoint or 'none saved (checkpoint.save_dir unset)'}")
        result = {"history": history, "eval": None, "validation": validation, "checkpoint": trainer.last_checkpoint}
        if eval_prefix:
            from m2mega.eval.held_out import evaluate_prompts

            result["eval"] = evaluate_prompts(
                runner.policy, prefix_prompts(eval_prefix), runner.decode, runner.reward_config,
                eos_token_id=runner.eos, pad_token_id=runner.pad, max_new_tokens=g.max_new_tokens)
        return result
    finally:
        trainer.close()


def _validate(runner: GRPORunner, prompts: list, iteration: int) -> dict:
    """One point of the held-out curve (greedy + ``eval_samples`` sampled answers), logged to TensorBoard
    as ``heldout/<task>/<metric>``."""
    from m2mega.eval.held_out import validation_table

    g = runner.cfg.grpo
    table = validation_table(runner.policy, prompts, runner.decode, runner.reward_config, samples=g.eval_samples,
                             eos_token_id=runner.eos, pad_token_id=runner.pad, max_new_tokens=g.max_new_tokens,
                             temperature=g.temperature, top_p=g.top_p, seed=runner.cfg.seed + 17)
    w = runner.trainer._writer
    if w is not None:
        for task, d in table.items():
            for k, v in d.items():
                if k != "n":
                    w.add_scalar(f"heldout/{task}/{k}", v, iteration)
    return {"iteration": iteration, "table": table}


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.mode != "grpo":
        from m2mega.runtime.cli import UsageError

        raise UsageError(f"mode is {cfg.mode!r}; this entry point runs GRPO (set mode: grpo)")
    from .loop import preflight

    preflight(cfg, prefixes=[("--eval-prefix", args.eval_prefix)])  # before process groups and the model
    import json

    import m2mega.runtime as rt

    try:
        out = run_grpo(cfg, eval_prefix=args.eval_prefix)
        if dist.get_rank() == 0:
            if out["eval"] is not None:
                from m2mega.eval.metrics import format_table

                print(format_table(out["eval"]), flush=True)
                if args.eval_json:
                    with open(args.eval_json, "w") as f:
                        json.dump(out["eval"], f, indent=1)
            if args.history_json:
                with open(args.history_json, "w") as f:
                    json.dump([{"iteration": s.iteration, "beta": s.beta, "metrics": s.metrics,
                                "per_task": s.per_task} for s in out["history"]], f, indent=1)
            if args.validation_json:
                with open(args.validation_json, "w") as f:
                    json.dump(out["validation"], f, indent=1)
    finally:
        rt.shutdown()
    from .hf_files import export_final_hf

    export_final_hf(cfg, out["checkpoint"])  # checkpoint.save_hf: after the job's process groups are gone
    return 0


if __name__ == "__main__":
    from m2mega.runtime.cli import run_main

    sys.exit(run_main(main))
