"""User errors reach the user as one line ``error: ...`` with exit code 2, before any heavy work, printed
once under torchrun (issue 14, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from m2mega.runtime.multiproc import free_port

GPT = ["--model.family=gpt", "--data.source=synthetic", "--logging.progress=none"]


def _run(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "M2MEGA_TRACEBACK")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("module, args, match", [
    ("m2mega.train.sft", [*GPT, "--optimizer.lr=1e30"], "error: optimizer.lr 1e+30 > 1"),
    ("m2mega.train.sft", [*GPT, "--optimizer.nope=1"], "error: unknown config key 'optimizer.nope'"),
    ("m2mega.train.sft", ["--model.family=gpt", "--data.source=packed", "--data.train_prefix=/nonexistent/train"],
     "error: data.train_prefix: dataset /nonexistent/train is missing /nonexistent/train.bin"),
    ("m2mega.train.sft", [*GPT, "--model.init_from=/nonexistent/ckpt"], "error: model.init_from: /nonexistent/ckpt"),
    ("m2mega.train.grpo", ["--mode=grpo", "--model.family=gpt", "--data.train_prefix=/nonexistent/rl"],
     "error: data.train_prefix: dataset /nonexistent/rl is missing"),
    ("m2mega.train.grpo", [*GPT], "error: mode is 'sft'; this entry point runs GRPO"),
])
def test_training_entry_points_report_one_line(module, args, match):
    proc = _run(["-m", module, *args])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_error_line(proc).startswith(match)


def test_eval_reports_missing_inputs_and_a_bad_checkpoint_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {family: gpt}\ndata: {source: synthetic}\n")
    proc = _run(["-m", "m2mega.eval.run", "--config", str(cfg), "--eval-prefix", str(tmp_path / "none")])
    assert proc.returncode == 2 and _one_error_line(proc).startswith(f"error: --eval-prefix: dataset {tmp_path}")
    (tmp_path / "ev.bin").write_bytes(b"")
    (tmp_path / "ev.idx").write_bytes(b"")
    proc = _run(["-m", "m2mega.eval.run", "--config", str(cfg), "--eval-prefix", str(tmp_path / "ev"),
                 "--checkpoint", str(tmp_path / "nockpt")])
    assert proc.returncode == 2 and _one_error_line(proc).startswith("error: --checkpoint:")


@pytest.mark.slow
def test_under_torchrun_the_error_is_printed_once():
    proc = _run(["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                 "-m", "m2mega.train.sft", *GPT, "--optimizer.lr=2"], timeout=240)
    assert proc.returncode != 0
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert errors == ["error: optimizer.lr 2.0 > 1 is outside any sane range (a typo? e.g. 1e-5)"], proc.stderr[-3000:]
    # torchrun's launcher reports the failed children with its own trace; no rank prints one.
    assert "ConfigError" not in proc.stderr and "m2mega/train" not in proc.stderr, proc.stderr[-3000:]
