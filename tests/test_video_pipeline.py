"""The video path as a user types it, on CPU, with the documented commands only:

``tools/make_synthetic_data.py --families count order`` (image rows beside H.264 ``order`` clips)
-> ``tools/preprocess_data.py`` -> SFT (``python -m m2mega.train.sft``, tiny preset, TP1)
-> ``tools/score_difficulty.py --checkpoint`` on the RL rows (video rows rolled out with the training data's
   video settings; a row whose clip is missing is kept unscored and reported, never dropped; the scored
   file written to another directory still names the clips)
-> GRPO on the image + video prompts (``python -m m2mega.train.grpo``, one step, one optimizer update)
-> ``python -m m2mega.eval.run`` on held-out image + video rows.

Sizes are too small to learn anything; this guards the wiring of every stage for video rows (the model's
video numerics are checked against HF in test_video_parity.py, decoding and storage in test_video.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~60 s of CPU, one process at a time: five model processes (start-up ~6 s each)

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8

# verl's custom-reward signature: a deterministic score of the text that differs between sampled answers, so
# that a barely trained model's groups carry a gradient (the task rewards are all 0 for it).
REWARD = '''
def score(data_source, solution_str, ground_truth, extra_info):
    return (sum(map(ord, solution_str)) % 5) / 4
'''


def _run(args: list[str], timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "PYTHONWARNINGS": "ignore"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _preprocess(w: Path, src: Path, prefix: str, *extra: str) -> str:
    return _run(["tools/preprocess_data.py", "--input", str(src), "--output-prefix", str(w / "prep" / prefix),
                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(w / "tok"),
                 "--seq-length", "1024", "--no-progress", *extra])


def _yaml(path: Path, cfg: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """Synthetic image + video data, a tokenizer trained on its text, preprocessed splits, an SFT checkpoint."""
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer

    w = tmp_path_factory.mktemp("video_path")
    _run(["tools/make_synthetic_data.py", "--out", str(w / "data"), "--sft", "8", "--rl", "6", "--eval", "4",
          "--seed", "3", "--families", "count", "order", "--reasoning", "brief"])
    rows = _jsonl(w / "data/sft.jsonl")
    texts = [p.get("text", "") if isinstance(p, dict) else p for r in rows for m in r["messages"]
             for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])]
    build_tiny_qwen_tokenizer(str(w / "tok"), vocab_size=400, texts=texts)
    for split in ("sft", "eval"):
        log = _preprocess(w, w / f"data/{split}.jsonl", split)
        assert "rejected 0 " in log and re.search(r"videos [1-9]", log), log  # the clips are in the dataset
    _yaml(w / "sft.yaml", {
        "mode": "sft", "seed": 7, "model": {"family": "qwen25vl", "preset": "tiny"}, "parallel": {"tp": 1},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0},
        "schedule": {"train_iters": 2, "micro_batch_size": 1, "global_batch_size": 2, "seq_length": 1024,
                     "lr_warmup_iters": 1},
        "checkpoint": {"save_dir": str(w / "ckpt_sft"), "keep_last": 1},
        "logging": {"tensorboard_dir": None, "progress": "plain"},
        "data": {"train_prefix": str(w / "prep/sft")},
        # difficulty scoring samples with the checkpoint's own GRPO settings
        "grpo": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0}})
    out = _run(["-m", "m2mega.train.sft", "--config", str(w / "sft.yaml")])
    assert "done: 2 iterations" in out, out[-3000:]
    return w


def test_score_difficulty_from_a_checkpoint_on_video_rows(sft_run: Path):
    w = sft_run
    rl = _jsonl(w / "data/rl.jsonl")
    video_ids = {r["id"] for r in rl if r["messages"][0]["content"][0]["type"] == "video"}
    assert len(video_ids) == 3
    # the user's own bad row: its clip is missing
    bad = json.loads(json.dumps(next(r for r in rl if r["id"] in video_ids)))
    bad["id"] = "no-clip"
    bad["messages"][0]["content"][0]["video"] = "videos/not-there.mp4"
    (w / "data/rl_all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rl, bad]))
    scored = w / "scored/rl.jsonl"  # another directory than the input's: the clips' paths must follow
    scored.parent.mkdir()
    log = _run(["tools/score_difficulty.py", "--input", str(w / "data/rl_all.jsonl"), "--checkpoint",
                str(w / "ckpt_sft"), "--num-rollouts", "2", "--keep-trivial", "--output", str(scored),
                "--report", str(w / "report.json"), "--no-progress"])
    out = _jsonl(scored)
    assert [r["id"] for r in out] == [r["id"] for r in rl] + ["no-clip"], log[-3000:]  # nothing dropped
    for r in out[:-1]:
        assert 0.0 <= r["difficulty"] <= 1.0 and r["difficulty_rollouts"] == 2, r
    assert out[-1] == {**bad, "messages": out[-1]["messages"]}  # kept as it came (paths rebased), unscored
    counts = json.loads((w / "report.json").read_text())["counts"]
    assert counts["scored"] == 6 and counts["missing_rollouts"] == 1 and counts["rows"] == 7, counts
    rollouts = _jsonl(Path(str(scored) + ".rollouts.jsonl"))
    assert {r["id"] for r in rollouts} == {r["id"] for r in rl} and all(len(r["responses"]) == 2 for r in rollouts)
    (reject,) = _jsonl(Path(str(scored) + ".rollouts.jsonl.rejects.jsonl"))
    assert reject["id"] == "no-clip" and reject["reason"].startswith("video_missing"), reject
    # the scored file, in its own directory, preprocesses: only the missing clip is rejected
    log = _preprocess(w, scored, "rl_scored", "--order", "curriculum", "--max-reject-fraction", "0.2")
    assert "accepted 6" in log and "rejected 1 " in log and "videos 3" in log, log


def test_grpo_and_evaluation_on_video_prompts(sft_run: Path):
    w = sft_run
    log = _preprocess(w, w / "data/rl.jsonl", "rl", "--order", "curriculum")
    assert "videos 3" in log, log
    (w / "reward.py").write_text(REWARD)
    # one rollout step over all six RL prompts (three of them clips), one optimizer update
    _yaml(w / "grpo.yaml", {
        "mode": "grpo", "seed": 7, "model": {"family": "qwen25vl", "init_from": str(w / "ckpt_sft")},
        "parallel": {"tp": 1}, "optimizer": {"lr": 1e-3, "min_lr": 1e-3},
        "schedule": {"train_iters": 1, "seq_length": 1024, "lr_decay_style": "constant"},
        "checkpoint": {"save_dir": str(w / "ckpt_grpo"), "keep_last": 1},
        "logging": {"tensorboard_dir": None, "progress": "plain"},
        "data": {"train_prefix": str(w / "prep/rl")},
        "grpo": {"prompts_per_step": 6, "group_size": 2, "max_new_tokens": NEW_TOKENS, "temperature": 1.0,
                 "custom_reward_function": f"{w / 'reward.py'}:score"}})
    out = _run(["-m", "m2mega.train.grpo", "--config", str(w / "grpo.yaml"), "--history-json", str(w / "hist.json")])
    assert re.search(r"GRPO done: .* 1 optimizer updates", out), out[-3000:]
    (step,) = json.loads((w / "hist.json").read_text())
    assert "spatial" in step["per_task"], step  # the `order` clips are the spatial prompts of this data
    # held-out evaluation: every image and video row answered and scored
    _run(["-m", "m2mega.eval.run", "--config", str(w / "grpo.yaml"), "--eval-prefix", str(w / "prep/eval"),
          "--checkpoint", str(w / "ckpt_grpo"), "--eval-json", str(w / "eval.json"), "--samples-jsonl",
          str(w / "samples.jsonl"), "--max-new-tokens", str(NEW_TOKENS)])
    table = json.loads((w / "eval.json").read_text())
    assert table["all"]["n"] == 4 and table["spatial"]["n"] == 2, table
    samples = _jsonl(w / "samples.jsonl")
    video_ids = {r["id"] for r in _jsonl(w / "data/eval.jsonl") if r["family"] == "order"}
    assert len(video_ids) == 2 and video_ids <= {s["id"] for s in samples}
    assert all(len(s["response_ids"]) >= 1 for s in samples), samples
