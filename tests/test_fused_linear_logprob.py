"""fused_linear_logprob vs its torch reference: values, entropy, grad_hidden, grad_weight; odd shapes
(V not a multiple of any block, H with a K tail, T=1), ignored/masked rows, extreme logits, fp32/bf16/fp16,
backward vocab chunking, a finite-difference check, TP=2 on gloo vs TP=1 (both kernels, one spawn), and
the CPU benchmark smoke run. Without CUDA the Triton kernels run in the interpreter (conftest)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest
import torch

from m2mega.kernels import (
    KernelConfig,
    fused_grpo_loss,
    fused_linear_logprob,
    grpo_loss_torch,
    kernel_config,
    linear_logprob_torch,
)
from m2mega.kernels import _linear_logprob_triton as tk
from m2mega.kernels.fused_linear_logprob import _vocab_chunks
from m2mega.runtime.multiproc import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error (elementwise is meaningless where a logprob is ~0 next to 1e4 logits)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(T, H, V, dtype=torch.float32, seed=0, scale=1.0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * scale).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    for i in ignore:
        y[i] = -100
    g_lp = torch.randn(T, generator=g)
    g_ent = torch.randn(T, generator=g)
    return h, w, y, g_lp, g_ent


def run(fn, h, w, y, g_lp, g_ent, temperature=1.0, entropy=True, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w, y, temperature=temperature, return_entropy=entropy, **kw)
    lp, ent = out if entropy else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    return {"lp": lp.detach(), "ent": ent.detach() if entropy else None, "gh": h.grad, "gw": w.grad}


def compare(a, b, tol):
    for k in a:
        if a[k] is None:
            continue
        assert a[k].dtype == b[k].dtype, k
        assert torch.isfinite(a[k]).all(), k
        assert rel(a[k], b[k]) < tol, f"{k}: rel err {rel(a[k], b[k]):.3e} >= {tol}"


@pytest.mark.parametrize(
    "T,H,V,temperature,entropy",
    [(37, 48, 300, 1.0, True), (1, 40, 97, 0.7, True), (20, 33, 64, 1.3, False)],
)
def test_fp32_matches_reference(T, H, V, temperature, entropy):
    h, w, y, g_lp, g_ent = make(T, H, V, ignore=(0,) if T > 1 else ())
    ours = run(fused_linear_logprob, h, w, y, g_lp, g_ent, temperature, entropy)
    ref = run(linear_logprob_torch, h, w, y, g_lp, g_ent, temperature, entropy)
    compare(ours, ref, 1e-5)
    assert ours["lp"].dtype == torch.float32 and ours["lp"].shape == (T,)
    if T > 1:
        assert ours["lp"][0] == 0.0  # ignore_index row
    assert (ours["lp"] <= 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """bf16/fp16 against the fp32 reference on the same (rounded) inputs: < 1e-2, and never less accurate
    than the eager half-precision reference (which rounds the logits to the input dtype; we don't)."""
    h, w, y, g_lp, g_ent = make(29, 40, 203, dtype, seed=1, ignore=(3,))
    ours = run(fused_linear_logprob, h, w, y, g_lp, g_ent, 0.9)
    gold = run(linear_logprob_torch, h.float(), w.float(), y, g_lp, g_ent, 0.9)
    eager = run(linear_logprob_torch, h, w, y, g_lp, g_ent, 0.9)
    assert ours["gh"].dtype == dtype and ours["gw"].dtype == dtype
    for k in ours:
        err, err_eager = rel(ours[k], gold[k]), rel(eager[k], gold[k])
        assert err < 1e-2, f"{k}: {err:.3e}"
        assert err <= err_eager * 1.05 + 1e-6, f"{k}: ours {err:.3e} vs eager {err_eager:.3e}"


def test_ignored_and_zero_grad_rows():
    """Fully ignored rows: logprob 0 and no gradient from it; rows with zero upstream grads contribute
    nothing to grad_weight and get zero grad_hidden."""
    T, H, V = 9, 24, 75
    h, w, y, g_lp, g_ent = make(T, H, V, seed=2)
    y[:] = -100
    ours = run(fused_linear_logprob, h, w, y, g_lp, torch.zeros(T))
    assert torch.equal(ours["lp"], torch.zeros(T))
    assert torch.equal(ours["gh"], torch.zeros_like(h)) and torch.equal(ours["gw"], torch.zeros_like(w))
    h, w, y, g_lp, g_ent = make(T, H, V, seed=3)
    g_lp[4:], g_ent[4:] = 0, 0
    ours = run(fused_linear_logprob, h, w, y, g_lp, g_ent)
    ref = run(linear_logprob_torch, h, w, y, g_lp, g_ent)
    compare(ours, ref, 1e-5)
    assert torch.equal(ours["gh"][4:], torch.zeros_like(h[4:]))
    ours_head = run(fused_linear_logprob, h[:4], w, y[:4], g_lp[:4], g_ent[:4])
    assert rel(ours["gw"], ours_head["gw"]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    """Logits of order 1e4 (hidden scaled up): one-hot softmax, logprobs of -1e4; nothing overflows."""
    h, w, y, g_lp, g_ent = make(13, 32, 131, dtype, seed=4, scale=1e4 / 3)
    ours = run(fused_linear_logprob, h, w, y, g_lp, g_ent)
    gold = run(linear_logprob_torch, h.float(), w.float(), y, g_lp, g_ent)
    assert ours["lp"].abs().max() > 1e3
    compare(ours, {k: v.to(ours[k].dtype) for k, v in gold.items()}, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("use_torch", [False, True])
def test_padded_vocab_rows_are_excluded(use_torch):
    """vocab_size < V_local: padded rows (random here, as after megatron's init) never enter the softmax."""
    h, w, y, g_lp, _ = make(11, 24, 131, seed=5)
    vocab = 117
    y = y.clamp(max=vocab - 1)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp = fused_linear_logprob(hh, ww, y, 0.7, vocab_size=vocab, use_torch=use_torch)
    (lp * g_lp).sum().backward()
    h2, w2 = h.clone().requires_grad_(True), w[:vocab].clone().requires_grad_(True)
    gold = linear_logprob_torch(h2, w2, y, 0.7)
    (gold * g_lp).sum().backward()
    assert rel(lp, gold) < 1e-5 and rel(hh.grad, h2.grad) < 1e-5
    assert rel(ww.grad[:vocab], w2.grad) < 1e-5 and ww.grad[vocab:].abs().max() == 0
    with pytest.raises(ValueError, match="padded vocabulary id"):
        fused_linear_logprob(h, w, torch.full_like(y, vocab + 1), vocab_size=vocab)


def test_backward_vocab_chunks_agree():
    """Several backward slabs (tail chunk narrower than the rest) give the one-slab gradients."""
    h, w, y, g_lp, g_ent = make(17, 24, 300, seed=5)
    one = run(fused_linear_logprob, h, w, y, g_lp, g_ent)
    assert [b - a for a, b in _vocab_chunks(300, 17, 4, KernelConfig(bwd_vocab_chunk=60))] == [64] * 4 + [44]
    # 256 MiB of bf16 at T=4096 is 32768 columns -> 5 chunks, balanced and rounded up to 256.
    assert [b - a for a, b in _vocab_chunks(152064, 4096, 2, KernelConfig())] == [30464] * 4 + [30208]
    with kernel_config(bwd_vocab_chunk=60):
        many = run(fused_linear_logprob, h, w, y, g_lp, g_ent)
    compare(many, one, 1e-6)


def test_finite_differences():
    """gradcheck-style: directional derivatives of sum(c1 * logprob + c2 * entropy) from our backward vs
    central differences of the exact (fp64) function, and vs central differences of our own fp32 forward."""
    T, H, V = 3, 8, 37
    h, w, y, c1, c2 = make(T, H, V, seed=6)
    ours = run(fused_linear_logprob, h, w, y, c1, c2, temperature=0.8)

    def f(fn, hh, ww):
        lp, ent = fn(hh, ww, y, temperature=0.8, return_entropy=True)
        return float((lp.double() * c1).sum() + (ent.double() * c2).sum())

    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        dh, dw = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
        an = float((ours["gh"] * dh).sum() + (ours["gw"] * dw).sum())
        e64 = 1e-5
        h64, w64, dh64, dw64 = h.double(), w.double(), dh.double(), dw.double()
        exact = (f(linear_logprob_torch, h64 + e64 * dh64, w64 + e64 * dw64)
                 - f(linear_logprob_torch, h64 - e64 * dh64, w64 - e64 * dw64)) / (2 * e64)
        assert abs(exact - an) <= 1e-4 * max(1.0, abs(exact)), (exact, an)
        e32 = 3e-3
        fd = (f(fused_linear_logprob, h + e32 * dh, w + e32 * dw)
              - f(fused_linear_logprob, h - e32 * dh, w - e32 * dw)) / (2 * e32)
        assert abs(fd - exact) <= 3e-3 * max(1.0, abs(exact)), (fd, exact)


def test_input_errors():
    h, w, y, _, _ = make(5, 8, 11)
    with pytest.raises(ValueError, match=r"targets\[2\] = 11 is outside the vocabulary \[0, 11\)"):
        fused_linear_logprob(h, w, torch.tensor([0, 1, 11, 2, 3]))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        fused_linear_logprob(h, w[:, :7], y)
    with pytest.raises(TypeError, match="share one of"):
        fused_linear_logprob(h, w.double(), y)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"targets must be \[T\]"):
        fused_linear_logprob(h, w, y[:4])


def test_reference_switch(monkeypatch):
    """KernelConfig.use_torch / M2MEGA_KERNELS_TORCH=1 route to the reference (kernel never runs)."""
    h, w, y, _, _ = make(4, 8, 19)

    def boom(*a, **k):
        raise AssertionError("fused kernel ran")

    monkeypatch.setattr(tk, "fwd_stats", boom)
    expected = linear_logprob_torch(h, w, y)
    with kernel_config(use_torch=True):
        assert torch.equal(fused_linear_logprob(h, w, y), expected)
    monkeypatch.setenv("M2MEGA_KERNELS_TORCH", "1")
    assert torch.equal(fused_linear_logprob(h, w, y), expected)
    assert torch.equal(fused_linear_logprob(h, w, y, use_torch=True), expected)
    monkeypatch.delenv("M2MEGA_KERNELS_TORCH")
    with pytest.raises(AssertionError, match="fused kernel ran"):
        fused_linear_logprob(h, w, y)
    with pytest.raises(ValueError, match="unknown kernel config key"):
        KernelConfig.from_dict({"use_refrence": True})


# ------------------------------------------------------------------------------------------ TP = 2 on gloo

TP_SHAPE = dict(T=11, H=24, V=2 * 53)  # V_local = 53: odd, not a multiple of any block


def _tp_inputs():
    h, w, y, g_lp, g_ent = make(TP_SHAPE["T"], TP_SHAPE["H"], TP_SHAPE["V"], seed=11, ignore=(5,))
    g = torch.Generator().manual_seed(12)
    B, L = 1, TP_SHAPE["T"]
    old = torch.randn(L, generator=g) * 0.3
    ref = torch.randn(L, generator=g) * 0.3
    mask = torch.ones(L)
    mask[5] = 0
    cu = torch.tensor([0, 4, L])
    adv = torch.tensor([0.7, -1.1])
    return h, w, y, g_lp, g_ent, (old, ref, adv, mask, cu)


def _tp_chain(fn_lp, fn_loss, h, w, y, g_lp, g_ent, grpo, tp_group, **kw):
    """logprob+entropy, then the GRPO loss on the logprob: returns values and grads of both heads."""
    old, ref, adv, mask, cu = grpo
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, ent = fn_lp(h, w, y, temperature=0.9, tp_group=tp_group, return_entropy=True, **kw)
    loss, metrics = fn_loss(lp, old, ref, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, beta=0.1,
                            cu_seqlens=cu, aggregation="sequence")
    (loss + (ent * g_ent).sum() + (lp * g_lp).sum()).backward()
    return {"lp": lp.detach(), "ent": ent.detach(), "loss": loss.detach(), "gh": h.grad, "gw": w.grad,
            "clip_frac": metrics["clip_frac"]}


def _tp_body():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import m2mega.runtime

    m2mega.runtime.init(2, 1, seed=1)
    group = ps.get_tensor_model_parallel_group()
    r = ps.get_tensor_model_parallel_rank()
    h, w, y, g_lp, g_ent, grpo = _tp_inputs()
    v = w.shape[0] // 2
    w_local = w[r * v:(r + 1) * v]
    out = {
        "fused": _tp_chain(fused_linear_logprob, fused_grpo_loss, h, w_local, y, g_lp, g_ent, grpo, group),
        "ref": _tp_chain(linear_logprob_torch, grpo_loss_torch, h, w_local, y, g_lp, g_ent, grpo, group),
    }
    # reduce_grad_hidden=False (sequence-parallel callers reduce themselves): partial grads sum to the full one.
    part = _tp_chain(fused_linear_logprob, fused_grpo_loss, h, w_local, y, g_lp, g_ent, grpo, group,
                     reduce_grad_hidden=False)["gh"]
    dist.all_reduce(part, group=group)
    out["partial_summed_gh"] = part
    # megatron pads the output layer's vocab: the last rank's tail rows are padding, outside the softmax.
    vocab = w.shape[0] - 5
    hp = h.detach().clone().requires_grad_(True)
    wp = w_local.detach().clone().requires_grad_(True)
    fused_linear_logprob(hp, wp, y.clamp(max=vocab - 1), tp_group=group, vocab_size=vocab).sum().backward()
    out["padded"] = {"lp": fused_linear_logprob(h, w_local, y.clamp(max=vocab - 1), tp_group=group,
                                                vocab_size=vocab).detach(), "gw": wp.grad, "gh": hp.grad}
    return out


@pytest.mark.multirank
@pytest.mark.slow  # ~25 s: two spawned gloo ranks importing megatron
def test_tensor_parallel_matches_tp1():
    h, w, y, g_lp, g_ent, grpo = _tp_inputs()
    full = _tp_chain(fused_linear_logprob, fused_grpo_loss, h, w, y, g_lp, g_ent, grpo, None)
    full_ref = _tp_chain(linear_logprob_torch, grpo_loss_torch, h, w, y, g_lp, g_ent, grpo, None)
    for k in ("lp", "ent", "loss", "gh", "gw"):
        assert rel(full[k], full_ref[k]) < 1e-5, k
    ranks = run_ranks(_tp_body, 2, timeout_s=240)
    for impl in ("fused", "ref"):
        gw = torch.cat([ranks[0][impl]["gw"], ranks[1][impl]["gw"]])
        for k in ("lp", "ent", "loss", "gh"):
            for r in range(2):
                assert rel(ranks[r][impl][k], full[k]) < 1e-5, (impl, k, r)
        assert rel(gw, full["gw"]) < 1e-5, impl
    assert rel(ranks[0]["partial_summed_gh"], full["gh"]) < 1e-5
    vocab = w.shape[0] - 5
    y_pad = y.clamp(max=vocab - 1)
    hp = h.detach().clone().requires_grad_(True)
    wp = w.detach().clone().requires_grad_(True)
    gold = linear_logprob_torch(hp, wp[:vocab], y_pad)
    gold.sum().backward()
    gw_pad = torch.cat([ranks[0]["padded"]["gw"], ranks[1]["padded"]["gw"]])
    for r in range(2):
        assert rel(ranks[r]["padded"]["lp"], gold) < 1e-5
        assert rel(ranks[r]["padded"]["gh"], hp.grad) < 1e-5
    assert rel(gw_pad, wp.grad) < 1e-5 and gw_pad[vocab:].abs().max() == 0


# ------------------------------------------------------------------------------------------ GPU / benchmark


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_native_dot(dtype):
    """The tensor-core path (DOT_MODE 0) only exists on GPU: odd shapes vs the fp32 reference."""
    h, w, y, g_lp, g_ent = make(300, 256, 5003, dtype, seed=8, ignore=(7,))
    dev = {k: v.cuda() for k, v in zip(("h", "w", "y", "a", "b"), (h, w, y, g_lp, g_ent))}
    ours = run(fused_linear_logprob, dev["h"], dev["w"], dev["y"], dev["a"], dev["b"], 0.8)
    gold = run(linear_logprob_torch, dev["h"].float(), dev["w"].float(), dev["y"], dev["a"], dev["b"], 0.8)
    for k in ours:
        assert rel(ours[k], gold[k]) < (2e-5 if dtype == torch.float32 else 1e-2), k


def test_benchmark_cpu_mode_runs(tmp_path):
    """The benchmark's CPU mode (interpreter, tiny shapes) must keep working; one repetition here."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cpu.json"
    bench.main(["--device", "cpu", "--reps", "1", "--warmup", "0", "--no-compile", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["results"]
    assert {r["method"] for r in rows} >= {"eager", "ours", "liger"}
    assert any(r["method"] == "ours" and r["status"] == "ok" for r in rows)
    assert all(r["status"] != "error" for r in rows), [r for r in rows if r["status"] == "error"]
    assert os.path.getsize(out) > 0
