"""`python -m m2mega.eval.bench` end to end: a tiny random Qwen2.5-VL (seeded init, `--checkpoint none`),
an offline tokenizer, CV-Bench's release layout with synthetic images, two data-parallel ranks under
torchrun (each generates half of the samples, rank 0 gathers, scores and writes the JSONL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from m2mega.runtime.multiproc import free_port

from test_bench_scoring import materialize

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast():
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "m2mega.eval.bench", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0 and "--benchmark" in p.stdout and "--frames-dir" in p.stdout
    assert time.perf_counter() - t0 < 5.0  # ~0.6 s measured; generous for a loaded CI machine


def _model(tmp: Path) -> Path:
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer

    tok = build_tiny_qwen_tokenizer(str(tmp / "tok"), vocab_size=400)
    row = {"id": "r0", "messages": [{"role": "user", "content": "How many? (A) 1 (B) 2"}], "answer": "A",
           "task": "general", "answer_type": "choice"}
    (tmp / "train.jsonl").write_text(json.dumps(row) + "\n")
    preprocess([str(tmp / "train.jsonl")], str(tmp / "prep/train"),
               PreprocessConfig(tokenizer_model=tok, seq_length=1024, min_pixels=28 * 28, max_pixels=56 * 56,
                                progress=False))
    cfg = {"seed": 7, "mode": "grpo", "model": {"family": "qwen25vl", "preset": "tiny"},
           "parallel": {"tp": 1, "pp": 1}, "schedule": {"seq_length": 1024},
           "data": {"source": "packed", "train_prefix": str(tmp / "prep/train")},
           "grpo": {"max_new_tokens": 6}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "cfg.yaml"


@pytest.mark.slow
@pytest.mark.multirank
def test_bench_cli_cvbench_dp2(tmp_path):
    cfg = _model(tmp_path)
    data = materialize("cvbench", tmp_path)
    rows3d = [json.loads(l) for l in (data / "test_3d.jsonl").read_text().splitlines()]
    rows3d[-1]["prompt"] = "far too long " * 600  # > seq_length 1024 tokens: preprocessing rejects it
    (data / "test_3d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows3d))
    out = tmp_path / "gens.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "m2mega.eval.bench", "--benchmark", "cvbench", "--data", str(data), "--checkpoint", "none",
           "--model-config", str(cfg), "--out", str(out), "--summary-json", str(tmp_path / "s.json"),
           "--batch-size", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(9)]  # every sample once, in file order
    assert all(isinstance(r["response"], str) and r["score"] in (0.0, 1.0) for r in rows)
    assert [r["rejected"] for r in rows] == [False] * 8 + [True] and rows[8]["score"] == 0.0
    summary = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert summary["rejected_prompts"] == 1 and "1 prompt(s) rejected" in p.stderr
    # the printed headline is the CV-Bench formula applied to the dumped per-sample scores
    acc = {s: sum(r["score"] for r in rows if r["source"] == s) / sum(r["source"] == s for r in rows)
           for s in ("ADE20K", "COCO", "Omni3D")}
    assert summary["overall"] == pytest.approx(0.5 * ((acc["ADE20K"] + acc["COCO"]) / 2 + acc["Omni3D"]))
    assert f"cvbench overall: {summary['overall']:.4f}" in p.stdout and "source/Omni3D" in p.stdout
    assert not list(tmp_path.glob("bench.*"))  # the work folder is removed


def test_bench_cli_bad_data_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "m2mega.eval.bench", "--benchmark", "wemath", "--data",
                        str(tmp_path / "missing.json"), "--checkpoint", "none"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'missing.json'}: no such file"


def test_resolve_model_and_judge_errors(tmp_path):
    from m2mega.eval.bench import _resolve_model, load_judge

    with pytest.raises(ValueError, match="--checkpoint none .* needs --model-config"):
        _resolve_model("none", None, [])
    with pytest.raises(FileNotFoundError, match="no checkpoint with a config.yaml"):
        _resolve_model(str(tmp_path), None, [])
    (tmp_path / "judge.py").write_text("def verdict(q, a, r):\n    return a in r\n")
    assert load_judge(f"{tmp_path / 'judge.py'}:verdict")("q", "5", "it is 5")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_judge(f"{tmp_path / 'judge.py'}:nope")
    with pytest.raises(ValueError, match="expected module:function"):
        load_judge("no_colon")
