"""The attention / RMSNorm selection rule (m2mega.runtime.backends), exercised on CPU by forcing its inputs:
which path an H100 without Transformer Engine or flash-attn takes, and that the forced CPU-runnable paths
agree with the formulas they replace."""

from __future__ import annotations

import pytest
import torch

from m2mega.runtime.backends import Environment, select_backends

H100_BARE = Environment("cuda", (9, 0), flash_attn=False, torch_varlen=True, fused_rms_norm=True)
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("M2MEGA_ATTN_BACKEND", raising=False)
    monkeypatch.delenv("M2MEGA_NORM_BACKEND", raising=False)


def test_h100_without_te_or_flash_attn_takes_torch_native_fast_paths():
    b = select_backends(H100_BARE, BF16)
    assert (b.attention, b.rms_norm) == ("torch_varlen", "torch_fused")


@pytest.mark.parametrize(
    "env, dtype, dropout, attention, norm",
    [
        (Environment("cuda", (9, 0), True, True, True), BF16, 0.0, "flash_attn", "torch_fused"),
        (Environment("cuda", (9, 0), True, True, True), torch.float16, 0.1, "flash_attn", "torch_fused"),
        (H100_BARE, torch.float16, 0.0, "torch_varlen", "torch_fused"),
        (H100_BARE, BF16, 0.1, "sdpa", "torch_fused"),  # torch's varlen kernel has no dropout
        (H100_BARE, torch.float32, 0.0, "sdpa", "torch_fused"),  # flash kernels are half-precision only
        (Environment("cuda", (7, 5), True, True, True), BF16, 0.0, "sdpa", "torch_fused"),  # pre-Ampere
        (Environment("cuda", (9, 0), False, False, False), BF16, 0.0, "sdpa", "hf_formula"),  # old torch
        (Environment("cpu", None, True, True, True), BF16, 0.0, "sdpa", "hf_formula"),
        (Environment("cpu", None, False, True, True), torch.float32, 0.0, "sdpa", "hf_formula"),
    ],
)
def test_rule(env, dtype, dropout, attention, norm):
    b = select_backends(env, dtype, dropout)
    assert (b.attention, b.rms_norm) == (attention, norm)


def test_overrides_and_clear_errors(monkeypatch):
    assert select_backends(H100_BARE, BF16, attention="sdpa").attention == "sdpa"
    monkeypatch.setenv("M2MEGA_NORM_BACKEND", "hf_formula")
    assert select_backends(H100_BARE, BF16).rms_norm == "hf_formula"
    monkeypatch.setenv("M2MEGA_ATTN_BACKEND", "flash_attn")
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        select_backends(H100_BARE, BF16)
    with pytest.raises(RuntimeError, match="'torch_varlen' was requested"):
        select_backends(Environment("cpu", None, False, True, True), torch.float32, attention="torch_varlen")
    with pytest.raises(RuntimeError, match="unknown attention backend 'xformers'"):
        select_backends(H100_BARE, BF16, attention="xformers")
    with pytest.raises(RuntimeError, match="no torch.nn.functional.rms_norm"):
        select_backends(Environment("cuda", (9, 0)), BF16, attention="sdpa", rms_norm="torch_fused")


def test_this_process_environment_on_cpu():
    env = Environment.of(torch.zeros(1))
    assert env.device_type == "cpu" and env.capability is None
    assert env.fused_rms_norm == hasattr(torch.nn.functional, "rms_norm")
    b = select_backends(env, torch.float32)
    assert (b.attention, b.rms_norm) == ("sdpa", "hf_formula")


def test_torch_has_the_native_paths_the_rule_relies_on():
    """torch >= 2.10 ships both; if a future torch drops one, the rule silently degrades: fail loudly."""
    assert hasattr(torch.nn.functional, "rms_norm")
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_path_rounds_like_hf(monkeypatch, dtype):
    """The fused path a GPU takes, forced on CPU, equals HF Qwen2's formula (bit-exact in bf16)."""
    from m2mega.models.qwen25vl.layer_specs import RMSNorm
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    H = 97
    x = (torch.randn(5, 3, H, generator=g) * 3).to(dtype)
    norm = RMSNorm(SimpleNamespace(params_dtype=dtype, sequence_parallel=False), H, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=g).to(dtype))
    h = x.float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    monkeypatch.setenv("M2MEGA_NORM_BACKEND", "hf_formula")
    formula = norm(x)
    monkeypatch.setenv("M2MEGA_NORM_BACKEND", "torch_fused")
    fused = norm(x)
    assert torch.equal(formula, ref)
    if dtype == torch.bfloat16:
        assert torch.equal(fused, ref)
    else:
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    fused.sum().backward()
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


def test_packed_attention_follows_the_rule_on_cpu(monkeypatch):
    """segment_attention on CPU: auto -> sdpa; forcing a GPU-only backend fails with the rule's message."""
    from m2mega.models.qwen25vl.attention import _pick_backend, segment_attention

    q = torch.randn(10, 4, 8)
    assert _pick_backend(q, None, 0.0) == "sdpa"
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = segment_attention(q, q, q, cu, 7, causal=True, scale=0.3)
    assert out.shape == q.shape
    with pytest.raises(RuntimeError, match="'torch_varlen' was requested"):
        segment_attention(q, q, q, cu, 7, causal=True, scale=0.3, backend="torch_varlen")
