"""Checkpoints that never lie or run foreign code (issue 14, items 1, 2 and 5).

A planted ``.metadata`` or a payload in the saved RNG object is refused on every load path before it can
run (a marker file proves nothing ran); a truncated ``.distcp`` falls back to the previous complete
checkpoint; a save of an existing iteration replaces it; a ``resume=false`` run refuses a used
``save_dir``; a changed architecture fails before the model is built; a diverged run stops and keeps the
last checkpoint saved before the trouble.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys

import pytest
import torch

from test_checkpoint import _fake_ckpt, params_of, runtime, tiny_cfg  # noqa: F401 (runtime is a fixture)


class _Payload:
    """Unpickling this creates ``path``: the proof that a checkpoint ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(cfg):
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    return train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider)


def _gpt_model(cfg):
    from m2mega.runtime import seed_everything
    from m2mega.testing.tiny_gpt import gpt_model_provider

    seed_everything(cfg.seed)
    return gpt_model_provider(cfg)


def _rng_entry(ckpt: str):
    from m2mega.convert.checks import read_dcp_metadata

    md = read_dcp_metadata(ckpt)
    return next((idx, info) for idx, info in md.storage_data.items() if idx.fqn.startswith("rng_state"))


def test_planted_payloads_never_run_on_any_load_path(runtime, tmp_path):
    from m2mega.convert import hf_mcore
    from m2mega.convert.checks import UnsafeCheckpoint
    from m2mega.train.families import load_policy
    from m2mega.train.checkpoint import load_checkpoint, load_model_weights
    from m2mega.train.loop import Trainer
    from m2mega.testing.tiny_gpt import gpt_model_provider

    cfg = tiny_cfg(tmp_path, schedule={"train_iters": 1, "lr_warmup_iters": 0}, checkpoint={"save_at_end": True})
    good = _train(cfg).last_checkpoint
    marker = tmp_path / "PWNED"

    # 1) .metadata: torch DCP would read it with plain pickle.load.
    meta_dir = tmp_path / "meta" / "iter_0000001"
    shutil.copytree(good, meta_dir)
    (meta_dir / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    init_cfg = tiny_cfg(None, model={"init_from": str(meta_dir.parent)})
    paths = {
        "init_from": lambda: Trainer(init_cfg, gpt_model_provider),
        "resume": lambda: load_checkpoint(str(meta_dir), [_gpt_model(cfg)], load_optimizer=False),
        "eval / score_difficulty (load_policy)": lambda: load_policy(cfg, str(meta_dir)),
        "weights of a save root": lambda: load_model_weights(str(meta_dir.parent), [_gpt_model(cfg)]),
        "HF export": lambda: hf_mcore._saved_global_shapes(str(meta_dir)),
    }
    for name, load in paths.items():
        with pytest.raises(UnsafeCheckpoint, match=r"\.metadata.*refusing to unpickle (builtins|io)\.open"):
            load()
        assert not marker.exists(), f"{name} ran code from a planted .metadata"

    # 2) the RNG state object inside the .distcp: megatron's planner reads it with weights_only=False.
    rng_dir = tmp_path / "rng" / "iter_0000001"
    shutil.copytree(good, rng_dir)
    idx, info = _rng_entry(str(rng_dir))
    payload = pickle.dumps(_Payload(str(marker)), protocol=2)
    assert len(payload) <= info.length
    with open(rng_dir / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(payload + b"\0" * (info.length - len(payload)))
    model = _gpt_model(cfg)
    with pytest.raises(UnsafeCheckpoint, match=rf"{info.relative_path} \(object 'rng_state.*refusing to unpickle"):
        load_checkpoint(str(rng_dir), [model], load_optimizer=False, load_rng=True)
    assert not marker.exists(), "resume ran code from the saved RNG state"

    # The untouched checkpoint still loads everything, RNG included (stored as tensors + plain data).
    ck = load_checkpoint(good, [_gpt_model(cfg)], load_optimizer=False, load_rng=True)
    assert ck.loaded_rng and ck.iteration == 1


def test_truncated_distcp_falls_back_then_fails_naming_the_file(runtime, tmp_path, caplog):
    from m2mega.convert.checks import CorruptCheckpoint
    from m2mega.train.checkpoint import load_model_weights
    from m2mega.train.loop import Trainer
    from m2mega.testing.tiny_gpt import gpt_model_provider
    from m2mega.train.sft import sft_data_provider

    cfg = tiny_cfg(tmp_path, schedule={"train_iters": 2, "lr_warmup_iters": 1}, checkpoint={"save_interval": 1, "keep_last": 0})
    _train(cfg)
    root = tmp_path / "ckpt"
    newest = root / "iter_0000002" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    t = Trainer(cfg, gpt_model_provider)
    with caplog.at_level(logging.WARNING, logger="m2mega.train.checkpoint"):
        ck = t.resume(sft_data_provider(cfg, "train"))
    t.close()
    assert ck.iteration == 1 and ck.path.endswith("iter_0000001")
    assert any(str(newest) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)

    older = root / "iter_0000001" / "__0_0.distcp"
    older.write_bytes(older.read_bytes()[:100])
    with pytest.raises(CorruptCheckpoint, match=r"every checkpoint is damaged.*iter_0000001/__0_0\.distcp: truncated"):
        load_model_weights(str(root), [_gpt_model(cfg)])


def test_a_save_replaces_an_existing_iteration_and_resume_takes_the_newest(runtime, tmp_path):
    from m2mega.train.checkpoint import LATEST, find_latest, load_model_weights, unwrap_model
    from m2mega.train.loop import Trainer
    from m2mega.testing.tiny_gpt import gpt_model_provider

    cfg = tiny_cfg(tmp_path)
    t = Trainer(cfg, gpt_model_provider)
    t.iteration = 3
    t.save()
    with torch.no_grad():
        for p in unwrap_model(t.model[0]).parameters():
            p.add_(1.0)
    want = params_of(t)
    t.save()  # same iteration, new weights: must replace, not be skipped
    t.close()
    root = tmp_path / "ckpt"
    assert sorted(os.listdir(root)) == ["iter_0000003", LATEST]
    model = _gpt_model(cfg)
    load_model_weights(str(root / "iter_0000003"), [model])
    got = dict(unwrap_model(model).named_parameters())
    assert all(torch.equal(got[n], v) for n, v in want.items()), "iter_0000003 still holds the old weights"

    # A marker lagging behind a complete save (crash between rename and marker update) is not trusted.
    _fake_ckpt(tmp_path / "lag", 10)
    _fake_ckpt(tmp_path / "lag", 12)
    (tmp_path / "lag" / LATEST).write_text("10\n")
    assert find_latest(str(tmp_path / "lag"))[0] == 12


def test_resume_false_into_a_used_save_dir_is_refused(tmp_path):
    from m2mega.train.checkpoint import check_save_dir
    from m2mega.train.config import ConfigError

    _fake_ckpt(tmp_path / "ckpt", 7)
    check_save_dir(tiny_cfg(tmp_path))  # resuming from it is fine
    with pytest.raises(ConfigError, match=r"save_dir .*ckpt already holds checkpoints \(iter_0000007.*"
                                          r"checkpoint\.resume=false.*checkpoint\.resume=true"):
        check_save_dir(tiny_cfg(tmp_path, checkpoint={"resume": False}))
    with pytest.raises(ConfigError, match=r"checkpoint\.load_dir="):
        check_save_dir(tiny_cfg(tmp_path, checkpoint={"load_dir": str(tmp_path / "elsewhere")}))


def test_changed_architecture_fails_before_the_model_is_built(runtime, tmp_path):
    from m2mega.train.checkpoint import load_model_weights
    from m2mega.train.config import ConfigError
    from m2mega.train.loop import Trainer
    from m2mega.testing.tiny_gpt import gpt_model_provider

    cfg = tiny_cfg(tmp_path, schedule={"train_iters": 1, "lr_warmup_iters": 0}, checkpoint={"save_at_end": True})
    ckpt = _train(cfg).last_checkpoint
    built = []

    def provider(c):
        built.append(1)
        return gpt_model_provider(c)

    wider = tiny_cfg(tmp_path, model={"hidden_size": 48, "ffn_hidden_size": 56})
    with pytest.raises(ConfigError, match=r"another model architecture.*model\.gpt\.ffn_hidden_size: checkpoint 40, "
                                          r"config 56.*model\.gpt\.hidden_size: checkpoint 32, config 48"):
        Trainer(wider, provider)
    assert not built, "the model was built before the architecture check"
    # Without a config.yaml (e.g. a hand-made checkpoint) the global shapes are compared before any read.
    os.remove(os.path.join(ckpt, "config.yaml"))
    with pytest.raises(ConfigError, match=r"does not fit this model.*saved \(.*32.*\), model \(.*48.*\)"):
        load_model_weights(ckpt, [_gpt_model(wider)])


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(runtime, tmp_path, monkeypatch):
    import m2mega.train.loop as loop
    from m2mega.train.checkpoint import list_checkpoints

    cfg = tiny_cfg(tmp_path, model={"num_layers": 1}, schedule={"train_iters": 10},
                   checkpoint={"save_interval": 1, "keep_last": 1}, optimizer={"max_skipped_steps": 3})
    state = {"step": 0}
    real = loop.grads_are_finite

    def finite_for_two_steps(model):
        state["step"] += 1
        return real(model) and state["step"] <= 2

    monkeypatch.setattr(loop, "grads_are_finite", finite_for_two_steps)
    with pytest.raises(loop.TrainingDiverged, match=r"3 steps in a row.*optimizer\.max_skipped_steps=3.*"
                                                    r"iter_0000002"):
        _train(cfg)
    # keep_last=1 rotated iter_0000003 away, but never the last checkpoint saved before the skips began.
    assert [it for it, _ in list_checkpoints(str(tmp_path / "ckpt"))] == [2, 4]


@pytest.mark.parametrize("flag, match", [
    ("--optimizer.lr=1e30", r"optimizer\.lr 1e\+30 > 1"),
    ("--optimizer.lr=nan", r"optimizer\.lr: expected a finite number"),
    ("--optimizer.max_skipped_steps=-1", r"optimizer\.max_skipped_steps must be >= 0"),
])
def test_config_sanity_bounds(flag, match):
    from m2mega.train.config import ConfigError, apply_overrides, from_dict, to_dict, validate

    with pytest.raises(ConfigError, match=match):
        validate(from_dict(apply_overrides(to_dict(tiny_cfg()), [flag])))


_KILLED_SAVER = """
import os, signal, sys
sys.path.insert(0, {tests!r})

def main():
    from test_checkpoint import tiny_cfg
    import pathlib
    import m2mega.runtime as rt
    from m2mega.train import async_save
    from test_reliability_checkpoint import _train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r})
    rt.init(1, 1)
    _train(tiny_cfg(pathlib.Path({tmp!r}), model={{"num_layers": 1}},
                    schedule={{"train_iters": 1, "lr_warmup_iters": 0}}, checkpoint={{"save_at_end": True}}))
    print(async_save._async_manager._process.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    main()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has already exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_checkpoint_writer_manager_dies_with_a_killed_run(tmp_path):
    import subprocess
    import time

    from m2mega.runtime.multiproc import free_port

    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER.format(tests=os.path.dirname(__file__), port=str(free_port()), tmp=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    pid = int(proc.stdout.split()[-1])
    deadline = time.time() + 15
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"megatron's results-queue manager (pid {pid}) outlived the killed run"
    assert (tmp_path / "ckpt" / "iter_0000001").is_dir()
