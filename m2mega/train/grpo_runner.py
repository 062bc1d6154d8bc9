"""The GRPO step source of :meth:`m2mega.train.loop.Trainer.fit` (:class:`GRPORunner`): rollouts, rewards,
advantages and ``grpo.updates_per_rollout`` optimizer updates per step, the held-out validation curve as its
evaluation hook, and the step's metrics (per task, clip fraction, KL, entropy, rollout throughput). The
command line and run setup are in :mod:`m2mega.train.grpo`; the algorithm is summarised there."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from m2mega.models.wrappers import unwrap_model
from m2mega.rewards import RewardConfig, RewardFailureMeter
from m2mega.rl import DynamicSampler, KLSchedule, group_advantages, group_weights
from m2mega.rl.rollout import Rollouts, generate_rollouts, select_groups
from m2mega.rl.scoring import score_rollouts, task_metrics
from m2mega.rl.validation import validation_table
from m2mega.runtime import device

from .config import TrainConfig
from .grpo_update import make_forward_step, split_into_microbatches
from .loop import Trainer

__all__ = ["GRPORunner", "StepStats", "frozen_copy"]


@dataclass
class StepStats:
    iteration: int
    beta: float
    metrics: dict[str, float] = field(default_factory=dict)
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)


class GRPORunner:
    """GRPO as a step source of :meth:`Trainer.fit`: each step rolls out, scores, computes advantages and
    makes ``grpo.updates_per_rollout`` optimizer updates through the trainer; the held-out validation curve
    is its evaluation hook.

    ``prompts(step) -> list[RLPrompt]`` gives this rank's prompts of a step (and, for dynamic sampling,
    of later "refill" draws); ``decode(ids) -> str`` detokenises responses; ``ref_policy`` is the frozen
    KL reference policy (None when beta is 0 throughout).
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
        ref_policy: Optional[torch.nn.Module] = None,
        eval_prompts: Optional[list] = None,
    ) -> None:
        g = cfg.grpo
        self.cfg, self.trainer, self.prompts, self.decode = cfg, trainer, prompts, decode
        self.eos, self.pad = eos_token_id, pad_token_id
        self.reward_config = RewardConfig.from_dict(g.reward_config_dict())
        self.eval_reward_config = RewardConfig.from_dict(g.eval_reward_config_dict())  # held-out scoring
        self.reward_failures = RewardFailureMeter()  # failed custom rewards / grader timeouts per step
        if g.kl_schedule == "cosine":
            self.kl = KLSchedule("cosine", total_steps=cfg.schedule.train_iters, beta_min=g.beta_min,
                                 beta_max=g.beta_max)
        else:
            self.kl = KLSchedule("constant", beta=g.beta)
        self.ref_policy = ref_policy
        self.eval_prompts = eval_prompts  # held-out RLPrompts of the validation curve (grpo.eval_interval)
        self.history: list[StepStats] = []
        self.validation: list[dict] = []
        self.last_results: list = []  # the optimizer steps (StepResult) of the last step()
        self.start_iteration = trainer.iteration
        self.refill_draws = 0  # prompts drawn beyond the regular schedule by dynamic sampling
        self.no_signal_steps = 0  # rollout steps without an informative group (no update made)
        self.no_signal_run = 0  # ... of them in a row, up to the last step
        self._gen_s = self._gen_tokens = 0.0  # rollout generation seconds / tokens of the current step
        self._step_times: list[float] = []  # wall seconds of the rollout steps of this run (for the ETA)
        trainer.register_state("grpo_no_signal_steps", lambda: self.no_signal_steps,
                               lambda v: setattr(self, "no_signal_steps", int(v)))
        trainer.register_state("grpo_refill_draws", lambda: self.refill_draws,
                               lambda v: setattr(self, "refill_draws", int(v)))
        if self.ref_policy is None and g.uses_kl():
            raise ValueError("a KL coefficient > 0 needs ref_policy (the frozen KL reference policy)")

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
                                  pad_token_id=self.pad, seed=seed, max_batch=g.rollout_batch,
                                  max_kv_tokens=g.rollout_kv_tokens or None)
        finally:
            for chunk in self.trainer.model:
                chunk.train()
        self._gen_s += r.stats.get("seconds", 0.0)
        self._gen_tokens += r.stats.get("tokens", 0.0)
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
        record: list[torch.Tensor] = []
        fs = make_forward_step(temperature=self.cfg.grpo.temperature, clip_low=0, clip_high=0, dual_clip=None,
                               beta=0.0, logprob_only=True, record=record)
        was_training = model.training
        model.eval()
        try:
            get_forward_backward_func()(forward_step_func=fs, data_iterator=iter(mbs), model=[model],
                                        num_microbatches=len(mbs), seq_length=max(m.tokens.numel() for m in mbs),
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
        t_step = time.perf_counter()
        self._gen_s = self._gen_tokens = 0.0
        r, adv, keep, w, info = self._collect(it // U)
        G = g.group_size
        stats = StepStats(iteration=it + U, beta=beta, per_task=task_metrics(r))
        stats.metrics.update(info)
        stats.metrics.update(self.reward_failures.step())  # custom_reward_failures, grader_timeouts, ...
        groups = [k for k in range(keep.numel()) if bool(keep[k])]
        parts = [groups[i::U] for i in range(U)] if len(groups) >= U else [[k] for k in groups]
        parts = [sorted(p) for p in parts if p]
        # Data-parallel replicas hold different prompts, so they may keep different numbers of groups; every
        # replica must still run the same number of optimizer steps (each is a DP all-reduce).
        n_kept, n_parts = _dp_agree(len(groups), len(parts))
        dev = device()
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
            for m, lp in zip(flat, self._forward_logprobs(self.ref_policy, flat)):
                m.ref_logp = lp
        sampled = [_rollout_logp(r, m) for m in flat]  # the sampler's log-probs, aligned with each batch's labels
        train_lp: list[torch.Tensor] = []  # the training forward's log-probs of the same tokens under pi_old
        if g.old_logprobs == "rollout":
            for m, lp in zip(flat, sampled):
                m.old_logp = lp
        elif len(batches) > 1:
            # Later parts are updated by an already-updated policy: they need pi_old from before the first
            # update. With a single update pi_old == pi_theta, and the policy's detached log-probs are exact.
            train_lp = self._forward_logprobs(self.policy, flat)
            for m, lp in zip(flat, train_lp):
                m.old_logp = lp
        fs = make_forward_step(temperature=g.temperature, clip_low=g.clip_low, clip_high=g.clip_high,
                               dual_clip=g.dual_clip, beta=beta)
        sums: dict[str, float] = defaultdict(float)
        self.last_results = []
        for i, mbs in enumerate(batches):
            # The first update's forward runs the policy before any update: its log-probs are pi_old.
            rec = [] if i == 0 and not train_lp else None
            step_fs = fs if rec is None else make_forward_step(
                temperature=g.temperature, clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip,
                beta=beta, record=rec)
            res = self.trainer.train_step(iter(mbs), step_fs, num_microbatches=len(mbs))
            if rec is not None:
                train_lp = rec
            self.last_results.append(res)
            for k, v in res.metrics.items():
                sums[k] += float(v) / len(batches)
            if res.grad_norm is not None:
                sums["grad_norm"] += float(res.grad_norm) / len(batches)
        stats.metrics.update(sums)
        # Updates that had no data (too few informative groups) still count, keeping the schedule aligned.
        self.trainer.advance_to(it + U)
        stats.metrics["updates"] = float(len(batches))
        stats.metrics["beta"] = beta
        stats.metrics.update(_logp_mismatch(train_lp, sampled[: len(train_lp)], flat[: len(train_lp)]))
        # Wall times differ a little between the ranks of a replica; report the first rank's everywhere.
        step_s, gen_s = _replica_values([time.perf_counter() - t_step, self._gen_s])
        self._step_times.append(step_s)
        stats.metrics.update({"step_time_s": step_s, "rollout_s": gen_s,
                              "rollout_tokens_per_s": self._gen_tokens / gen_s if gen_s > 0 else 0.0,
                              "rollout_share": gen_s / step_s if step_s > 0 else 0.0,
                              "eta_s": self._eta_s(it + U)})
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
                self.trainer.say(
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

    def _eta_s(self, iteration: int) -> float:
        """Seconds left: the mean wall time of this run's rollout steps x the rollout steps still to run."""
        U = max(1, int(self.cfg.grpo.updates_per_rollout))
        left = max(0, self.cfg.schedule.train_iters - iteration) / U
        return left * sum(self._step_times) / len(self._step_times)

    def _log(self, stats: StepStats) -> None:
        for task, d in stats.per_task.items():
            self.trainer.log_scalars(d, stats.iteration, f"rollout/{task}/")
        self.trainer.log_scalars(stats.metrics, stats.iteration, "grpo/")

    # ------------------------------------------------------------------ the step source of Trainer.fit
    data_loader = None  # prompts are a pure function of (seed, step): nothing to checkpoint but the counters

    def on_start(self, trainer: Trainer) -> None:
        if dist.get_rank() == 0:
            trainer.say("# grpo step N: rollout means over this step's prompts; loss = policy-gradient + beta x KL "
                        "per response token; kept = prompt groups whose rollouts' rewards differ (they carry the "
                        "gradient) / groups rolled out; no-signal = steps so far without any kept group")
        self.start_iteration = trainer.iteration
        if self.eval_prompts is not None:
            self.evaluate(trainer)

    def run_step(self, trainer: Trainer) -> list:
        s = self.step()
        self.history.append(s)
        if dist.get_rank() == 0:
            a = s.per_task.get("all", {})
            kept = s.metrics.get("groups", 0) - s.metrics.get("degenerate_groups", 0)
            loss = s.metrics.get("loss")
            m = s.metrics
            mism = (f" logp-mismatch {m['rollout_logp_mismatch_mean']:.1e}/{m['rollout_logp_mismatch_max']:.1e}"
                    if "rollout_logp_mismatch_mean" in m else "")
            trainer.say(f"grpo step {s.iteration}: reward {a.get('reward', float('nan')):.3f} "
                        f"acc {a.get('correct', float('nan')):.3f} len {a.get('response_len', 0):.1f} "
                        f"loss {'-' if loss is None else f'{loss:.4f}'} beta {s.beta:.2e} "
                        f"kept {kept:.0f}/{m.get('groups', 0):.0f} no-signal {self.no_signal_steps} | "
                        f"rollout {m['rollout_tokens_per_s']:.0f} tok/s ({m['rollout_share']:.0%} of "
                        f"{m['step_time_s']:.1f} s){mism} eta {_duration(m['eta_s'])}")
        return self.last_results

    def should_evaluate(self, before: int, after: int, end: int) -> bool:
        if self.eval_prompts is None:
            return False
        U = max(1, self.cfg.grpo.updates_per_rollout)
        return (after // U) % self.cfg.grpo.eval_interval == 0 or after >= self.cfg.schedule.train_iters

    def evaluate(self, trainer: Trainer) -> None:
        """One point of the held-out curve (greedy + ``eval_samples`` sampled answers), logged to
        TensorBoard as ``heldout/<task>/<metric>``."""
        g, it = self.cfg.grpo, trainer.iteration
        table = validation_table(self.policy, self.eval_prompts, self.decode, self.eval_reward_config,
                                 samples=g.eval_samples, eos_token_id=self.eos, pad_token_id=self.pad,
                                 max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                 seed=self.cfg.seed + 17)
        for task, d in table.items():
            trainer.log_scalars({k: v for k, v in d.items() if k != "n"}, it, f"heldout/{task}/")
        self.validation.append({"iteration": it, "table": table})
        if dist.get_rank() == 0:
            v = table.get("all", {})
            extra = "".join(f" {k} {x:.3f}" for k, x in v.items() if "@" in k and not k.startswith("reward"))
            trainer.say(f"held-out @ {it}: acc {v.get('correct', float('nan')):.3f} "
                        f"reward {v.get('reward', float('nan')):.3f}{extra}")

    def on_end(self, trainer: Trainer, summary) -> None:
        if dist.get_rank() == 0:
            updates = int(sum(h.metrics.get("updates", 0) for h in self.history))
            trainer.say(f"GRPO done: {len(self.history)} rollout steps (iteration {self.start_iteration} -> "
                        f"{trainer.iteration}), {updates} optimizer updates, {self.no_signal_steps} steps without "
                        f"an informative group; checkpoint: "
                        f"{trainer.last_checkpoint or 'none saved (checkpoint.save_dir unset)'}")


def _dp_agree(kept_groups: int, parts: int) -> tuple[int, int]:
    """(kept groups summed over data-parallel replicas, the most update parts any replica has)."""
    if not dist.is_initialized() or ps.get_data_parallel_world_size() == 1:
        return kept_groups, parts
    kept = torch.tensor([float(kept_groups)], device=device())
    most = torch.tensor([float(parts)], device=device())
    dist.all_reduce(kept, group=ps.get_data_parallel_group())
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(kept.item()), int(most.item())


def _rollout_logp(r: Rollouts, mb) -> Optional[torch.Tensor]:
    """The sampler's log-probs of ``mb``'s response tokens at their label positions (``[T]``, 0 elsewhere),
    laid out as :func:`~m2mega.train.grpo_update.pack_rollouts` lays out the labels; None without them."""
    if r.rollout_logprobs is None:
        return None
    out = torch.zeros(mb.tokens.numel(), dtype=torch.float32)
    cu = mb.cu_seqlens.tolist()
    for seg, i in enumerate(mb.sample_indices.tolist()):
        start = cu[seg] + r.prompt_of(i).prompt_tokens.numel() - 1  # the prompt's last position predicts token 0
        lp = r.rollout_logprobs[i]
        out[start : start + lp.numel()] = lp
    return out.to(mb.tokens.device)


def _logp_mismatch(train: list, sampled: list, mbs: list) -> dict[str, float]:
    """Mean and max |train - rollout| log-prob over response tokens (the training forward under pi_old vs
    the sampler's numbers for the same tokens), over this replica's micro-batches, then over data-parallel
    replicas; shared from the last pipeline stage (which holds ``train``). Empty without rollout log-probs."""
    if any(x is None for x in sampled):
        return {}
    dev = device()
    vals = torch.zeros(3, dtype=torch.float64, device=dev)  # sum |diff|, tokens, max |diff|
    for t, s, m in zip(train, sampled, mbs):
        d = (t.float().to(dev) - s.to(dev)).abs()[m.loss_mask.to(dev) > 0]
        if d.numel():
            vals[0] += d.double().sum()
            vals[1] += d.numel()
            vals[2] = torch.maximum(vals[2], d.max().double())
    if dist.is_initialized():
        if ps.get_data_parallel_world_size() > 1:
            g = ps.get_data_parallel_group()
            dist.all_reduce(vals[:2], group=g)
            top = vals[2:].clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=g)
            vals[2:] = top
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(vals, ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
    if vals[1] == 0:
        return {}
    return {"rollout_logp_mismatch_mean": float(vals[0] / vals[1]), "rollout_logp_mismatch_max": float(vals[2])}


def _replica_values(values: list[float]) -> list[float]:
    """``values`` of the first rank of this model replica (TP x PP group), on every rank of it."""
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return values
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.broadcast(t, dist.get_process_group_ranks(group)[0], group=group)
    return t.tolist()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _no_loss(mbs: list) -> list:
    """Micro-batches that run the model but carry no loss token (their gradient is exactly 0)."""
    for m in mbs:
        m.loss_mask = torch.zeros_like(m.loss_mask)
        m.advantages = torch.zeros_like(m.advantages)
    return mbs


def frozen_copy(model: torch.nn.Module, provider: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The KL reference policy (``ref_policy``): a fresh build of the same stage (``provider()``) holding ``model``'s weights,
    with gradients off. (A deepcopy would copy megatron's process-group handles, which cannot be copied.)"""
    ref = provider()
    ref.load_state_dict(unwrap_model(model).state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
