"""Kernel benchmarks as users run them: ``pytest benchmarks/ --benchmark-only`` (``--benchmark-json=F`` for
the results file). One parametrized benchmark per kernel; the peers (torch eager, torch.compile of the
eager code, Liger-Kernel where installed, ours) and the shapes are parameters, and each shape/mode is a
benchmark group, so pytest-benchmark's table reads peer against peer.

Shapes: on CUDA the production ones (T in {4096, 16384}, H=3584, V=152064, bf16); on CPU tiny ones under
the Triton interpreter (T=37, H=48, V=403), which CI collects with ``--benchmark-disable`` so every peer
runs once and its output is still checked against eager. ``M2MEGA_BENCH_TOKENS`` / ``_HIDDEN`` /
``_VOCAB`` override the shape (comma-separated T), ``M2MEGA_BENCH_COMPILE=1`` enables torch.compile on CPU
(slow to compile there, so it is skipped by default).

``extra_info``: working memory (peak allocated during a call minus inputs and the gradients every method
must return; CUDA only), its fraction of eager's, the roofline lower bound (``roofline.py``: model FLOPs
over the ~800 TFLOP/s measured bf16 matmul rate, or the HBM time) and the measured time's % of it,
model TFLOP/s, and the relative error against eager.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import roofline
from bench_kernels import Meter, Unavailable, _grpo_data, _inputs, build

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _env_ints(name: str, default: list[int]) -> list[int]:
    v = os.environ.get(name)
    return [int(x) for x in v.split(",")] if v else default


TOKENS = _env_ints("M2MEGA_BENCH_TOKENS", [4096, 16384] if CUDA else [37])
H = _env_ints("M2MEGA_BENCH_HIDDEN", [3584 if CUDA else 48])[0]
V = _env_ints("M2MEGA_BENCH_VOCAB", [152064 if CUDA else 403])[0]
# eager first (the others are checked against it); torch.compile last: its compile time is what a capped
# GPU-suite part would lose first.
PEERS = ["eager", "ours", "liger", "compile"]
KERNELS = [("logprob", "fwd"), ("logprob", "fwd+bwd"), ("grpo", "fwd+bwd")]
_EAGER: dict[tuple, dict] = {}  # eager's value and working memory per (kernel, mode, T), for the peers


@pytest.fixture(scope="module")
def data():
    cache = {}

    def get(T):
        if T not in cache:
            cache.clear()  # one production shape on the device at a time
            h, w, y = _inputs(torch, T, H, V, torch.bfloat16, DEVICE)
            cache[T] = (h, w, y, _grpo_data(torch, T, DEVICE))
        return cache[T]

    return get


def _roofline(bench: str, mode: str, T: int) -> roofline.Cost:
    lp = roofline.linear_logprob_costs(T, H, V, itemsize=2)
    if mode == "fwd":
        return lp["fwd"]
    model = lp["model_fwd_bwd"]
    if bench == "grpo":
        model = model + roofline.grpo_loss_costs(T, max(1, T // 1024))["fwd_bwd"]
    return model


def _work_bytes(meter: Meter, step, grad_bytes: int) -> int | None:
    if not meter.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base - grad_bytes)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}-{k[1]}")
@pytest.mark.parametrize("T", TOKENS, ids=lambda t: f"T{t}")  # outermost: one shape's inputs at a time
def test_fused_kernel(benchmark, data, kernel, peer, T):
    bench, mode = kernel
    h, w, y, grpo = data(T)
    compile_ok = CUDA or os.environ.get("M2MEGA_BENCH_COMPILE") == "1"
    if peer == "compile" and not compile_ok:
        pytest.skip("compile: torch.compile is slow to compile on CPU; M2MEGA_BENCH_COMPILE=1 enables it")
    try:
        step, value = build(peer, bench, mode, torch, h, w, y, grpo, compile_ok)
    except Unavailable as e:
        pytest.skip(f"{peer}: {e}")
    meter = Meter(DEVICE)
    benchmark.group = f"{bench} {mode} T={T} H={H} V={V}"
    step()  # warm-up: compilation / autotuning outside the timing
    meter.sync()
    grad_bytes = (h.numel() + w.numel()) * h.element_size() if mode == "fwd+bwd" else 0
    work = _work_bytes(meter, step, grad_bytes)
    t0 = time.perf_counter()

    def timed():
        step()
        meter.sync()

    benchmark.pedantic(timed, rounds=10 if CUDA else 1, warmup_rounds=1 if CUDA else 0, iterations=1)
    median_s = benchmark.stats.stats.median if benchmark.stats else (time.perf_counter() - t0)
    got = value().float()
    key = (bench, mode, T)
    if peer == "eager":
        _EAGER[key] = {"value": got, "work": work}
    cost = _roofline(bench, mode, T)
    info = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
        "T": T, "H": H, "V": V, "dtype": "bfloat16",
        "work_bytes": work,
        "model_flops": cost.flops,
        "model_tflops": cost.flops / median_s / 1e12,
        "roofline_bound_ms": cost.bound_s() * 1e3,
        "pct_of_roofline": 100.0 * cost.bound_s() / median_s,
    }
    ref = _EAGER.get(key)
    if ref is not None and peer != "eager":
        err = float((got - ref["value"]).abs().max() / ref["value"].abs().clamp_min(1e-30).max())
        info["rel_err_vs_eager"] = err
        if work is not None and ref["work"]:
            info["work_frac_of_eager"] = work / ref["work"]
        # bf16 inputs: peers differ in where they round (logits in bf16 or fp32 accumulators)
        assert err < 2e-2, f"{peer} disagrees with eager: relative error {err:.3e}"
    benchmark.extra_info.update(info)
    rows = os.environ.get("M2MEGA_BENCH_ROWS")
    if rows:  # one line per finished benchmark: survives the GPU suite killing a part at its time cap
        with open(rows, "a") as f:
            f.write(json.dumps({"kernel": bench, "mode": mode, "peer": peer, "median_ms": median_s * 1e3,
                                **info}) + "\n")
    assert torch.isfinite(got).all()
