"""fused_grpo_loss vs its torch reference: loss, gradient and every metric, across aggregation, clip-higher,
dual clip, KL, dynamic weights, per-sequence/per-token advantages, padded [B, L] and packed [T] layouts;
T=1, fully masked sequences and batches, garbage in masked positions, bf16 input, finite differences, errors.
(The TP=2 run of this loss on top of the vocab-parallel log-prob is in test_fused_linear_logprob.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch

from m2mega.kernels import dynamic_advantage_weights, fused_grpo_loss, grpo_loss_torch, kernel_config
from m2mega.kernels import _grpo_loss_triton as gk


def rel(a, b):
    """Norm-wise relative error; a scalar loss is compared relative to max(|b|, 1) since it is a sum of O(1)
    per-token terms that may cancel to ~0 (a relative error of such a sum measures only summation order)."""
    a, b = a.detach().double(), b.detach().double()
    floor = 1.0 if b.dim() == 0 else 1e-30
    return float((a - b).norm() / b.norm().clamp_min(floor))


def make(B=5, L=37, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, L, generator=g) * 0.5 - 1.5
    old = lp + torch.randn(B, L, generator=g) * spread  # |log ratio| up to ~2: every clip branch is taken
    ref = lp + torch.randn(B, L, generator=g) * 0.3
    adv = torch.randn(B, generator=g).abs() * torch.tensor([1.0, -1.0])[torch.arange(B) % 2]  # both signs
    adv_tok = torch.randn(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.25
    if B > 3:
        mask[1] = False  # a fully masked sequence
        mask[3, 20:] = False  # padding tail
    w = torch.rand(B, generator=g) + 0.1
    return lp, old, ref, adv, adv_tok, mask, w


def both(args, kwargs, dtype=torch.float32):
    out = {}
    for name, fn in (("fused", fused_grpo_loss), ("ref", grpo_loss_torch)):
        lp = args[0].detach().clone().to(dtype).requires_grad_()
        loss, metrics = fn(lp, *args[1:], **kwargs)
        loss.backward()
        out[name] = (loss.detach(), metrics, lp.grad)
    return out


CASES = list(itertools.product(["token", "sequence"], [None, 2.0], [0.0, 0.05], [False, True], [False, True]))


@pytest.mark.parametrize("aggregation,dual_clip,beta,per_token_adv,with_weights", CASES)
def test_padded_matches_reference(aggregation, dual_clip, beta, per_token_adv, with_weights):
    lp, old, ref, adv, adv_tok, mask, w = make()
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, beta=beta, aggregation=aggregation,
              weights=w if with_weights else None)
    out = both((lp, old, ref if beta or dual_clip else None, adv_tok if per_token_adv else adv, mask), kw)
    (l1, m1, g1), (l2, m2, g2) = out["fused"], out["ref"]
    assert rel(l1, l2) < 1e-5 and rel(g1, g2) < 1e-5
    assert set(m1) == set(m2)
    for k in m1:
        assert rel(m1[k], m2[k]) < 1e-5 or abs(float(m1[k] - m2[k])) < 1e-7, k
        assert not m1[k].requires_grad
    # Not vacuous: both clip sides (and the dual clip, when on) are active on these inputs.
    assert m1["clip_frac_low"] > 0 and m1["clip_frac_high"] > 0
    assert (m1["dual_clip_frac"] > 0) == (dual_clip is not None)
    assert torch.equal(g1[1], torch.zeros_like(g1[1])) and torch.equal(g1[3, 20:], torch.zeros(17))
    assert float(m1["num_tokens"]) == float(mask.sum())
    torch.testing.assert_close(l1, m1["pg_loss"] + beta * m1["kl_loss"])


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_packed_matches_padded(aggregation):
    """Packed [T] + cu_seqlens equals the same sequences padded to [B, L]; and matches the reference."""
    lp, old, ref, adv, adv_tok, mask, w = make(B=4, L=23, seed=1)
    lens = [23, 1, 9, 17]
    pad = torch.zeros(4, 23, dtype=torch.bool)
    for b, n in enumerate(lens):
        pad[b, :n] = True
    mask = mask & pad
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, beta=0.1, aggregation=aggregation, weights=w)
    padded = both((lp, old, ref, adv, mask), kw)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)))
    packed = both((lp[pad], old[pad], ref[pad], adv, mask[pad]), dict(kw, cu_seqlens=cu))
    for impl in ("fused", "ref"):
        assert rel(packed[impl][0], padded["ref"][0]) < 1e-5, impl
        assert rel(packed[impl][2], padded["ref"][2][pad]) < 1e-5, impl
    # per-token advantages in packed form
    packed_tok = both((lp[pad], old[pad], ref[pad], adv_tok[pad], mask[pad]), dict(kw, cu_seqlens=cu))
    assert rel(packed_tok["fused"][0], packed_tok["ref"][0]) < 1e-5
    assert rel(packed_tok["fused"][2], packed_tok["ref"][2]) < 1e-5


def test_long_sequence_crosses_blocks():
    """A sequence longer than the kernel's token block: the per-sequence loop accumulates across blocks."""
    lp, old, ref, adv, adv_tok, mask, w = make(B=2, L=3 * gk.BLOCK + 5, seed=2)
    out = both((lp, old, ref, adv, mask), dict(beta=0.02, aggregation="sequence"))
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-5


def test_edge_cases_t1_empty_and_garbage():
    # T = 1, packed, no cu_seqlens
    lp, old, ref = torch.tensor([-0.3]), torch.tensor([-0.9]), torch.tensor([-0.2])
    out = both((lp, old, ref, torch.tensor([1.5]), torch.tensor([True])), dict(beta=0.1))
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-5
    assert out["fused"][1]["clip_frac_high"] == 1.0  # ratio e^0.6 > 1.2 with A > 0: clipped
    # fully masked batch: loss 0, zero gradient, finite metrics, both aggregations
    lp, old, ref, adv, _, mask, _ = make(seed=3)
    for agg in ("token", "sequence"):
        out = both((lp, old, ref, adv, torch.zeros_like(mask)), dict(beta=0.1, aggregation=agg))
        loss, metrics, grad = out["fused"]
        assert loss == 0 and torch.equal(grad, torch.zeros_like(grad))
        assert all(torch.isfinite(v) for v in metrics.values())
    # masked positions holding garbage (inf / nan / huge) must not leak into loss or gradient
    dirty = lp.clone()
    dirty[~mask] = float("nan")
    old_dirty = old.clone()
    old_dirty[~mask] = float("-inf")
    clean = both((lp, old, ref, adv, mask), dict(beta=0.1, dual_clip=3.0))
    got = both((dirty, old_dirty, ref, adv, mask), dict(beta=0.1, dual_clip=3.0))
    for impl in ("fused", "ref"):
        assert torch.isfinite(got[impl][0]) and torch.isfinite(got[impl][2]).all()
        assert rel(got[impl][0], clean["ref"][0]) < 1e-5 and rel(got[impl][2], clean["ref"][2]) < 1e-5


def test_float_mask_normalizer_and_bf16():
    lp, old, ref, adv, _, mask, w = make(seed=4)
    fmask = mask.float() * torch.rand(mask.shape, generator=torch.Generator().manual_seed(5))
    out = both((lp, old, ref, adv, fmask), dict(beta=0.05, normalizer=1000.0))
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-5
    out = both((lp, old, ref, adv, mask), dict(beta=0.05, aggregation="sequence", normalizer=8))
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-5
    out = both((lp, old.bfloat16(), ref.bfloat16(), adv, mask), dict(beta=0.05), dtype=torch.bfloat16)
    assert out["fused"][2].dtype == torch.bfloat16
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-2


def test_finite_differences():
    """Directional derivative of the loss vs central differences in fp64 of the reference formula, with
    log-ratios kept away from the clip kinks (|log r| within 0.1 or beyond 0.4 of the boundaries)."""
    g = torch.Generator().manual_seed(9)
    B, L = 3, 11
    lp = torch.randn(B, L, generator=g) * 0.3 - 1
    choices = torch.tensor([-1.2, -0.05, 0.0, 0.08, 0.9, 1.6])  # inside, and well outside, [ln .8, ln 1.28]
    old = lp - choices[torch.randint(0, 6, (B, L), generator=g)]
    ref = lp + torch.randn(B, L, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.2
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, beta=0.07, aggregation="sequence")
    x = lp.clone().requires_grad_()
    loss, _ = fused_grpo_loss(x, old, ref, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    for _ in range(3):
        d = torch.randn(B, L, generator=g).double()
        eps = 1e-6

        def f(y):
            return float(grpo_loss_torch(y, old.double(), ref.double(), adv.double(), mask, **kw)[0])

        fd = (f(lp.double() + eps * d) - f(lp.double() - eps * d)) / (2 * eps)
        an = float((grad.double() * d).sum())
        assert abs(fd - an) <= 1e-5 * max(1.0, abs(fd)), (fd, an)


def test_dynamic_advantage_weights():
    acc = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1.0])
    w = dynamic_advantage_weights(acc, group_size=4, sigma=2.0)
    torch.testing.assert_close(w, torch.tensor([0.0] * 4 + [0.5] * 4 + [0.375] * 4))
    with pytest.raises(ValueError, match="group_size=5"):
        dynamic_advantage_weights(acc, group_size=5)


def test_input_errors():
    lp, old, ref, adv, adv_tok, mask, w = make()
    with pytest.raises(ValueError, match="old_logp has shape"):
        fused_grpo_loss(lp, old[:, :-1], None, adv, mask)
    with pytest.raises(ValueError, match="needs ref_logp"):
        fused_grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        fused_grpo_loss(lp, old, None, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages must be per sequence"):
        fused_grpo_loss(lp, old, None, adv[:3], mask)
    with pytest.raises(ValueError, match="aggregation"):
        fused_grpo_loss(lp, old, None, adv, mask, aggregation="batch")
    with pytest.raises(ValueError, match="end at T=9"):
        fused_grpo_loss(lp[0, :9], old[0, :9], None, adv[:2], mask[0, :9], cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="non-decreasing"):
        fused_grpo_loss(lp[0, :9], old[0, :9], None, adv[:2], mask[0, :9], cu_seqlens=torch.tensor([0, 10, 9]))


def test_reference_switch(monkeypatch):
    lp, old, ref, adv, _, mask, _ = make()

    def boom(*a, **k):
        raise AssertionError("fused kernel ran")

    monkeypatch.setattr(gk, "_grpo_fwd_kernel", type("K", (), {"__getitem__": lambda self, g: boom})())
    expected, _ = grpo_loss_torch(lp, old, ref, adv, mask, beta=0.1)
    with kernel_config(use_torch=True):
        assert torch.equal(fused_grpo_loss(lp, old, ref, adv, mask, beta=0.1)[0], expected)
    assert torch.equal(fused_grpo_loss(lp, old, ref, adv, mask, beta=0.1, use_torch=True)[0], expected)
    with pytest.raises(AssertionError, match="fused kernel ran"):
        fused_grpo_loss(lp, old, ref, adv, mask, beta=0.1)


@pytest.mark.gpu
def test_cuda_matches_reference():
    lp, old, ref, adv, adv_tok, mask, w = (t.cuda() for t in make(B=6, L=3000, seed=10))
    out = both((lp, old, ref, adv, mask), dict(clip_high=0.28, dual_clip=3.0, beta=0.05, weights=w,
                                               aggregation="sequence"))
    assert rel(out["fused"][0], out["ref"][0]) < 1e-5 and rel(out["fused"][2], out["ref"][2]) < 1e-5


def test_plain_cpu_run_uses_the_reference(monkeypatch):
    """Without TRITON_INTERPRET (e.g. the CPU demo) CPU tensors take the torch reference, not a crash."""
    from m2mega.kernels import config as kcfg
    from m2mega.kernels import fused_linear_logprob

    x = torch.zeros(2, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kcfg.triton_runs_on(x)
    h, w, y = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 10])
    got = fused_linear_logprob(h, w, y)
    want = torch.log_softmax(h @ w.t(), -1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(got, want, atol=1e-6)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kcfg.triton_runs_on(x)
