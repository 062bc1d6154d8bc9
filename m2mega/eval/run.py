"""Evaluate a checkpoint on preprocessed held-out prompts:

    torchrun --nproc-per-node=N -m m2mega.eval.run --config grpo.yaml --eval-prefix data/eval \
        [--checkpoint DIR] [--eval-json out.json] [--max-new-tokens K] [--greedy/--sample]

The model (family, preset, TP/PP) and the reward switches (``grpo.eval_reward`` over the training reward)
come from the training config; the weights from ``--checkpoint`` (a checkpoint or a save root; default
``model.init_from``; none: the seeded random init, the "before training" baseline). Prints the per-task
table (accuracy, reward, format, response length, repetition) and optionally writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

__all__ = ["evaluate_checkpoint", "main"]


def evaluate_checkpoint(cfg, eval_prefix: str, checkpoint: Optional[str], *, max_new_tokens: Optional[int] = None,
                        greedy: bool = True, batch_size: int = 16, samples: Optional[list] = None) -> dict:
    """Collective over the runtime's ranks (call ``m2mega.runtime.init`` first)."""
    import torch

    from m2mega.rewards import RewardConfig
    from m2mega.rl.prompts import prefix_prompts, stop_token_ids
    from m2mega.rl.validation import evaluate_prompts
    from m2mega.train import vlm
    from m2mega.train.families import load_policy

    model = load_policy(cfg, checkpoint)
    tok = vlm.tokenizer_from_prefix(eval_prefix)
    with torch.no_grad():
        return evaluate_prompts(
            model, prefix_prompts(eval_prefix), lambda ids: tok.decode(ids, skip_special_tokens=True),
            RewardConfig.from_dict(cfg.grpo.eval_reward_config_dict()), eos_token_id=stop_token_ids(tok),
            pad_token_id=tok.pad_id, max_new_tokens=max_new_tokens or cfg.grpo.max_new_tokens,
            batch_size=batch_size, greedy=greedy, temperature=cfg.grpo.temperature, seed=cfg.seed, samples=samples)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2mega.eval.run", description=__doc__.split("\n")[0],
                                epilog="Any other --section.key=value overrides the YAML config.")
    p.add_argument("--config", required=True, help="training YAML (model, parallel and grpo reward switches)")
    from m2mega.train.config import add_print_config_flag

    add_print_config_flag(p)
    p.add_argument("--eval-prefix", required=True, help="preprocessed held-out prompts (RL rows)")
    p.add_argument("--checkpoint", help="checkpoint or save root (default: model.init_from; 'none': random init)")
    p.add_argument("--eval-json", help="write the per-task table here (rank 0)")
    p.add_argument("--samples-jsonl", help="write every prompt's response (text, token ids, reward) here (rank 0)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample at grpo.temperature instead of greedy decoding")
    args, overrides = p.parse_known_args(argv)

    import torch.distributed as dist

    import m2mega.runtime as rt
    from m2mega.eval.metrics import format_table
    from m2mega.runtime.cli import require_paths, require_prefixes
    from m2mega.train.checkpoint import check_model_config, resolve_checkpoint
    from m2mega.train.config import load_config

    if args.checkpoint not in (None, "none"):
        # The evaluated checkpoint is the model: its config.json gives the architecture when model.preset is unset.
        overrides = [*overrides, f"--model.init_from={args.checkpoint}"]
    cfg = load_config(args.config, overrides)
    ckpt = None if args.checkpoint == "none" else cfg.model.init_from
    # Inputs checked before process groups and the model: one error line, not a trace per rank.
    require_prefixes([("--eval-prefix", args.eval_prefix)])
    require_paths([("--checkpoint", ckpt)])
    if ckpt:
        check_model_config(resolve_checkpoint(ckpt), cfg)
    rt.init_from_config(cfg)
    try:
        samples: list = []
        table = evaluate_checkpoint(cfg, args.eval_prefix, ckpt, max_new_tokens=args.max_new_tokens,
                                    greedy=not args.sample, batch_size=args.batch_size, samples=samples)
        if dist.get_rank() == 0:
            print(f"# held-out evaluation of {ckpt or 'the random init'} on {args.eval_prefix}")
            print(format_table(table), flush=True)
            if args.eval_json:
                with open(args.eval_json, "w") as f:
                    json.dump(table, f, indent=1)
            if args.samples_jsonl:
                with open(args.samples_jsonl, "w", encoding="utf-8") as f:
                    for pid, task, text, reward, ids in samples:
                        f.write(json.dumps({"id": pid, "task": task, "response": text, "reward": reward,
                                            "response_ids": ids}) + "\n")
    finally:
        rt.shutdown()
    return 0


if __name__ == "__main__":
    from m2mega.runtime.cli import run_main

    sys.exit(run_main(main))
