"""One small GRPO step, timed by phase: rollout (KV-cache generation + reward scoring), log-prob (the
frozen reference's / pi_old's forward passes) and update (megatron forward-backward with the fused
kernels + optimizer step), on the tiny Qwen2.5-VL and synthetic RL prompts.

    python benchmarks/bench_grpo_step.py --out benchmarks/results/grpo_step_<device>.json   # GPU when present
    python benchmarks/bench_grpo_step.py --device cpu                                        # CPU smoke run

It runs ``m2mega.train.grpo.run_grpo`` unchanged on a single rank and wraps three of its methods with
timers (``GRPORunner._collect``, ``GRPORunner._forward_logprobs``, ``Trainer.train_step``), two rollout
steps so the second shows the warm cost. Rewards are scripted from the sampled ids (as in
tests/test_grpo_runner.py) so groups carry a signal and the update really runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # appended: the repo's kernels/ must not shadow the PyPI package 'kernels'


def _decode(ids: list[int]) -> str:
    if ids and ids[-1] % 2:
        return f"<think>sum</think><answer>{sum(ids) % 5}</answer>"
    return f"answer {sum(ids) % 5}"


def _timed(owner, name: str, phase: str, times: dict) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[phase].append(time.perf_counter() - t0)
        return out

    setattr(owner, name, wrapper)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu hides CUDA")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.testing.sample_files import write_sample_jsonl
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer
    from m2mega.runtime.multiproc import free_port
    from m2mega.train import grpo, loop
    from m2mega.train.config import from_dict

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    times: dict[str, list[float]] = defaultdict(list)
    _timed(grpo.GRPORunner, "_collect", "rollout", times)
    _timed(grpo.GRPORunner, "_forward_logprobs", "logprob", times)
    _timed(loop.Trainer, "train_step", "update", times)
    with tempfile.TemporaryDirectory() as d:
        write_sample_jsonl(f"{d}/rows.jsonl", 4 * args.prompts, seed=3, rl_fraction=1.0, image_sides=(28, 84))
        tok = build_tiny_qwen_tokenizer(f"{d}/tok", vocab_size=300)
        preprocess([f"{d}/rows.jsonl"], f"{d}/rl", PreprocessConfig(
            tokenizer_model=tok, order="curriculum", seq_length=512, progress=False, system_prompt=None))
        updates = 2
        cfg = from_dict({
            "mode": "grpo", "seed": 5,
            "model": {"family": "qwen25vl", "preset": "tiny"},
            "parallel": {"tp": 1, "pp": 1},
            "optimizer": {"lr": 1e-4, "min_lr": 1e-4},
            "schedule": {"train_iters": 2 * updates, "seq_length": 256, "lr_decay_style": "constant"},
            "checkpoint": {"save_dir": None},
            "logging": {"progress": "none"},
            "data": {"source": "packed", "train_prefix": f"{d}/rl", "order": "curriculum"},
            "grpo": {"prompts_per_step": args.prompts, "group_size": args.group_size,
                     "max_new_tokens": args.new_tokens, "kl_schedule": "constant", "beta": 0.04,
                     "updates_per_rollout": updates},
        })
        t0 = time.perf_counter()
        out = grpo.run_grpo(cfg, decode=_decode)
        total = time.perf_counter() - t0
    steps = len(out["history"])
    report = {
        "benchmark": "grpo_step",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": {"preset": "tiny", "prompts": args.prompts, "group_size": args.group_size,
                   "max_new_tokens": args.new_tokens, "updates_per_rollout": updates, "rollout_steps": steps},
        "seconds_total_incl_setup": round(total, 3),
        # per rollout step: [first (cold), second (warm)]
        "phase_seconds": {k: [round(sum(v[i * len(v) // steps:(i + 1) * len(v) // steps]), 4) for i in range(steps)]
                          for k, v in times.items()},
        "metrics_last_step": {k: float(v) for k, v in out["history"][-1].metrics.items()},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
