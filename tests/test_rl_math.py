"""GRPO group maths: advantages vs a loop reference, zero-variance groups, Eq. 6 weights, Eq. 7 KL schedule,
dynamic sampling."""

import math

import pytest
import torch

from m2mega.rl import (
    DynamicSampler,
    KLSchedule,
    cosine_kl_beta,
    dynamic_weights,
    group_advantages,
    group_weights,
    static_kl_beta,
    weighted_group_advantages,
    zero_variance_mask,
)


def _ref_adv(rows, eps, unbiased):
    out = []
    for r in rows:
        m = sum(r) / len(r)
        var = sum((x - m) ** 2 for x in r) / (len(r) - (1 if unbiased else 0))
        out.append([(x - m) / (math.sqrt(var) + eps) for x in r])
    return out


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("n_groups, G", [(1, 2), (5, 7), (13, 16)])
def test_group_advantages_match_reference(n_groups, G, unbiased):
    g = torch.Generator().manual_seed(n_groups * 100 + G)
    r = torch.rand(n_groups, G, generator=g, dtype=torch.float64)
    adv, keep = group_advantages(r, eps=1e-6, unbiased=unbiased)
    ref = torch.tensor(_ref_adv(r.tolist(), 1e-6, unbiased), dtype=torch.float64)
    torch.testing.assert_close(adv, ref, rtol=1e-12, atol=1e-12)
    assert keep.all()
    # Advantages are centred per group.
    torch.testing.assert_close(adv.sum(1), torch.zeros(n_groups, dtype=torch.float64), atol=1e-9, rtol=0)


def test_group_advantages_known_values():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    adv, _ = group_advantages(r, eps=0.0, unbiased=False)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    # mean 0.25, population std sqrt(3)/4
    s = math.sqrt(3) / 4
    torch.testing.assert_close(adv[1], torch.tensor([-0.25 / s] * 3 + [0.75 / s]))


def test_zero_variance_groups_dropped_or_kept():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.9, 0.5], [0.7, 0.7, 0.7 + 1e-9]])
    assert zero_variance_mask(r).tolist() == [True, True, False, True]
    adv, keep = group_advantages(r, drop_zero_variance=True)
    assert keep.tolist() == [False, False, True, False]
    assert (adv[[0, 1, 3]] == 0).all() and (adv[2] != 0).all()  # no 1e-9/1e-6 blow-up in group 3
    adv2, keep2 = group_advantages(r, drop_zero_variance=False)
    assert keep2.all() and torch.equal(adv, adv2)


def test_group_advantages_input_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="2-D"):
        group_advantages(torch.ones(4))
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"group 1, rollout 2"):
        group_advantages(bad)


def test_group_advantages_dtype_preserved():
    adv, _ = group_advantages(torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16))
    assert adv.dtype == torch.bfloat16
    adv, _ = group_advantages(torch.tensor([[0, 1]]))
    assert adv.dtype == torch.float32


def test_dynamic_weights_eq6_values():
    acc = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0],  # mean 0.5 -> sigma * 0.25
            [1.0, 1.0, 1.0, 1.0],  # 1.0 -> 0
            [0.0, 0.0, 0.0, 0.0],  # 0.0 -> 0
            [1.0, 0.0, 0.0, 0.0],  # 0.25 -> sigma * 0.1875
            [0.9, 0.6, 0.3, 0.2],  # EDNM values, mean 0.5
        ]
    )
    w = dynamic_weights(acc, sigma=2.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.0, 0.0, 0.375, 0.5]))
    assert dynamic_weights(acc, sigma=4.0).max().item() == pytest.approx(1.0)
    # Peak is at mean accuracy 0.5 and the weight is symmetric about it.
    means = torch.linspace(0, 1, 101)
    ww = dynamic_weights(means[:, None].expand(-1, 2).contiguous(), sigma=1.0)
    assert int(ww.argmax()) == 50 and torch.allclose(ww, ww.flip(0))
    torch.testing.assert_close(group_weights(acc, "static"), torch.ones(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamic_weights(torch.tensor([[1.1, 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        group_weights(acc, "adaptive")


def test_weighted_group_advantages():
    rewards = torch.tensor([[1.1, 0.1, 1.1, 0.1], [1.1, 1.1, 1.1, 1.1]])
    acc = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv, keep, w = weighted_group_advantages(rewards, acc, mode="dynamic", sigma=4.0)
    base, _ = group_advantages(rewards)
    torch.testing.assert_close(adv, base * torch.tensor([[1.0], [0.0]]))
    assert keep.tolist() == [True, False] and w.tolist() == [1.0, 0.0]


def test_cosine_kl_beta_eq7_values():
    bmin, bmax, T = 0.001, 0.04, 1000
    assert cosine_kl_beta(0, T, bmin, bmax) == pytest.approx(bmax)
    assert cosine_kl_beta(T, T, bmin, bmax) == pytest.approx(bmin)
    assert cosine_kl_beta(T / 2, T, bmin, bmax) == pytest.approx((bmin + bmax) / 2)
    # t = T/4: bmin + 0.5 (bmax - bmin)(1 + cos(pi/4))
    assert cosine_kl_beta(250, T, bmin, bmax) == pytest.approx(bmin + 0.5 * (bmax - bmin) * (1 + math.sqrt(0.5)))
    assert cosine_kl_beta(-5, T, bmin, bmax) == pytest.approx(bmax)  # clamped
    assert cosine_kl_beta(2 * T, T, bmin, bmax) == pytest.approx(bmin)
    vals = [cosine_kl_beta(t, T, bmin, bmax) for t in range(0, T + 1, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        cosine_kl_beta(0, 0, bmin, bmax)
    with pytest.raises(ValueError):
        cosine_kl_beta(0, T, 0.1, 0.01)


def test_kl_schedule_switch():
    cos = KLSchedule("cosine", total_steps=10, beta_min=0.0, beta_max=0.1)
    st = KLSchedule("static", beta=0.02)
    assert cos(0) == pytest.approx(0.1) and cos(10) == pytest.approx(0.0)
    assert st(0) == st(1234) == static_kl_beta(7, 10, 0.02) == 0.02
    assert KLSchedule("constant", beta=0.03)(5) == 0.03  # the train config's name for it
    with pytest.raises(ValueError):
        KLSchedule("linear")


class _Source:
    """Hands out pre-scored groups; records how many prompts each round asked for."""

    def __init__(self, groups):
        self.groups = list(groups)
        self.asked = []

    def __call__(self, k):
        self.asked.append(k)
        out, self.groups = self.groups[:k], self.groups[k:]
        return out


def _g(*r):
    return torch.tensor(r)


def test_dynamic_sampler_refills_until_full():
    good, flat = _g(1.0, 0.0), _g(1.0, 1.0)
    src = _Source([good, flat, flat, flat, good, flat, good, good, good])
    s = DynamicSampler(batch_groups=4, max_extra_rounds=3)
    res = s.fill(src)
    # round 1: 4 groups, 1 good; round 2: 3 more, 2 good (1 flat); round 3: ask 1, 1 good
    assert src.asked == [4, 3, 1]
    assert len(res.groups) == 4 and all(not s.is_degenerate(g) for g in res.groups)
    assert (res.rounds, res.generated, res.filtered, res.padded, res.surplus, res.short) == (3, 8, 4, 0, 0, False)
    assert s.totals == {"generated": 8, "filtered": 4, "padded": 0, "rounds": 3}


def test_dynamic_sampler_round_limit_pad_or_short():
    flat = _g(0.5, 0.5, 0.5)
    mk = lambda: _Source([_g(0.0, 1.0, 0.0)] + [flat] * 20)  # noqa: E731
    padded = DynamicSampler(batch_groups=3, max_extra_rounds=1, pad_with_degenerate=True).fill(mk())
    assert (len(padded.groups), padded.rounds, padded.generated, padded.padded, padded.filtered) == (3, 2, 5, 2, 2)
    short = DynamicSampler(batch_groups=3, max_extra_rounds=1, pad_with_degenerate=False).fill(mk())
    assert (len(short.groups), short.short, short.filtered, short.padded) == (1, True, 4, 0)


def test_dynamic_sampler_surplus_oversample_and_exhaustion():
    groups = [_g(0.0, 1.0)] * 3 + [_g(1.0, 1.0)] * 3 + [_g(0.0, 1.0)] * 10
    src = _Source(groups)
    res = DynamicSampler(batch_groups=5, max_extra_rounds=2, oversample=2.0).fill(src)
    # round 1: 3 good + 2 flat; shortfall 2 x oversample 2 = ask 4: 1 flat + 3 good, one of them surplus
    assert src.asked == [5, 4] and len(res.groups) == 5 and (res.surplus, res.filtered) == (1, 3)
    empty = DynamicSampler(batch_groups=2, max_extra_rounds=5).fill(_Source([]))
    assert empty.rounds == 1 and empty.groups == [] and empty.short


def test_dynamic_sampler_custom_rewards_and_errors():
    groups = [{"id": i, "r": [i % 2, 1 - i % 2 if i < 3 else i % 2]} for i in range(6)]
    res = DynamicSampler(batch_groups=2, rewards_of=lambda g: g["r"]).fill(_Source(groups))
    assert [g["id"] for g in res.groups] == [0, 1]
    with pytest.raises(ValueError, match="non-finite"):
        DynamicSampler(batch_groups=1).fill(_Source([_g(float("nan"), 1.0)]))
    with pytest.raises(ValueError):
        DynamicSampler(batch_groups=0)
