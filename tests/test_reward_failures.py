"""Reward failures are counted per step and logged, never fatal: a custom reward function that raises on
some samples and a math comparison cut off by its time limit score 0 and show up in
``RewardFailureMeter.step()``, which the GRPO runner puts into each step's metrics."""

from __future__ import annotations

import random
import textwrap

import pytest
import torch
from test_grpo_direction import G, _cfg, _prompts, rl_prefix  # noqa: F401 (rl_prefix is a fixture)

from m2mega.rewards import RewardConfig, RewardFailureMeter, compute_rewards, math_equal
from m2mega.runtime.multiproc import run_ranks

# Raises on responses that mention "boom"; scores "good" 1 and anything else 0.
USER_FILE = textwrap.dedent(
    """
    def score(data_source, solution_str, ground_truth, extra_info=None):
        if "boom" in solution_str:
            raise RuntimeError("user bug on " + solution_str)
        return 1.0 if "good" in solution_str else 0.0
    """
)


@pytest.fixture()
def user_file(tmp_path):
    p = tmp_path / "flaky_reward.py"
    p.write_text(USER_FILE)
    return p


def test_meter_counts_custom_failures_and_grader_timeouts_per_step(user_file):
    cfg = RewardConfig.from_dict({"default": {"custom_function": f"{user_file}:score"}})
    meter = RewardFailureMeter()
    rs = compute_rewards(["<answer>boom</answer>", "<answer>good</answer>", "<answer>boom 2</answer>"], "x",
                         "general", "text", cfg)  # fmt: skip
    assert [r.accuracy for r in rs] == [0.0, 1.0, 0.0]
    # comparing two sums takes math-verify 100-300 ms: with a 5 ms limit it times out, scored "not equal"
    # (a constant of this run's own keeps the grader's verdict cache from answering at once)
    c = random.randrange(10**6, 10**7)
    assert math_equal(f"F_n = \\sum_{{k=0}}^{{n-1}} F_k F_{{n-k-1}} + {c}",
                      f"F_n = \\sum_{{k=0}}^{{n-1}} F_{{n-k-1}} F_k + {c}", timeout_s=0.005) is False
    assert meter.step() == {"custom_reward_failures": 2.0, "grader_timeouts": 1.0, "grader_errors": 0.0}
    assert meter.step() == {"custom_reward_failures": 0.0, "grader_timeouts": 0.0, "grader_errors": 0.0}


def _scored_decode(ids: list[int]) -> str:
    # _fixed_rollouts-style tokens: 10-89 "good" rollouts, 100-179 "bad"; a 5-token response raises.
    word = "boom" if len(ids) == 5 else ("good" if ids[0] < 90 else "bad")
    return f"<think>t</think><answer>{word}</answer>"


def _custom_failure_body(prefix: str, spec: str):
    import m2mega.runtime as rt
    import m2mega.train.grpo_runner as grpo
    from m2mega.rl.rollout import Rollouts
    from m2mega.train.families import get_model_family
    from m2mega.train.loop import Trainer

    rt.init(1, 1)
    cfg = _cfg(prefix, 1, False, 0.0)
    cfg.grpo.custom_reward_function = spec
    g = torch.Generator().manual_seed(3)
    prompts = _prompts()

    def rollouts(model, prompts, **kw):  # sampling replaced by fixed responses; scoring is the runner's own
        good = [k % 2 == 0 for k in range(len(prompts) * G)]
        toks = [torch.randint(10, 90, (3 + k % 4,), generator=g) if ok else torch.randint(100, 180, (3 + k % 4,),
                generator=g) for k, ok in enumerate(good)]  # fmt: skip
        return Rollouts(prompts=list(prompts), group_size=G, response_tokens=toks,
                        finished=torch.ones(len(toks), dtype=torch.bool))

    grpo.generate_rollouts = rollouts
    trainer = Trainer(cfg, get_model_family("qwen25vl").provider)
    runner = grpo.GRPORunner(cfg, trainer, lambda step: prompts, _scored_decode, eos_token_id=0, pad_token_id=0)
    return [dict(runner.step().metrics) for _ in range(2)]


@pytest.mark.multirank
def test_grpo_step_metrics_count_custom_reward_failures_and_training_continues(rl_prefix, user_file):
    steps = run_ranks(_custom_failure_body, 1, args=(rl_prefix, f"{user_file}:score"), timeout_s=600)[0]
    for m in steps:  # 2 of every 8 responses have 5 tokens and raise: counted each step, and the step updates
        assert m["custom_reward_failures"] == 2.0 and m["grader_timeouts"] == 0.0, m
        assert m["updates"] == 1 and m.get("loss") is not None, m
