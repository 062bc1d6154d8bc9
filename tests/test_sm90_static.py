"""Every Triton kernel compiles for Hopper (sm_90a) on this CPU machine, without spills in the hot kernels,
on tensor cores, within the H100's shared memory; and the committed full sweep covers the autotune
configs the kernels declare now (benchmarks/sm90_static.py; its output is
benchmarks/results/sm90_static.json)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sm90_static.py"
FULL = ROOT / "benchmarks" / "results" / "sm90_static.json"
HOT = ("_fwd_stats_kernel", "_bwd_dlogits_kernel", "_mm_acc_kernel")


def _module():
    spec = importlib.util.spec_from_file_location("sm90_static", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)  # imports nothing from triton at module level
    return mod


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    """The CI subset (first autotune config of each kernel, production GRPO flags), compiled in a process
    without TRITON_INTERPRET (the interpreter replaces @triton.jit functions, which then cannot compile)."""
    out = tmp_path_factory.mktemp("sm90") / "ci.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "ci", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@pytest.mark.slow
def test_ci_subset_compiles_without_spills(ci_report):
    proc, report = ci_report
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not report["compile_errors"], report["compile_errors"]
    assert not report["failures"], "\n".join(report["failures"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {(b["kernel"], b["dtype"]) for b in report["binaries"].values()}
    for k in HOT + ("_grpo_fwd_kernel", "_grpo_bwd_kernel"):
        assert (k, "bf16") in kernels and (k, "fp32") in kernels, f"{k} missing from the CI subset"
    for b in report["binaries"].values():
        assert b["dynamic_smem"] <= report["limits"]["smem_per_block_bytes"]
        if b["kernel"] in HOT and b["dtype"] == "bf16":
            assert b["wgmma"] > 0, f"{b['kernel']} bf16 does not use wgmma"
        for tool in b["ptxas"].values():
            assert 0 < tool["registers"] <= 255


@pytest.mark.slow
def test_committed_sweep_is_clean_and_current(ci_report):
    """The committed full sweep passes and covers every autotune config the kernels declare today (so a
    config added without rerunning the sweep fails here)."""
    assert FULL.exists(), "run python benchmarks/sm90_static.py to write benchmarks/results/sm90_static.json"
    full = json.loads(FULL.read_text())
    assert full["subset"] == "full" and not full["failures"] and not full["compile_errors"], full["failures"]
    _, ci = ci_report
    assert ci is not None
    covered: dict[str, list] = {}
    for b in full["binaries"].values():
        covered.setdefault(f"{b['kernel']}/{b['dtype']}", []).extend(v["config"] for v in b["variants"])
    for key, configs in ci["autotune_configs"].items():
        for cfg in configs:
            assert cfg in covered.get(key, []), f"{key} autotune config {cfg} is not in {FULL.name}; rerun the sweep"
    tps = {c["TP"] for c in full["cases"] if "TP" in c}
    assert tps == {1, 2, 4, 8}
    aggs = {c["aggregation"] for c in full["cases"] if "aggregation" in c}
    assert aggs == {"token", "sequence"}
    assert full["roofline"]["rows"], "roofline table missing"


def test_parse_ptxas_and_check_flag_spills():
    mod = _module()
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_stats_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_stats_kernel
    912 bytes stack frame, 1704 bytes spill stores, 1788 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 912 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 1024 bytes smem, 360 bytes cmem[0]
"""
    parsed = mod.parse_ptxas(log)
    assert parsed["_fwd_stats_kernel"] == {"registers": 255, "spill_stores": 1704, "spill_loads": 1788,
                                           "stack_frame": 912, "static_smem": 0}
    assert parsed["_Z6kernelPf"]["registers"] == 18 and parsed["_Z6kernelPf"]["static_smem"] == 1024

    def rec(kernel, dtype, spill, smem=1000, wgmma=4):
        p = {"registers": 200, "spill_stores": spill, "spill_loads": spill, "stack_frame": 0, "static_smem": 0}
        return {"kernel": kernel, "dtype": dtype, "dynamic_smem": smem, "wgmma": wgmma, "ptxas": {"triton": p},
                "variants": [{"config": {}, "flags": {}}]}

    report = {"compile_errors": [], "csrc": {"a.cu": {"k": parsed["_Z6kernelPf"]}}, "binaries": {
        "ok": rec("_fwd_stats_kernel", "bf16", 0),
        "cold": rec("_fwd_stats_kernel", "fp32", 8, wgmma=0),  # exact-fp32 debug path: reported, not failed
    }}
    assert mod.check(report) == []
    assert [w.split(" [")[0] for w in mod.warnings(report)] == ["_fwd_stats_kernel fp32"]
    report["binaries"]["hot"] = rec("_mm_acc_kernel", "bf16", 8)
    report["binaries"]["big"] = rec("_grpo_fwd_kernel", "fp32", 0, smem=300 * 1024)
    report["binaries"]["nomma"] = rec("_bwd_dlogits_kernel", "bf16", 0, wgmma=0)
    fails = mod.check(report)
    assert len(fails) == 3 and any("spills" in f for f in fails) and any("shared memory" in f for f in fails)
    assert any("wgmma" in f for f in fails)
