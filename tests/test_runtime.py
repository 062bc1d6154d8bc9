"""The CPU runtime is explicit, reversible, refused with CUDA, and makes megatron's CUDA calls work."""

from __future__ import annotations

import pytest
import torch

import m2mega.runtime as rt
from m2mega.runtime import cpu
from m2mega.runtime.multiproc import RankFailure, RankTimeout, run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime is for machines without CUDA")


def test_activate_is_reversible():
    orig = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream)
    from megatron.core.tensor_parallel import random as mrandom

    orig_rng = mrandom._get_cuda_rng_state
    assert not cpu.is_active()
    cpu.activate()
    try:
        assert cpu.is_active()
        assert torch.cuda.current_device() == torch.device("cpu")
        # megatron's literal device="cuda" allocations and .cuda() land on CPU while active
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).to("cuda").device.type == "cpu"
        torch.cuda.synchronize()
        # megatron's optimizers assert the CUDA type names
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched
        cpu.activate()  # idempotent
        assert not torch.cuda.is_available(), "the runtime must not pretend CUDA exists"
    finally:
        cpu.deactivate()
    assert not cpu.is_active()
    assert (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream) == orig
    assert mrandom._get_cuda_rng_state is orig_rng
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    cpu.deactivate()  # safe twice


def test_backward_runs_under_the_mapping():
    """torch pauses a mode while handling Tensor.backward; python in the backward (custom autograd
    functions, megatron's activation recompute) must still see CUDA mapped to CPU."""

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.full_like(x, 2.0, device="cuda")  # what megatron's recompute path does

    cpu.activate()
    try:
        x = torch.ones(3, requires_grad=True)
        Recompute.apply(x).sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 2.0))
        x.grad = None
        torch.autograd.backward([Recompute.apply(x).sum()], grad_tensors=[torch.tensor(3.0)])
        assert torch.equal(x.grad, torch.full((3,), 6.0))
        Recompute.apply(x).sum().backward(inputs=[x])  # inputs= accumulates into x.grad only
        assert torch.equal(x.grad, torch.full((3,), 8.0))
    finally:
        cpu.deactivate()


def test_refused_on_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="never be active on a GPU machine"):
        cpu.activate()
    assert not cpu.is_active()


def test_nccl_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        rt.init(1, 1, backend="nccl")


def test_rng_tracker_fork_is_isolated_and_reproducible():
    """megatron's RNG tracker (used for TP-consistent dropout/init) works on the CPU generator."""
    from megatron.core import tensor_parallel

    cpu.activate()
    try:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.reset()
        tracker.add("model-parallel-rng", 42)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
        tracker.reset()
        tracker.add("model-parallel-rng", 42)
        with tracker.fork():
            b = torch.rand(3)
        assert torch.equal(a, b)
    finally:
        tensor_parallel.get_cuda_rng_tracker().reset()
        cpu.deactivate()


def _rank_info(tp, pp):
    info = rt.init(tp, pp)
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(info.rank)])
    torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return {
        "rank": info.rank,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "tp_sum": t.item(),
        "backend": info.backend,
        "dp": info.dp,
    }


def _fail_on_rank1():
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank one")
    return 0


def _sleep_forever():
    import time

    time.sleep(600)


@pytest.mark.multirank
def test_harness_runs_ranks_and_returns_results():
    res = run_ranks(_rank_info, 4, args=(2, 2), timeout_s=180)
    assert [r["rank"] for r in res] == [0, 1, 2, 3]
    assert all(r["backend"] == "gloo" and r["dp"] == 1 for r in res)
    # megatron's default order is tp-cp-ep-dp-pp: TP pairs are (0,1) and (2,3)
    assert [r["tp_rank"] for r in res] == [0, 1, 0, 1]
    assert [r["pp_rank"] for r in res] == [0, 0, 1, 1]
    assert [r["tp_sum"] for r in res] == [1.0, 1.0, 5.0, 5.0]


@pytest.mark.multirank
def test_harness_reports_failing_rank_traceback():
    with pytest.raises(RankFailure, match=r"rank 1 of 2 failed(.|\n)*boom on rank one"):
        run_ranks(_fail_on_rank1, 2, timeout_s=120)


@pytest.mark.multirank
def test_harness_times_out():
    with pytest.raises(RankTimeout, match=r"ranks \[0\] of 1 did not finish within 8s"):
        run_ranks(_sleep_forever, 1, timeout_s=8)
