"""The prepared GPU suite cannot rot: ``benchmarks/gpu_suite.sh --dry-run`` runs the same driver on CPU
at tiny sizes (every part, its result parsing and the JSON), and the driver's time caps keep what a killed
part already wrote."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "cpu.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    bad = {k: (v["status"], v.get("output_tail", "")[-1500:]) for k, v in rep["parts"].items() if v["status"] != "ok"}
    assert not bad, bad
    assert proc.returncode == 0
    assert rep["dry_run"] and rep["device"].startswith("cpu") and rep["date"] and rep["skipped"] == {}
    assert rep["versions"]["torch"] and rep["versions"]["triton"]
    parts = rep["parts"]
    assert list(parts) == ["gpu_tests", "kernels_T37", "vision_pack", "model", "grpo_step", "rollout"]
    assert parts["rollout"]["results"]["json"]["greedy"]["same_tokens"] is True
    assert parts["gpu_tests"]["results"]["junit"]["tests"] >= 3  # the gpu-marked tests were collected (and skipped)
    rows = parts["kernels_T37"]["results"]["rows"]
    peers = {(r["kernel"], r["mode"], r["peer"]) for r in rows}
    for k in (("logprob", "fwd"), ("logprob", "fwd+bwd"), ("grpo", "fwd+bwd")):
        assert (*k, "eager") in peers and (*k, "ours") in peers, peers
    for r in rows:
        assert r["median_ms"] > 0 and r["roofline_bound_ms"] > 0
        if r["peer"] == "ours":
            assert r["rel_err_vs_eager"] < 2e-2
    assert parts["vision_pack"]["results"]["json"]["bit_exact_vs_hf_slow"] is True
    assert parts["model"]["results"]["json"]
    phases = parts["grpo_step"]["results"]["json"]["phase_seconds"]
    assert set(phases) == {"rollout", "logprob", "update"} and all(len(v) == 2 for v in phases.values())


def test_caps_keep_partial_results_and_budget_skips(tmp_path):
    gs = _suite()
    rows = tmp_path / "rows.jsonl"
    slow = gs.Part("slow", [sys.executable, "-c", f"import time; open({str(rows)!r}, 'w').write('{{\"a\": 1}}\\n'); "
                                                 "time.sleep(60)"], cap_s=3, why="test", outputs={"rows": rows})
    rec = gs.run_part(slow, budget_left=100, log=lambda *_: None)
    assert rec["status"] == "timeout" and rec["results"]["rows"] == [{"a": 1}]
    assert rec["seconds"] < 30
    rec = gs.run_part(slow, budget_left=5, log=lambda *_: None)
    assert rec["status"] == "skipped" and "budget exhausted" in rec["reason"]
    fail = gs.Part("fail", [sys.executable, "-c", "raise SystemExit(3)"], cap_s=30, why="test")
    rec = gs.run_part(fail, budget_left=100, log=lambda *_: None)
    assert rec["status"] == "failed" and rec["rc"] == 3
    missing = gs.Part("m", ["true"], cap_s=30, why="test", needs=str(ROOT / "benchmarks" / "no_such_bench.py"))
    assert gs.run_part(missing, 100, log=lambda *_: None)["status"] == "skipped"
