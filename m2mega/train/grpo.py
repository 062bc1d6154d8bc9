"""Multi-task GRPO with verifiable rewards: ``python -m m2mega.train.grpo --config grpo.yaml [--k=v ...]``.

One step (every rank of a replica does the same; DP replicas take different prompts):

1. prompts of this step from the RL set (``PromptDataset``: curriculum order or shuffled, a config switch);
2. ``group_size`` rollouts per prompt with the KV-cache generator (temperature / top-p / max new tokens);
3. rewards per rollout (``m2mega.rewards``: answer extraction, choice / numeric / math match, EDNM for
   spatial numbers, format, optional repetition penalty), per task;
4. group-relative advantages ``(r - mean) / (std + eps)``; zero-variance groups dropped or kept; dynamic
   sampling draws extra prompts while too few informative groups are left; Eq. 6 weights
   ``w = sigma * acc * (1 - acc)`` per group (or 1: static);
5. ref_policy log-probs (the frozen KL reference) when beta > 0 (KL coefficient from Eq. 7's cosine
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
import json
import os
import sys
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

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

import m2mega.runtime as rt  # noqa: E402
from m2mega.data.loader import PromptDataset  # noqa: E402
from m2mega.rl.prompts import prefix_prompts, stop_token_ids  # noqa: E402
from m2mega.rl.validation import evaluate_prompts, format_table  # noqa: E402
from m2mega.runtime.cli import UsageError  # noqa: E402

from . import vlm  # noqa: E402
from .config import TrainConfig, load_config, to_yaml  # noqa: E402
from .families import get_model_family  # noqa: E402
from .grpo_runner import GRPORunner, StepStats, frozen_copy  # noqa: E402
from .loop import Trainer, describe_checkpoint  # noqa: E402
from .preflight import preflight  # noqa: E402

__all__ = ["GRPORunner", "StepStats", "run_grpo", "main"]


def _prompt_order(order: str) -> str:
    # the preprocessed files are already in curriculum order: read them sequentially
    return {"curriculum": "sequential"}.get(order, order)


def run_grpo(cfg: TrainConfig, *, eval_prefix: Optional[str] = None,
             decode: Optional[Callable[[list[int]], str]] = None) -> dict:
    """Initialise the runtime, build policy + ref_policy + data, run ``schedule.train_iters`` GRPO steps.

    ``decode`` replaces the dataset tokenizer's detokeniser (tests use it to script rewards).
    Returns ``{"history": [StepStats...], "eval": {...} or None, "validation": [{"iteration", "table"}...]}``
    on every rank (``validation``: the held-out curve of ``grpo.eval_interval``, empty when off)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.tp * cfg.parallel.pp > world:
        raise ValueError(f"TP{cfg.parallel.tp} x PP{cfg.parallel.pp} needs at least that many ranks, got {world}")
    rt.init_from_config(cfg)
    if not cfg.data.train_prefix:
        raise ValueError("data.train_prefix must name the preprocessed RL prompts (tools/preprocess_data.py)")
    tok = vlm.tokenizer_from_prefix(cfg.data.train_prefix, cfg.data.tokenizer)
    prompts = PromptDataset(cfg.data.train_prefix, cfg.grpo.prompts_per_step, dp_rank=ps.get_data_parallel_rank(),
                            dp_size=ps.get_data_parallel_world_size(), order=_prompt_order(cfg.data.order),
                            seed=cfg.data.seed, num_buckets=cfg.data.num_buckets)
    from m2mega.rewards.sandbox import warm_up as warm_up_graders

    warm_up_graders(wait=False)  # the reward grader workers start (~1 s) while the model builds
    fam = get_model_family(cfg.model.family)
    trainer = Trainer(cfg, fam.provider, flops_per_token=fam.flops_per_token)
    if dist.get_rank() == 0:
        print("# m2mega GRPO\n# config\n" + to_yaml(cfg), flush=True)
    g = cfg.grpo
    # The KL reference is the policy we start from (model.init_from), copied before any resume.
    ref = frozen_copy(trainer.model[0], lambda: fam.provider(cfg)) if g.uses_kl() else None
    if dist.get_rank() == 0 and cfg.model.init_from and ref is not None:
        trainer.say(f"KL reference policy: {describe_checkpoint(cfg.model.init_from)}")
    decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))
    runner = GRPORunner(cfg, trainer, prompts.prompts, decode, eos_token_id=stop_token_ids(tok),
                        pad_token_id=tok.pad_id, ref_policy=ref,
                        eval_prompts=prefix_prompts(g.eval_prefix) if g.eval_interval else None)
    try:
        trainer.fit(runner)
        result = {"history": runner.history, "eval": None, "validation": runner.validation,
                  "checkpoint": trainer.last_checkpoint}
        if eval_prefix:
            result["eval"] = evaluate_prompts(
                runner.policy, prefix_prompts(eval_prefix), runner.decode, runner.eval_reward_config,
                eos_token_id=runner.eos, pad_token_id=runner.pad, max_new_tokens=g.max_new_tokens)
        return result
    finally:
        trainer.close()


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.mode != "grpo":
        raise UsageError(f"mode is {cfg.mode!r}; this entry point runs GRPO (set mode: grpo)")
    preflight(cfg, prefixes=[("--eval-prefix", args.eval_prefix)])  # before process groups and the model
    try:
        out = run_grpo(cfg, eval_prefix=args.eval_prefix)
        if dist.get_rank() == 0:
            if out["eval"] is not None:
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
