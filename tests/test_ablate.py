"""tools/ablate.py: every arm changes exactly its config switch against the same baseline GRPO config,
the stages run once per seed (data + SFT) and once per arm (GRPO), and the table reports mean +- 95%
interval per arm plus the paired difference to the baseline. The demo's stages themselves are exercised
end to end by tests/test_demo.py; here they are replaced by recorders so the wiring is checked in seconds."""

from __future__ import annotations

import copy
import json
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ablate():
    spec = importlib.util.spec_from_file_location("m2mega_ablate_test", ROOT / "tools/ablate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _base_cfg(tmp: Path) -> dict:
    return {"mode": "grpo", "schedule": {"train_iters": 40}, "data": {"order": "curriculum"},
            "checkpoint": {"save_dir": str(tmp / "ckpt")}, "logging": {"tensorboard_dir": str(tmp / "tb")},
            "grpo": {"kl_schedule": "cosine", "beta_max": 0.01, "beta_min": 0.001, "ednm_lambda": 2.0,
                     "numeric_reward": "ednm", "advantage_weighting": "dynamic", "repetition_penalty": False,
                     "eval_interval": 5, "eval_samples": 4}}


def test_each_arm_changes_only_its_switch(tmp_path):
    ab = _ablate()
    base = _base_cfg(tmp_path)
    ref = ab.arm_config(base, "baseline", tmp_path)
    assert base == _base_cfg(tmp_path), "arm_config must not modify the baseline"
    for arm in ab.ARMS:
        cfg = ab.arm_config(base, arm, tmp_path)
        assert cfg["checkpoint"]["save_dir"] == str(tmp_path / f"ckpt_{arm}")
        assert cfg["grpo"]["eval_interval"] == 40 and cfg["grpo"]["eval_samples"] == 0  # start and end, greedy
        diff = {(sec, k) for sec in ("data", "grpo") for k in set(cfg[sec]) | set(ref[sec])
                if cfg[sec].get(k) != ref[sec].get(k)}
        want = {(sec, k) for sec, kv in ab.ARMS[arm].items() for k in kv}
        if arm == "constant_kl":
            want.add(("grpo", "beta"))
            assert cfg["grpo"]["beta"] == pytest.approx(0.0055)  # the cosine's mean: the same KL budget
        assert diff == want, (arm, diff)
        # every arm's held-out reward is scored with the baseline's reward switches
        assert cfg["grpo"]["eval_reward"] == {"ednm_lambda": 2.0, "numeric_reward": "ednm", "repetition_penalty": False}


def test_one_sft_per_seed_one_grpo_per_arm_and_the_table(tmp_path, monkeypatch, capsys):
    ab = _ablate()
    demo = ab._demo()
    calls = {"prepare": [], "grpo": []}

    def prepare(out, seed, S, evaluate_init=True):
        calls["prepare"].append((seed, evaluate_init))
        return None, {}, _base_cfg(out)

    def grpo_stage(out, S, cfg, tag="grpo"):
        calls["grpo"].append((out.name, tag, copy.deepcopy(cfg)))
        seed = int(out.name.split("_")[1])
        bonus = 0.1 if tag == "grpo_shuffled" else 0.0  # a clear effect on one arm, seed noise on all
        acc = 0.5 + bonus + 0.01 * (seed % 3)
        table = {"general": {"correct": acc, "reward": acc + 0.1}, "all": {"correct": acc, "reward": acc + 0.1,
                                                                           "repetition": 0.0}}
        return [], [{"iteration": 0, "table": table}, {"iteration": 40, "table": table}]

    monkeypatch.setattr(demo, "prepare", prepare)
    monkeypatch.setattr(demo, "grpo_stage", grpo_stage)
    monkeypatch.setattr(ab, "_demo", lambda: demo)
    monkeypatch.setattr(ab, "plot", lambda results, path: path.write_bytes(b"png"))
    assert ab.main(["--out", str(tmp_path / "abl"), "--seeds", "3", "--arms", "baseline,shuffled,static_weights"]) == 0
    assert calls["prepare"] == [(1234, False), (1235, False), (1236, False)]
    assert [(o, t) for o, t, _ in calls["grpo"]][:3] == [("seed_1234", "grpo_baseline"), ("seed_1234", "grpo_shuffled"),
                                                          ("seed_1234", "grpo_static_weights")]
    assert len(calls["grpo"]) == 9
    text = (tmp_path / "abl/ablations.md").read_text()
    assert "| shuffled | +0.100 +- 0.000 | +0.100 +- 0.000 | no |" in text
    assert "| static_weights | +0.000 +- 0.000 | +0.000 +- 0.000 | yes |" in text
    assert "| baseline | 3 | 0.510 +- 0.025 |" in text  # seeds 1234..1236: 0.51, 0.52, 0.50
    assert (tmp_path / "abl/ablations.png").exists()


def test_unknown_arm_is_a_usage_error(tmp_path, capsys):
    ab = _ablate()
    with pytest.raises(SystemExit) as e:
        ab.main(["--out", str(tmp_path), "--arms", "baseline,nope"])
    assert e.value.code == 2 and "unknown arm(s) ['nope']" in capsys.readouterr().err


def test_ednm_arms_without_spatial_numbers_are_flagged(tmp_path):
    """EDNM scores spatial number answers only: on data without them its arms are the baseline by
    construction, and the table says so instead of reporting a 'within noise' non-result."""
    ab = _ablate()
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"task": "general", "answer_type": "number"}) + "\n")
    (note,) = ab._noop_notes(path, ["baseline", "ednm_lambda1", "binary_numeric"])
    assert "ednm_lambda1, binary_numeric" in note and "by construction" in note
    assert ab._noop_notes(path, ["baseline", "shuffled"]) == []
    path.write_text(json.dumps({"task": "spatial", "answer_type": "number"}) + "\n")
    assert ab._noop_notes(path, ["ednm_lambda5"]) == []


def test_unknown_family_is_a_usage_error(tmp_path, capsys):
    ab = _ablate()
    with pytest.raises(SystemExit) as e:
        ab.main(["--out", str(tmp_path), "--families", "hue", "nope"])
    assert e.value.code == 2 and "--families: unknown ['nope']" in capsys.readouterr().err


def test_reuse_skips_prepared_seeds(tmp_path, monkeypatch):
    """--reuse: a seed directory with grpo.yaml and an SFT checkpoint (what `make demo SEEDS=3` leaves) is
    not prepared again and its grpo.yaml is the baseline; other seeds are prepared; a seed mismatch fails."""
    import yaml

    ab = _ablate()
    demo = ab._demo()
    out = tmp_path / "abl"
    ready = out / "seed_1234"
    (ready / "ckpt_sft").mkdir(parents=True)
    (ready / "ckpt_sft/latest").write_text("400")
    (ready / "grpo.yaml").write_text(yaml.safe_dump({**_base_cfg(ready), "seed": 1234}))
    prepared, baselines = [], []

    def prepare(o, seed, S, evaluate_init=True):
        prepared.append(seed)
        return None, {}, {**_base_cfg(o), "seed": seed}

    def grpo_stage(o, S, cfg, tag="grpo"):
        baselines.append((cfg["seed"], cfg["checkpoint"]["save_dir"]))
        table = {"all": {"correct": 0.5, "reward": 0.6, "repetition": 0.0}}
        return [], [{"iteration": 40, "table": table}]

    monkeypatch.setattr(demo, "prepare", prepare)
    monkeypatch.setattr(demo, "grpo_stage", grpo_stage)
    monkeypatch.setattr(ab, "_demo", lambda: demo)
    monkeypatch.setattr(ab, "plot", lambda results, path: path.write_bytes(b"png"))
    assert ab.main(["--out", str(out), "--seeds", "2", "--arms", "baseline", "--reuse"]) == 0
    assert prepared == [1235] and baselines == [(1234, str(ready / "ckpt_baseline")),
                                                (1235, str(out / "seed_1235/ckpt_baseline"))]
    (ready / "grpo.yaml").write_text(yaml.safe_dump({**_base_cfg(ready), "seed": 7}))
    with pytest.raises(SystemExit, match="is for seed 7, not 1234"):
        ab.main(["--out", str(out), "--seeds", "1", "--arms", "baseline", "--reuse"])


def test_resume_keeps_results_scored_with_this_runs_reward(tmp_path, monkeypatch):
    """--resume reruns only the (arm, seed) pairs missing from results.json or scored with another reward: a
    pre-eval_reward result (no ``_scored_with``) of an arm that changes the reward is rerun, one of an arm
    that does not is kept; the table counts both, and the text says how many were kept."""
    import yaml

    ab = _ablate()
    demo = ab._demo()
    out = tmp_path / "abl"
    for seed in (1234, 1235):
        d = out / f"seed_{seed}"
        (d / "ckpt_sft").mkdir(parents=True)
        (d / "ckpt_sft/latest").write_text("400")
        (d / "grpo.yaml").write_text(yaml.safe_dump({**_base_cfg(d), "seed": seed}))
        (d / "data").mkdir()
        (d / "data/eval.jsonl").write_text(json.dumps({"task": "spatial", "answer_type": "number"}) + "\n")
    old = lambda seed, acc: {"all": {"correct": acc, "reward": acc, "repetition": 0.0}, "_seed": seed}  # noqa: E731
    (out / "results.json").write_text(json.dumps({
        "baseline": [old(1234, 0.5), old(1235, 0.5)], "shuffled": [old(1234, 0.4)],
        "ednm_lambda5": [old(1234, 0.1), old(1235, 0.1)]}))
    ran = []

    def grpo_stage(o, S, cfg, tag="grpo"):
        ran.append((cfg["seed"], tag))
        return [], [{"iteration": 40, "table": {"all": {"correct": 0.6, "reward": 0.7, "repetition": 0.0}}}]

    monkeypatch.setattr(demo, "prepare", lambda *a, **k: pytest.fail("prepared seeds must be reused"))
    monkeypatch.setattr(demo, "grpo_stage", grpo_stage)
    monkeypatch.setattr(ab, "_demo", lambda: demo)
    monkeypatch.setattr(ab, "plot", lambda results, path: path.write_bytes(b"png"))
    assert ab.main(["--out", str(out), "--seeds", "2", "--arms", "baseline,shuffled,ednm_lambda5", "--resume"]) == 0
    assert ran == [(1234, "grpo_ednm_lambda5"), (1235, "grpo_shuffled"), (1235, "grpo_ednm_lambda5")]
    res = json.loads((out / "results.json").read_text())
    assert [r["all"]["correct"] for r in res["shuffled"]] == [0.4, 0.6] and res["shuffled"][1]["_scored_with"]
    assert [r["all"]["correct"] for r in res["ednm_lambda5"]] == [0.6, 0.6]
    text = (out / "ablations.md").read_text()
    assert "3 (arm, seed) result(s) kept" in text and "| ednm_lambda5 | 2 | 0.600 +- 0.000 |" in text
    # a second --resume has nothing left to run
    ran.clear()
    assert ab.main(["--out", str(out), "--seeds", "2", "--arms", "baseline,shuffled,ednm_lambda5", "--resume"]) == 0
    assert ran == []


def test_plot_draws_seeds_and_paired_differences(tmp_path):
    pytest.importorskip("matplotlib")
    ab = _ablate()
    row = lambda seed, acc: {"all": {"correct": acc, "reward": acc + 0.1}, "_seed": seed}  # noqa: E731
    results = {"baseline": [row(1, 0.5), row(2, 0.7)], "shuffled": [row(1, 0.55), row(2, 0.6)],
                "ednm_lambda5": [row(2, 0.7)]}  # a missing seed is skipped, not an error
    ab.plot(results, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
