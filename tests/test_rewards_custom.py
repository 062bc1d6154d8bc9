"""A user's reward function (``custom_function: path.py:fn``, verl's convention) through the registry, the
GRPO config and the rollout scorer: called with the record's fields, failures counted and logged."""

from __future__ import annotations

import logging
import textwrap

import pytest

from m2mega.rewards import RewardConfig, compute_reward, compute_rewards
from m2mega.rewards.custom import custom_failures

USER_FILE = textwrap.dedent(
    """
    import time

    def score(data_source, solution_str, ground_truth, extra_info=None):
        hit = ground_truth in solution_str
        bonus = 0.5 if (extra_info or {}).get("difficulty", 0) > 0.5 else 0.0
        return float(hit) + bonus if data_source == "code" else float(hit)

    def as_dict(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": 0.25, "correct": True}

    def boom(data_source, solution_str, ground_truth, extra_info=None):
        raise RuntimeError("user bug")

    def slow(data_source, solution_str, ground_truth, extra_info=None):
        time.sleep(60)

    def stuck(data_source, solution_str, ground_truth, extra_info=None):
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)

    def not_a_number(data_source, solution_str, ground_truth, extra_info=None):
        return "high"

    def nan(data_source, solution_str, ground_truth, extra_info=None):
        return float("nan")

    def noisy(data_source, solution_str, ground_truth, extra_info=None):
        print("debug output on stdout must not break the worker protocol")
        return 1
    """
)


@pytest.fixture()
def user_file(tmp_path):
    p = tmp_path / "my_reward.py"
    p.write_text(USER_FILE)
    return p


def _cfg(spec: str, **extra) -> RewardConfig:
    return RewardConfig.from_dict({"default": {"custom_function": spec, "math_timeout_s": 1.0, **extra}})


def test_custom_function_scores_with_record_fields(user_file):
    cfg = _cfg(f"{user_file}:score")
    resp = "<think>t</think><answer>print(42)</answer>"
    r = compute_reward(resp, "print(42)", "code", "code", cfg, extra={"difficulty": 0.9, "id": "x1"})
    # any answer_type is allowed for custom tasks; accuracy = the function's value; format still applies
    assert r.accuracy == 1.5 and r.correct and r.format == 1.0 and r.total == pytest.approx(1.5 + 0.1)
    rs = compute_rewards([resp, "<answer>nope</answer>"], "print(42)", "general", "code", cfg,
                         extras=[{"difficulty": 0.1}, None])  # fmt: skip
    assert [x.accuracy for x in rs] == [1.0, 0.0] and [x.correct for x in rs] == [True, False]
    r = compute_reward(resp, "x", "t", "math", _cfg(f"{user_file}:as_dict"))
    assert (r.accuracy, r.correct) == (0.25, True)
    assert compute_reward(resp, "x", "t", "math", _cfg(f"{user_file}:noisy")).accuracy == 1.0


@pytest.mark.parametrize("fn, kind", [("boom", "exception"), ("slow", "timeout"), ("stuck", "timeout"),
                                      ("not_a_number", "bad_return"), ("nan", "bad_return")])  # fmt: skip
def test_custom_function_failures_are_counted_logged_not_fatal(user_file, fn, kind, caplog):
    cfg = _cfg(f"{user_file}:{fn}", math_timeout_s=0.5)
    before = custom_failures().get(kind, 0)
    with caplog.at_level(logging.WARNING, logger="m2mega.rewards.custom"):
        r = compute_reward("<think>t</think><answer>a</answer>", "a", "general", "text", cfg)
    assert (r.accuracy, r.correct) == (0.0, False) and r.format == 1.0
    assert custom_failures()[kind] == before + 1
    assert any(kind in rec.getMessage() and fn in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("spec, match", [
    ("{d}/missing.py:score", r"file .*missing\.py' does not exist"),
    ("{f}:no_such_fn", r"has no function 'no_such_fn'"),
    ("{f}", r"must be 'path/to/file\.py:function'"),
    ("{f}:1bad", r"must be 'path/to/file\.py:function'"),
])  # fmt: skip
def test_config_time_errors_are_one_line(user_file, spec, match):
    with pytest.raises(ValueError, match=match) as e:
        _cfg(spec.format(d=user_file.parent, f=user_file))
    assert "\n" not in str(e.value)


def test_grpo_config_custom_reward_function(user_file):
    from m2mega.train.config import ConfigError, apply_overrides, from_dict, validate

    base = {"model": {"family": "gpt"}, "data": {"source": "synthetic"}}
    cfg = from_dict(apply_overrides(base, [f"--grpo.custom_reward_function={user_file}:score"]))
    validate(cfg)
    rc = RewardConfig.from_dict(cfg.grpo.reward_config_dict())
    assert rc.for_task("spatial").custom_function == f"{user_file}:score"
    with pytest.raises(ConfigError, match="grpo reward settings: .*has no function 'nope'"):
        validate(from_dict(apply_overrides(base, [f"--grpo.custom_reward_function={user_file}:nope"])))


def test_rollout_scorer_passes_record_fields(user_file):
    import torch

    from m2mega.data.indexed import SampleInfo
    from m2mega.data.loader import RLPrompt
    from m2mega.rl.rollout import Rollouts
    from m2mega.rl.scoring import score_rollouts

    info = SampleInfo(index=0, id="r0", answer="42", task="code", answer_type="code", difficulty=0.9, quality=1.0,
                      is_rl=True, n_tokens=3, prompt_len=3, file="f.jsonl", line=1)  # fmt: skip
    prompt = RLPrompt(index=0, prompt_tokens=torch.zeros(3, dtype=torch.long), position_ids=torch.zeros(3, 3),
                      rope_delta=0, pixel_values=None, image_grid_thw=torch.zeros(0, 3), info=info)  # fmt: skip
    texts = {1: "<think>t</think><answer>42</answer>", 2: "<think>t</think><answer>7</answer>"}
    r = Rollouts(prompts=[prompt], group_size=2, response_tokens=[torch.tensor([1]), torch.tensor([2])],
                 finished=torch.ones(2, dtype=torch.bool))  # fmt: skip
    score_rollouts(r, lambda toks: texts[toks[0]], _cfg(f"{user_file}:score"))
    assert r.accuracy.tolist() == [1.5, 0.5]  # difficulty 0.9 from the record reached the function (+0.5)
    assert r.correct.tolist() == [True, False]
