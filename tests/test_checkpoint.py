"""Checkpoints: resume equals the uninterrupted run, saves are atomic and rotated, TP2-saved weights load at
TP1 (and PP2), and what cannot be resharded (distributed-optimizer state, RNG) is skipped, not garbled."""

from __future__ import annotations

import os

import pytest
import torch

from m2mega.runtime.multiproc import free_port, run_ranks
from m2mega.train.config import from_dict

# ----------------------------------------------------------------------------------------- helpers
# (test_sft_loop.py imports these)


def tiny_cfg(tmp_path=None, **sections):
    """A tiny GPT SFT config (dropout on, so RNG restore matters); ``sections`` override per section."""
    base = {
        "seed": 11,
        "model": {"family": "gpt", "hidden_dropout": 0.1, "attention_dropout": 0.1,
                  "gpt": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
                          "ffn_hidden_size": 40, "vocab_size": 66, "max_position_embeddings": 32}},
        "optimizer": {"lr": 3e-3, "min_lr": 1e-4, "weight_decay": 0.01, "clip_grad": 1.0},
        "schedule": {"train_iters": 6, "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 16,
                     "lr_warmup_iters": 2},
        "logging": {"progress": "none"},
        "checkpoint": {"save_dir": None if tmp_path is None else str(tmp_path / "ckpt"), "save_at_end": False,
                       "save_threads": 1},
        "data": {"seed": 5, "source": "synthetic"},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            base.setdefault(sec, {}).update(vals)
        else:
            base[sec] = vals
    # The gpt family's shape lives under model.gpt; callers pass shape keys flat, as above.
    model = base["model"]
    model.setdefault("family", "gpt")
    shape = {k: model.pop(k) for k in _GPT_SHAPE_KEYS if k in model}
    model["gpt"] = {**model.get("gpt", {}), **shape}
    return from_dict(base)


_GPT_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                   "vocab_size", "max_position_embeddings", "rotary_base", "untie_embeddings")


@pytest.fixture
def runtime(monkeypatch):
    """A one-rank gloo runtime in this process on a free port (other suites may run beside us)."""
    import m2mega.runtime as rt

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    info = rt.init(1, 1)
    try:
        yield info
    finally:
        rt.shutdown()


def params_of(trainer) -> dict[str, torch.Tensor]:
    from m2mega.train.checkpoint import unwrap_model

    return {n: p.detach().clone() for n, p in unwrap_model(trainer.model[0]).named_parameters()}


# ----------------------------------------------------------------------------------------- in-process


def test_resume_equals_uninterrupted_tp1(runtime, tmp_path):
    from m2mega.train.checkpoint import find_latest
    from m2mega.train.loop import Trainer
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    n, k = 6, 3
    straight_cfg = tiny_cfg(tmp_path, checkpoint={"save_dir": None})
    straight = Trainer(straight_cfg, gpt_model_provider)
    s = train(straight_cfg, gpt_model_provider, sft_forward_step, sft_data_provider, trainer=straight)
    ref_losses, ref_params = s.losses, params_of(straight)
    straight.close()
    assert len(ref_losses) == n and all(l is not None for l in ref_losses)

    cfg = tiny_cfg(tmp_path, checkpoint={"save_interval": k})
    first = train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider, stop_at=k)
    assert first.losses == ref_losses[:k]  # same seed, same data: the runs agree before the save
    assert find_latest(str(tmp_path / "ckpt"))[0] == k
    # The resumed run starts from another seed: weights, RNG and data position can only come from the
    # checkpoint, so any of them not restored shows up as a different loss curve.
    resumed_cfg = tiny_cfg(tmp_path, seed=999, checkpoint={"save_interval": k})
    resumed = Trainer(resumed_cfg, gpt_model_provider)
    second = train(resumed_cfg, gpt_model_provider, sft_forward_step, sft_data_provider, trainer=resumed)
    assert second.start_iteration == k and second.iterations == n - k
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(ref_losses[k:]), rtol=1e-6, atol=1e-7)
    got = params_of(resumed)
    worst = max((got[name] - ref).abs().max().item() for name, ref in ref_params.items())
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    resumed.close()
    # The run config travels with every checkpoint.
    import yaml

    saved = yaml.safe_load(open(tmp_path / "ckpt" / "iter_0000006" / "config.yaml"))
    assert saved["seed"] == 999 and saved["schedule"]["train_iters"] == n


def test_resume_refuses_a_changed_schedule_and_restores_optimizer(runtime, tmp_path):
    from m2mega.train.loop import Trainer
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    cfg = tiny_cfg(tmp_path, schedule={"train_iters": 2, "lr_warmup_iters": 1}, checkpoint={"save_at_end": True})
    train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider)
    longer = tiny_cfg(tmp_path, schedule={"train_iters": 4, "lr_warmup_iters": 1})
    t = Trainer(longer, gpt_model_provider)
    before = params_of(t)
    with pytest.raises(ValueError, match=r"LR schedule differs.*lr_decay_steps.*\(2, 4\)"):
        t.resume(sft_data_provider(longer, "train"))
    assert all(torch.equal(before[n], p) for n, p in params_of(t).items()), "a refused resume modified weights"
    t.close()
    ok = tiny_cfg(tmp_path, schedule={"train_iters": 4, "lr_decay_iters": 2, "lr_warmup_iters": 1})
    t = Trainer(ok, gpt_model_provider)
    ck = t.resume(sft_data_provider(ok, "train"))
    assert ck.iteration == 2 and ck.loaded_optimizer and ck.loaded_rng
    assert t.scheduler.num_steps == 2
    t.close()


def test_resume_with_override_scheduler_adopts_the_new_lr(runtime, tmp_path):
    """A changed peak LR on resume is refused naming the flag, and with checkpoint.override_scheduler the
    resumed steps run at the new schedule's LR (megatron keeps a max_lr in every optimizer param group,
    restored from the checkpoint: adopting only the scheduler's value would keep the old peak)."""
    from m2mega.train.loop import Trainer
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    const = {"train_iters": 4, "lr_warmup_iters": 0, "lr_decay_style": "constant"}
    cfg = tiny_cfg(tmp_path, schedule=const, optimizer={"lr": 1e-3, "min_lr": 1e-3},
                   checkpoint={"save_at_end": True})
    train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider, stop_at=2)
    new_lr = {"lr": 4e-3, "min_lr": 4e-3}
    refused = tiny_cfg(tmp_path, schedule=const, optimizer=new_lr)
    t = Trainer(refused, gpt_model_provider)
    with pytest.raises(ValueError, match=r"max_lr.*checkpoint\.override_scheduler=true"):
        t.resume(sft_data_provider(refused, "train"))
    t.close()
    adopted = tiny_cfg(tmp_path, schedule=const, optimizer=new_lr, checkpoint={"override_scheduler": True})
    t = Trainer(adopted, gpt_model_provider)
    ck = t.resume(sft_data_provider(adopted, "train"))
    assert ck.iteration == 2 and ck.loaded_optimizer
    it = iter(sft_data_provider(adopted, "train"))
    t.train_step(it, sft_forward_step)
    assert t.lr == pytest.approx(4e-3), f"resumed at lr {t.lr}, not the config's 4e-3"
    assert all(g.get("max_lr", 4e-3) == pytest.approx(4e-3) for g in t.optimizer.param_groups)
    t.close()


def _fake_ckpt(root, it, complete=True):
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    if complete:
        (d / "metadata.json").write_text("{}")
    return d


def test_latest_selection_ignores_partial_saves(tmp_path):
    from m2mega.train.checkpoint import _prune, find_latest, list_checkpoints

    root = tmp_path / "ck"
    assert find_latest(str(root)) is None
    for it in (2, 4, 6):
        _fake_ckpt(root, it)
    _fake_ckpt(root, 8, complete=False)  # a directory without dist-ckpt metadata is not a checkpoint
    (root / "iter_0000010.tmp").mkdir()  # a save that crashed before its rename
    assert find_latest(str(root)) == (6, str(root / "iter_0000006"))
    (root / "latest").write_text("4\n")
    # A marker lagging behind (a crash between rename and marker update) never hides the newest complete save
    assert find_latest(str(root))[0] == 6
    (root / "latest").write_text("10\n")
    assert find_latest(str(root))[0] == 6  # ... nor does one naming an incomplete save
    (root / "latest").write_text("garbage")
    assert find_latest(str(root))[0] == 6
    _prune(str(root), keep_last=2, keep=str(root / "iter_0000006"))
    assert [it for it, _ in list_checkpoints(str(root))] == [4, 6]
    assert not (root / "iter_0000010.tmp").exists()


def test_save_is_atomic_and_keeps_last_k(runtime, tmp_path):
    from m2mega.train.checkpoint import LATEST, list_checkpoints
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "iter_0000001.tmp").mkdir()  # leftovers of a crashed save are cleaned up by the next save
    cfg = tiny_cfg(tmp_path, schedule={"train_iters": 4}, checkpoint={"save_interval": 1, "keep_last": 2},
                   model={"num_layers": 1})
    train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider)
    assert [it for it, _ in list_checkpoints(str(root))] == [3, 4]
    assert sorted(os.listdir(root)) == ["iter_0000003", "iter_0000004", LATEST]
    assert (root / LATEST).read_text().strip() == "4"
    files = set(os.listdir(root / "iter_0000004"))
    assert {"metadata.json", "common.pt", "config.yaml"} <= files


# ----------------------------------------------------------------------------------------- multi-rank


def _reshard_body(root: str):
    """TP2 (+ sequence parallel) trains and saves; TP1 (DP2) and PP2 load its weights."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    import m2mega.runtime as rt
    from m2mega.train.loop import Trainer
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    out = {}

    def relayout(tp, pp):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1)

    def eval_loss(trainer, cfg):
        return trainer.evaluate(iter(sft_data_provider(cfg, "valid")), sft_forward_step, 1)["lm loss"]

    rt.init(2, 1)
    cfg = tiny_cfg(parallel={"tp": 2, "sequence_parallel": True},
                   model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                   schedule={"train_iters": 2, "lr_warmup_iters": 1},
                   checkpoint={"save_dir": root, "save_at_end": True})
    t = Trainer(cfg, gpt_model_provider)
    s = train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider, trainer=t)
    out["tp2_losses"] = s.losses
    out["tp2_eval"] = eval_loss(t, cfg)
    t.close()
    del t
    for tp, pp in ((1, 1), (1, 2)):
        relayout(tp, pp)
        cfg2 = tiny_cfg(seed=77, parallel={"tp": tp, "pp": pp},
                        model={"hidden_dropout": 0.0, "attention_dropout": 0.0},
                        schedule={"train_iters": 3, "lr_warmup_iters": 1, "lr_decay_iters": 2},
                        checkpoint={"load_dir": root, "save_dir": None, "override_scheduler": False})
        t = Trainer(cfg2, gpt_model_provider)
        ck = t.resume(sft_data_provider(cfg2, "train"))
        loaded_eval = eval_loss(t, cfg2)
        res = t.train_step(iter(sft_data_provider(cfg2, "train")), sft_forward_step)
        out[f"tp{tp}pp{pp}"] = {
            "iteration": ck.iteration, "loaded_optimizer": ck.loaded_optimizer, "loaded_rng": ck.loaded_rng,
            "eval": loaded_eval, "step_loss": res.loss, "skipped": res.skipped,
        }
        t.close()
        del t
    return out


@pytest.mark.multirank
@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_and_pp2(tmp_path):
    results = run_ranks(_reshard_body, 2, args=(str(tmp_path / "ckpt"),), timeout_s=600)
    r0, r1 = results
    assert r0["tp2_losses"] == r1["tp2_losses"] and all(l is not None for l in r0["tp2_losses"])
    ref = r0["tp2_eval"]
    for layout in ("tp1pp1", "tp1pp2"):
        for r in (r0, r1):
            got = r[layout]
            # Weights resharded from TP2 give the TP2 model's loss on the same held-out batch.
            assert abs(got["eval"] - ref) / ref < 1e-5, f"{layout}: eval loss {got['eval']} vs TP2 {ref}"
            assert got["iteration"] == 2
            # Distributed-optimizer state and RNG are layout-bound: skipped, not garbled.
            assert got["loaded_optimizer"] is False and got["loaded_rng"] is False
            assert got["step_loss"] is not None and not got["skipped"]
