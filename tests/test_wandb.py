"""Weights & Biases logging beside TensorBoard (m2mega.train.metrics_sink): a tiny SFT run in offline mode
writes a W&B run whose history holds the same train/eval scalars as TensorBoard's event file, one row per
iteration with ``iteration`` as x-axis, and the full config; without wandb installed, setting
``logging.wandb_project`` is a one-line config error."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from test_checkpoint import runtime, tiny_cfg  # noqa: F401 (fixture)

wandb = pytest.importorskip("wandb")


def _wandb_records(path: str):
    """The protobuf ``Record``s of an offline ``run-*.wandb`` file.

    wandb ships no reader for it: the file is the LevelDB log format (32 KiB blocks of records with a
    7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ``:W&B`` header, each record
    a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        buf = data[pos + 7:pos + 7 + n] if kind in (1, 2) else buf + data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_offline_run_has_tensorboards_scalars_and_the_config(runtime, tmp_path, monkeypatch):  # noqa: F811
    from m2mega.train.sft import train
    from m2mega.testing.tiny_gpt import gpt_flops_per_token, gpt_model_provider
    from m2mega.train.sft import sft_data_provider, sft_forward_step

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    n = 5
    cfg = tiny_cfg(tmp_path, run_name="tiny-wandb",
                   schedule={"train_iters": n, "lr_warmup_iters": 1},
                   logging={"tensorboard_dir": str(tmp_path / "tb"), "wandb_project": "m2mega-test",
                            "progress": "none", "log_interval": 1},
                   sft={"eval_interval": 2, "eval_iters": 1})
    summary = train(cfg, gpt_model_provider, sft_forward_step, sft_data_provider,
                    flops_per_token=gpt_flops_per_token)

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    history, run_config, kinds = [], None, []
    for rec in _wandb_records(runs[0]):
        kind = rec.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            run_config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            assert rec.run.display_name == "tiny-wandb" and rec.run.project == "m2mega-test"
    # train() returned: the sink's close() waited for wandb-core to write the whole log, up to its exit record.
    assert kinds[-1:] == ["exit"], f"{runs[0]} is incomplete after train() returned: {kinds}"
    assert run_config is not None and run_config["schedule"]["train_iters"] == n
    assert run_config["logging"]["wandb_project"] == "m2mega-test"

    # One row per iteration, train and eval scalars of an iteration together.
    assert [row["iteration"] for row in history] == list(range(1, n + 1))
    tb = _tensorboard_scalars(str(tmp_path / "tb"))
    assert "train/lm loss" in tb and "eval/lm loss" in tb and "train/lr" in tb
    wb = {}
    for row in history:
        for k, v in row.items():
            if not k.startswith("_") and k != "iteration":
                wb.setdefault(k, {})[row["iteration"]] = v
    assert set(wb) == set(tb), (sorted(wb), sorted(tb))
    for tag, points in tb.items():
        assert set(wb[tag]) == set(points), tag
        for it, v in points.items():  # TensorBoard stores float32
            assert wb[tag][it] == pytest.approx(v, rel=1e-6, abs=1e-12), (tag, it)
    assert [wb["train/lm loss"][i] for i in range(1, n + 1)] == pytest.approx(summary.losses, rel=1e-6)


def test_wandb_project_without_wandb_is_a_one_line_config_error(monkeypatch):
    import m2mega.train.metrics_sink as sink
    from m2mega.train.config import ConfigError

    monkeypatch.setattr(sink, "_wandb_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"logging.wandb_project='p' needs the wandb package, which is not "
                                          r"installed \(pip install wandb") as e:
        tiny_cfg(None, logging={"wandb_project": "p"})
    assert "\n" not in str(e.value)
    tiny_cfg(None)  # unset: no wandb needed
