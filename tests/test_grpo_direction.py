"""Directional checks of one GRPO update through the real runner (advantages -> THD packs -> fused loss ->
megatron schedule -> optimizer) on fixed, pre-scored rollouts of the tiny Qwen2.5-VL:

* rollouts with a positive advantage gain log-probability, negative ones lose it (TP1; TP2 with sequence
  parallelism, which also pads the packs to a multiple of TP; with and without the KL term);
* Eq. 6 weights scale each group's share of the step: with plain SGD the update of a two-group batch is
  exactly the token-weighted, w-weighted sum of the one-group updates;
* groups whose rollouts all scored the same leave the weights unchanged (dropped: no update, warned and
  counted, an error after ``grpo.max_no_signal_steps`` in a row; kept: zero gradient).
"""

from __future__ import annotations

import pytest
import torch

from m2mega.runtime.multiproc import run_ranks

G = 4
# two informative groups with different mean accuracy (Eq. 6 weights 4*0.5*0.5 = 1 and 4*0.25*0.75 = 0.75)
REWARDS = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


@pytest.fixture(scope="module")
def rl_prefix(tmp_path_factory) -> str:
    """A small preprocessed RL set: the config's tokenizer and vocabulary (the prompts come from the test)."""
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.testing.sample_files import write_sample_jsonl
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer

    d = tmp_path_factory.mktemp("grpo_direction")
    write_sample_jsonl(str(d / "rows.jsonl"), 4, seed=3, rl_fraction=1.0, n_images=0)
    tok = build_tiny_qwen_tokenizer(str(d / "tok"), vocab_size=300)
    preprocess([str(d / "rows.jsonl")], str(d / "rl"), PreprocessConfig(
        tokenizer_model=tok, seq_length=256, progress=False, system_prompt=None))
    return str(d / "rl")


def _prompts():
    from m2mega.data.indexed import SampleInfo
    from m2mega.data.loader import RLPrompt

    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate((9, 14)):
        toks = torch.randint(0, 190, (n,), generator=g)
        info = SampleInfo(index=i, id=f"p{i}", answer="1", task=("general", "spatial")[i], answer_type="number",
                          difficulty=0.5, quality=1.0, is_rl=True, n_tokens=0, prompt_len=0, file="x", line=i + 1)
        pos = torch.arange(n).expand(3, n).clone()
        out.append(RLPrompt(index=i, prompt_tokens=toks, position_ids=pos, rope_delta=0, pixel_values=None,
                            image_grid_thw=torch.zeros(0, 3, dtype=torch.long), info=info))
    return out


def _fixed_rollouts(prompts, rewards):
    """Pre-scored rollouts: response tokens of positive- and negative-reward rollouts come from disjoint
    token ranges, so raising one set does not raise the other through shared tokens."""
    from m2mega.rl.rollout import Rollouts

    g = torch.Generator().manual_seed(2)
    resp, flat = [], [x for row in rewards for x in row]
    for k, r in enumerate(flat):  # rollout k's two candidates do not depend on the rewards
        good, bad = torch.randint(10, 90, (3 + k % 4,), generator=g), torch.randint(100, 180, (3 + k % 4,), generator=g)
        resp.append(good if r > 0.5 else bad)
    n = len(flat)
    t = torch.tensor(flat)
    return Rollouts(prompts=list(prompts), group_size=G, response_tokens=resp, finished=torch.ones(n, dtype=torch.bool),
                    texts=[""] * n, rewards=t.clone(), accuracy=t.clone(), correct=t > 0.5, format_ok=torch.ones(n),
                    repetition=torch.zeros(n))


def _cfg(prefix: str, tp: int, sp: bool, beta: float, weighting: str = "static", drop: bool = True, max_no_signal: int = 20):
    from m2mega.train.config import from_dict

    return from_dict({
        "mode": "grpo", "seed": 7,
        "model": {"family": "qwen25vl", "preset": "tiny"},
        "parallel": {"tp": tp, "pp": 1, "sequence_parallel": sp, "use_distributed_optimizer": False},
        # plain SGD without clipping: the update is -lr * grad, linear in the loss (what Eq. 6 scaling needs)
        "optimizer": {"optimizer": "sgd", "sgd_momentum": 0.0, "lr": 0.5, "min_lr": 0.5, "clip_grad": 0.0,
                      "weight_decay": 0.0, "precision": "fp32"},
        "schedule": {"train_iters": 100, "seq_length": 256, "lr_decay_style": "constant"},
        "checkpoint": {"save_dir": None},
        "logging": {"progress": "none"},
        "data": {"train_prefix": prefix},  # tokenizer / vocabulary; the runner gets its prompts from the test
        "grpo": {"prompts_per_step": 2, "group_size": G, "kl_schedule": "constant", "beta": beta,
                 "advantage_weighting": weighting, "sigma": 4.0, "drop_zero_variance": drop,
                 "max_no_signal_steps": max_no_signal},
    })


def _runner(cfg, rewards):
    from m2mega.train.families import get_model_family
    from m2mega.train.grpo_runner import GRPORunner, frozen_copy
    from m2mega.train.loop import Trainer

    fam = get_model_family("qwen25vl")
    trainer = Trainer(cfg, fam.provider)  # seeded: every call builds the same initial weights
    ref = frozen_copy(trainer.model[0], lambda: fam.provider(cfg)) if cfg.grpo.uses_kl() else None
    prompts = _prompts()[: len(rewards)]
    runner = GRPORunner(cfg, trainer, lambda step: prompts, lambda ids: "", eos_token_id=0, pad_token_id=0,
                        ref_policy=ref)
    fixed = _fixed_rollouts(prompts, rewards)
    runner._rollouts = lambda prompts, seed: fixed  # the rollout + scoring stage is replaced by fixed data
    return runner, fixed


def _seq_logprobs(runner, r) -> torch.Tensor:
    """Summed log pi(response) per rollout under the current policy."""
    from m2mega.train.grpo_update import split_into_microbatches

    cfg = runner.cfg
    n = r.n
    zeros = torch.zeros(n)
    pad = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    mbs = split_into_microbatches(r, range(n), cfg.schedule.seq_length, zeros, zeros, pad_to_multiple_of=pad)
    out = torch.zeros(n)
    for mb, lp in zip(mbs, runner._forward_logprobs(runner.policy, mbs)):
        cu = mb.cu_seqlens.tolist()
        for j, i in enumerate(mb.sample_indices.tolist()):
            out[i] = float((lp[cu[j] : cu[j + 1]] * mb.loss_mask[cu[j] : cu[j + 1]]).sum())
    return out


def _params(runner) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for p in runner.policy.parameters()])


def _direction_body(prefix: str, tp: int, sp: bool):
    import m2mega.runtime as rt

    rt.init(tp, 1)
    out = {}
    for beta in (0.0, 0.05):
        runner, r = _runner(_cfg(prefix, tp, sp, beta), REWARDS)
        before = _seq_logprobs(runner, r)
        stats = runner.step()
        after = _seq_logprobs(runner, r)
        adv = runner._advantages(r)[0]
        out[beta] = {"delta": after - before, "adv": adv, "updates": stats.metrics["updates"],
                     "loss": stats.metrics.get("loss")}
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_update_moves_logprobs_with_the_advantage_sign(rl_prefix, tp, sp):
    res = run_ranks(_direction_body, tp, args=(rl_prefix, tp, sp), timeout_s=600)
    for beta, d in res[0].items():
        assert d["updates"] == 1 and d["loss"] is not None, d
        pos, neg = d["adv"] > 0, d["adv"] < 0
        assert pos.sum() == 3 and neg.sum() == 5, d["adv"]
        assert (d["delta"][pos] > 0).all() and (d["delta"][neg] < 0).all(), (beta, d["delta"], d["adv"])
    if tp == 2:  # TP ranks of the replica agree
        for beta in res[0]:
            assert torch.allclose(res[0][beta]["delta"], res[1][beta]["delta"], atol=1e-5)


def _weights_body(prefix: str):
    import m2mega.runtime as rt
    from m2mega.train.grpo_update import split_into_microbatches

    rt.init(1, 1)
    deltas, tokens = {}, {}
    # one group alone: the other made degenerate (dropped), so every rollout keeps its prompt and tokens
    for name, rewards, weighting in (("g0", [REWARDS[0], [0.0] * G], "static"),
                                     ("g1", [[0.0] * G, REWARDS[1]], "static"),
                                     ("both_dynamic", REWARDS, "dynamic"), ("both_static", REWARDS, "static")):
        runner, r = _runner(_cfg(prefix, 1, False, 0.0, weighting), rewards)
        p0 = _params(runner)
        runner.step()
        deltas[name] = _params(runner) - p0
        w = torch.ones(r.n)
        mb = split_into_microbatches(r, range(r.n), 10_000, w, w)[0]
        tokens[name] = [float(mb.loss_mask[mb.cu_seqlens[k * G] : mb.cu_seqlens[(k + 1) * G]].sum())
                        for k in range(len(rewards))]
    return {"deltas": deltas, "tokens": tokens}


@pytest.mark.multirank
def test_eq6_weights_scale_each_groups_share_of_the_step(rl_prefix):
    res = run_ranks(_weights_body, 1, args=(rl_prefix,), timeout_s=600)[0]
    d, n = res["deltas"], res["tokens"]
    n0, n1 = n["both_static"]  # response tokens of group 0 and group 1
    assert n["g0"][0] == n0 and n["g1"][1] == n1
    # token-level aggregation: one step over both groups = token-weighted mean of the one-group steps ...
    static = (n0 * d["g0"] + n1 * d["g1"]) / (n0 + n1)
    assert torch.allclose(d["both_static"], static, rtol=1e-3, atol=1e-6), (d["both_static"] - static).abs().max()
    # ... and Eq. 6 scales each group's share by w = sigma * acc * (1 - acc): 1.0 for group 0, 0.75 for group 1
    dynamic = (1.0 * n0 * d["g0"] + 0.75 * n1 * d["g1"]) / (n0 + n1)
    assert torch.allclose(d["both_dynamic"], dynamic, rtol=1e-3, atol=1e-6), (d["both_dynamic"] - dynamic).abs().max()
    assert d["g0"].abs().max() > 1e-4 and d["g1"].abs().max() > 1e-4


def _zero_adv_body(prefix: str):
    import m2mega.runtime as rt

    rt.init(1, 1)
    flat = [[0.0] * G, [1.0] * G]
    out = {}
    # dropped (the default): no update at all; counted; the 2nd such step in a row is an error
    runner, _ = _runner(_cfg(prefix, 1, False, 0.05, max_no_signal=2), flat)
    p0 = _params(runner)
    s = runner.step()
    out["dropped_equal"] = bool(torch.equal(_params(runner), p0))
    out["dropped_metrics"] = dict(s.metrics)
    try:
        runner.step()
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    # kept (drop_zero_variance: false): an update runs, with an exactly zero gradient
    runner, _ = _runner(_cfg(prefix, 1, False, 0.0, drop=False), flat)
    p0 = _params(runner)
    s = runner.step()
    out["kept_equal"] = bool(torch.equal(_params(runner), p0))
    out["kept_metrics"] = dict(s.metrics)
    return out


@pytest.mark.multirank
def test_zero_advantage_groups_leave_weights_unchanged(rl_prefix):
    res = run_ranks(_zero_adv_body, 1, args=(rl_prefix,), timeout_s=600)[0]
    assert res["dropped_equal"] and res["dropped_metrics"]["updates"] == 0, res
    assert res["dropped_metrics"]["no_signal_steps"] == 1, res
    assert res["error"] and "2 GRPO steps in a row had no informative group" in res["error"], res
    assert res["kept_equal"] and res["kept_metrics"]["updates"] == 1, res
