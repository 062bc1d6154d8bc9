"""The SFT loop: loss goes down, LR follows warmup + cosine, non-finite steps are skipped without touching
weights or optimizer state, the per-token loss does not depend on the micro-batch split, recompute and
freezing work, metrics reach TensorBoard, and the CLI runs end to end."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from test_checkpoint import params_of, runtime, tiny_cfg  # noqa: F401 (fixture)


def _inner_optimizer_state(trainer) -> dict:
    out = {}
    for oi, o in enumerate(trainer.optimizer.chained_optimizers):
        inner = o.optimizer
        for gi, g in enumerate(inner.param_groups):
            for pi, p in enumerate(g["params"]):
                for k, v in inner.state.get(p, {}).items():
                    out[(oi, gi, pi, k)] = v.detach().clone() if torch.is_tensor(v) else v
                out[(oi, gi, pi, "main_param")] = p.detach().clone()
    return out


def _trainer(cfg):
    from m2mega.train.loop import Trainer
    from m2mega.testing.tiny_gpt import gpt_flops_per_token, gpt_model_provider

    return Trainer(cfg, gpt_model_provider, flops_per_token=gpt_flops_per_token)


def test_short_sft_lowers_loss_lr_schedule_and_tensorboard(runtime, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_flops_per_token, gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    n, warm, lr, min_lr = 24, 3, 3e-3, 1e-4
    cfg = tiny_cfg(
        tmp_path,
        model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
        optimizer={"lr": lr, "min_lr": min_lr, "weight_decay": 0.0},
        schedule={"train_iters": n, "lr_warmup_iters": warm, "global_batch_size": 8, "micro_batch_size": 4},
        logging={"tensorboard_dir": str(tmp_path / "tb"), "peak_tflops": 1.0, "progress": "plain",
                 "log_interval": 4},
        sft={"eval_interval": n, "eval_iters": 1},
    )
    t = _trainer(cfg)
    lrs = []
    orig = t.train_step

    def spy(*a, **k):
        r = orig(*a, **k)
        lrs.append(r.lr)
        assert not r.skipped and r.num_tokens == 8 * cfg.schedule.seq_length
        return r

    t.train_step = spy
    s = train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider, trainer=t,
              flops_per_token=gpt_flops_per_token)
    t.close()
    first, last = sum(s.losses[:3]) / 3, sum(s.losses[-4:]) / 4
    assert first > 0.9 * math.log(cfg.model.gpt.vocab_size), f"untrained loss {first} should be near ln(V)"
    assert last < first - 0.7, f"loss did not go down: first {first:.3f}, last {last:.3f} ({s.losses})"
    assert s.eval_metrics["lm loss"] < first - 0.5  # held-out samples improve too
    # megatron's schedule: the step at iteration i uses lr(i - 1); linear warmup from 0, then cosine.
    for i, got in enumerate(lrs):
        if i <= warm:
            want = lr * i / warm
        else:
            want = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (i - warm) / (n - warm)))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"step {i + 1}: lr {got} vs {want}"
    out = capsys.readouterr().out
    assert "iter 4: loss" in out and "tok/s" in out and "mfu" in out and "eval @ 24: lm loss" in out
    events = glob.glob(str(tmp_path / "tb" / "events.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/lm loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/skipped_steps", "eval/lm loss"):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    logged = [e.value for e in acc.Scalars("train/lm loss")]
    assert logged == pytest.approx([s.losses[i - 1] for i in range(4, n + 1, 4)])
    mfu = acc.Scalars("train/mfu")[-1].value
    tps = acc.Scalars("train/tokens_per_s")[-1].value
    assert mfu == pytest.approx(gpt_flops_per_token(cfg) * tps / 1e12, rel=1e-5)


@pytest.mark.parametrize("distributed", [True, False])
def test_nonfinite_step_is_skipped_and_changes_nothing(runtime, distributed):
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    cfg = tiny_cfg(parallel={"use_distributed_optimizer": distributed}, schedule={"train_iters": 10})
    t = _trainer(cfg)
    it = iter(sft_data_provider(cfg, "train"))
    for _ in range(2):
        assert not t.train_step(it, sft_forward_step).skipped
    before_params, before_opt = params_of(t), _inner_optimizer_state(t)
    before_steps, before_lr = t.scheduler.num_steps, t.lr
    calls = {"n": 0}

    def poisoned(data_iterator, model):
        out, loss_func = sft_forward_step(data_iterator, model)
        calls["n"] += 1
        bad = calls["n"] == 2  # only the second micro-batch of the step goes non-finite

        def wrapped(x):
            loss, count, rep = loss_func(x)
            return (loss * float("inf") if bad else loss), count, rep

        return out, wrapped

    res = t.train_step(it, poisoned)
    assert res.skipped and t.skipped_steps == 1 and res.iteration == 3
    after_params, after_opt = params_of(t), _inner_optimizer_state(t)
    for name, p in before_params.items():
        assert torch.equal(p, after_params[name]), f"{name} changed in a skipped step"
    assert before_opt.keys() == after_opt.keys()
    for k, v in before_opt.items():
        same = torch.equal(v, after_opt[k]) if torch.is_tensor(v) else v == after_opt[k]
        assert same, f"optimizer state {k} changed in a skipped step"
    assert t.scheduler.num_steps == before_steps and t.lr == before_lr
    # Training goes on normally afterwards, from untouched weights.
    nxt = t.train_step(it, sft_forward_step)
    assert not nxt.skipped and math.isfinite(nxt.loss) and t.skipped_steps == 1
    assert any(not torch.equal(p, params_of(t)[n]) for n, p in after_params.items())
    t.close()


def test_per_token_loss_does_not_depend_on_the_micro_batch_split(runtime):
    """One global batch of 4 rows as 1x4, 2x2 and 4x1 micro-batches: same loss, same update."""
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    results = []
    for mbs in (4, 2, 1):
        # SGD: the update is linear in the gradient (Adam's first step, g/|g|, amplifies rounding noise).
        cfg = tiny_cfg(model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                       optimizer={"optimizer": "sgd", "lr": 0.5, "min_lr": 0.0, "weight_decay": 0.0},
                       parallel={"use_distributed_optimizer": False},
                       schedule={"micro_batch_size": mbs, "global_batch_size": 4, "lr_warmup_iters": 0})
        t = _trainer(cfg)
        r = t.train_step(iter(sft_data_provider(cfg, "train")), sft_forward_step)
        results.append((r.loss, r.grad_norm, params_of(t)))
        t.close()
    loss0, gn0, p0 = results[0]
    for loss, gn, p in results[1:]:
        assert loss == pytest.approx(loss0, rel=1e-6) and gn == pytest.approx(gn0, rel=1e-5)
        worst = max((p[n] - p0[n]).abs().max().item() for n in p0)
        assert worst < 1e-6, f"update differs by {worst} across micro-batch splits"


def test_recompute_gives_the_same_step(runtime):
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    out = {}
    for mode in ("none", "full", "selective"):
        cfg = tiny_cfg(model={"recompute": mode})  # dropout on: recompute must replay the same masks
        t = _trainer(cfg)
        it = iter(sft_data_provider(cfg, "train"))
        losses = [t.train_step(it, sft_forward_step).loss for _ in range(2)]
        out[mode] = (losses, params_of(t))
        t.close()
    for mode in ("full", "selective"):
        assert out[mode][0] == pytest.approx(out["none"][0], rel=1e-6)
        worst = max((out[mode][1][n] - out["none"][1][n]).abs().max().item() for n in out["none"][1])
        assert worst < 1e-6, f"recompute={mode} changes the update by {worst}"


def test_kernels_section_configures_the_fused_kernels(runtime):
    from m2mega.kernels import KernelConfig, get_kernel_config, set_kernel_config

    t = _trainer(tiny_cfg(kernels={"use_torch": True, "check_inputs": False, "bwd_slab_bytes": 1 << 20}))
    try:
        k = get_kernel_config()
        assert k.use_torch and not k.check_inputs and k.bwd_slab_bytes == 1 << 20
    finally:
        t.close()
        set_kernel_config(KernelConfig())
    t = _trainer(tiny_cfg())  # a later run without the section gets the defaults back
    t.close()
    assert get_kernel_config() == KernelConfig()


def test_freeze_keeps_prefix_fixed(runtime):
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    # The GPT stand-in has no vision tower; freezing its embedding exercises the same path.
    cfg = tiny_cfg(model={"freeze_vision": True, "vision_prefix": "embedding."})
    t = _trainer(cfg)
    before = params_of(t)
    it = iter(sft_data_provider(cfg, "train"))
    for _ in range(2):
        t.train_step(it, sft_forward_step)
    after = params_of(t)
    assert torch.equal(before["embedding.word_embeddings.weight"], after["embedding.word_embeddings.weight"])
    assert not torch.equal(before["output_layer.weight"], after["output_layer.weight"])
    n_opt = sum(p.numel() for o in t.optimizer.chained_optimizers for g in o.optimizer.param_groups
                for p in g["params"])
    n_all = sum(p.numel() for p in before.values())
    assert n_opt == n_all - before["embedding.word_embeddings.weight"].numel()  # no state for frozen
    t.close()
    with pytest.raises(ValueError, match="no parameter name starts with model.vision_prefix 'vision_model.'"):
        _trainer(tiny_cfg(model={"freeze_vision": True}))


def test_synthetic_loader_is_deterministic_and_dp_invariant():
    from m2mega.testing.tiny_gpt import SyntheticSFTLoader

    one = SyntheticSFTLoader(66, 16, 4, dp_rank=0, dp_size=1, seed=3)
    rows = next(iter(one))
    halves = [next(iter(SyntheticSFTLoader(66, 16, 2, dp_rank=r, dp_size=2, seed=3))) for r in (0, 1)]
    assert torch.equal(torch.cat([h.tokens for h in halves]), rows.tokens)
    assert torch.equal(torch.cat([h.loss_mask for h in halves]), rows.loss_mask)
    # Targets are the answer only: after SEP + the first (random) answer token, each label is succ(token).
    for b in range(4):
        m = rows.loss_mask[b].bool()
        assert m.any() and not m[0]
        src, tgt = rows.tokens[b][m], rows.labels[b][m]
        assert torch.equal(one.succ[src - 3], tgt)
    state = one.state_dict()
    again = SyntheticSFTLoader(66, 16, 4, seed=3)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again)).tokens, next(iter(one)).tokens)
    with pytest.raises(ValueError, match="settings differ"):
        SyntheticSFTLoader(66, 16, 4, seed=4).load_state_dict(state)


def test_masked_loss_counts_assistant_tokens_only():
    from m2mega.train.sft import masked_next_token_loss

    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    total, count, rep = masked_next_token_loss(per_tok.nan_to_num(0.0), mask)
    assert total.item() == 9.0 and count.item() == 3 and rep["lm loss"].tolist() == [9.0, 3.0]
    with pytest.raises(ValueError, match="loss has 6 positions but loss_mask has 2"):
        masked_next_token_loss(per_tok, mask[:, :1])


def test_cli_prints_config_trains_and_checkpoints(tmp_path, monkeypatch, capsys):
    import yaml

    from m2mega.runtime.multiproc import free_port
    from m2mega.train.config import to_dict
    from m2mega.train.sft import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_cfg(tmp_path))))
    rc = main(["--config", str(cfg_path), "--schedule.train_iters=3", "--schedule.lr_warmup_iters=1",
               "--checkpoint.save_at_end=true", "--logging.progress=tqdm"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# config" in out and "ednm_lambda: 2.0" in out and "train_iters: 3" in out  # printed in full
    assert "done: 3 iterations" in out
    saved = yaml.safe_load(open(tmp_path / "ckpt" / "iter_0000003" / "config.yaml"))
    assert saved["schedule"]["train_iters"] == 3
    assert os.path.isfile(tmp_path / "ckpt" / "latest")
