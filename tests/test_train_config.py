"""The training config: YAML + flags in, full YAML out, and errors that name the offending key."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from m2mega.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    num_microbatches,
    to_dict,
    to_yaml,
    validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The vision-free GPT stand-in on random tokens: a config that validates without data or a checkpoint.
GPT = {"model": {"family": "gpt"}, "data": {"source": "synthetic"}}


def gpt_data(**sections) -> dict:
    out = {k: dict(v) for k, v in GPT.items()}
    for sec, vals in sections.items():
        out.setdefault(sec, {}).update(vals) if isinstance(vals, dict) else out.__setitem__(sec, vals)
    return out


def test_defaults_validate_and_yaml_round_trips(tmp_path):
    cfg = from_dict(GPT)
    validate(cfg)
    text = to_yaml(cfg)
    # Printed in full: every section and a few deep keys appear.
    for key in ("model:", "parallel:", "optimizer:", "schedule:", "checkpoint:", "logging:", "data:", "sft:",
                "grpo:", "ednm_lambda:", "beta_max:", "clip_high:", "repetition_penalty:", "order:"):
        assert key in text, key
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert load_config(str(p)) == cfg


def test_flags_override_yaml_with_type_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(gpt_data(parallel={"tp": 2}, optimizer={"lr": 1e-4}, checkpoint={"save_dir": "a"})))
    cfg = load_config(
        str(p),
        [
            "--schedule.train_iters=50",
            "--optimizer.lr", "3e-4",  # space-separated form, float from a string
            "--parallel.sequence_parallel=true",
            "--checkpoint.save_dir=null",  # Optional -> None
            "--data.order=shuffle",
            "--grpo.reward_overrides={general: {format_weight: 0.2}}",
            "--model.gpt.rotary-base=10000",  # dashes are accepted for underscores
            "--logging.peak_tflops=989",  # int literal into a float field
        ],
    )
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.schedule.train_iters == 50 and isinstance(cfg.schedule.train_iters, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.checkpoint.save_dir is None
    assert cfg.data.order == "shuffle"
    assert cfg.grpo.reward_overrides == {"general": {"format_weight": 0.2}}
    assert cfg.model.gpt.rotary_base == 10000.0 and isinstance(cfg.logging.peak_tflops, float)
    # The paper's switches reach the reward module's config shape.
    rc = cfg.grpo.reward_config_dict()
    assert rc["spatial"]["numeric"] == "ednm" and rc["spatial"]["ednm_lambda"] == 2.0
    assert rc["general"]["format_weight"] == 0.2
    # Held-out scoring keeps the training reward unless grpo.eval_reward overrides some of its switches.
    assert cfg.grpo.eval_reward_config_dict() == rc
    g = dataclasses.replace(cfg.grpo, ednm_lambda=5.0, numeric_reward="binary", repetition_penalty=True,
                            eval_reward={"ednm_lambda": 2.0, "numeric_reward": "ednm", "repetition_penalty": False})
    ev, tr = g.eval_reward_config_dict(), g.reward_config_dict()
    switches = lambda d: (d["spatial"]["numeric"], d["spatial"]["ednm_lambda"], d["default"]["repetition_penalty"])  # noqa: E731
    assert switches(tr) == ("binary", 5.0, True) and switches(ev) == ("ednm", 2.0, False)
    assert ev["general"] == tr["general"] and g.ednm_lambda == 5.0  # the rest kept; the config itself unchanged


def test_reward_switches_are_the_fields_the_reward_reads():
    """grpo.eval_reward accepts REWARD_SWITCHES: exactly the GRPOConfig fields reward_config_dict reads, so
    a reward switch added later cannot be left out of held-out scoring's overrides."""
    from m2mega.train.config import REWARD_SWITCHES, GRPOConfig

    g, read = GRPOConfig(), set()
    for f in dataclasses.fields(GRPOConfig):
        marker = object()
        try:
            changed = dataclasses.replace(g, **{f.name: marker}).reward_config_dict() != g.reward_config_dict()
        except (AttributeError, TypeError):  # it was read (e.g. iterated)
            changed = True
        if changed:
            read.add(f.name)
    assert read == set(REWARD_SWITCHES)


@pytest.mark.parametrize(
    "data, flags, match",
    [
        ({"model": {"gpt": {"hiden_size": 4}}}, [], r"unknown config key 'model\.gpt\.hiden_size'.*model\.gpt\.hidden_size"),
        ({"optimzer": {}}, [], r"unknown config key 'optimzer'.*'optimizer'"),
        ({}, ["--optimizer.learning_rate=1"], r"unknown config key 'optimizer\.learning_rate'"),
        ({}, ["--parallel=2"], r"'parallel' is a section"),
        ({}, ["--schedule.train_iters=ten"], r"schedule\.train_iters: expected an integer"),
        ({}, ["--schedule.train_iters=2.5"], r"schedule\.train_iters: expected an integer"),
        ({}, ["--parallel.sequence_parallel=maybe"], r"parallel\.sequence_parallel: expected a boolean"),
        ({}, ["--data.order=random"], r"data\.order: expected one of \['curriculum', 'shuffle'"),
        ({}, ["--optimizer.lr=nan"], r"optimizer\.lr: expected a finite number"),
        ({"model": 3}, [], r"model: expected a mapping"),
        ({}, ["--schedule.lr_warmup_iters=100", "--schedule.train_iters=100"], r"lr_warmup_iters \(100\) must be <"),
        ({}, ["--optimizer.min_lr=1", "--optimizer.lr=0.1"], r"min_lr"),
        ({}, ["--parallel.sequence_parallel=true"], r"sequence_parallel needs parallel\.tp > 1"),
        ({}, ["--parallel.tp=4"], r"parallel\.tp=4 must divide"),
        ({}, ["--grpo.group_size=1"], r"grpo\.group_size must be >= 2"),
        ({}, ["--optimizer.optimizer=sgd"], r"'sgd' needs parallel\.use_distributed_optimizer=false"),
        ({"model": {"gpt": {"vocab_size": 131, "num_attention_heads": 4}}}, ["--parallel.tp=2"], r"vocab_size 131 is not divisible by parallel\.tp 2"),
        ({}, ["--grpo.ednm_lambda=-1"], r"ednm_lambda"),
        ({}, ["--grpo.reward_overrides={spatial: {ednm_lamda: 1}}"], r"grpo reward settings.*ednm_lamda"),
        ({}, ["--grpo.eval_reward={ednm_lamda: 2}"], r"grpo\.eval_reward: unknown key\(s\) \['ednm_lamda'\]"),
        ({}, ["--grpo.eval_reward={ednm_lambda: -1}"], r"grpo\.eval_reward: .*lambda"),
        ({}, ["--data.source=packed"], r"needs data\.train_prefix"),
        ({}, ["--model.family=qwen25vl"], r"data\.source 'synthetic' \(random tokens\) is for the gpt test family"),
        ({}, ["--model.family=llama", "--data.source=packed", "--data.train_prefix=d"], r"unknown model\.family 'llama'"),
        ({}, ["--schedule.train_iters"], r"has no value"),
        ({}, ["schedule.train_iters=3"], r"expected a '--section\.key=value' flag"),
    ],
)
def test_errors_name_the_key(data, flags, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(apply_overrides(gpt_data(**data) if isinstance(data.get("model", {}), dict) else
                                  {**GPT, **data}, flags))


def test_layout_rules_need_world_size():
    cfg = from_dict(gpt_data(schedule={"global_batch_size": 6, "micro_batch_size": 2}, parallel={"tp": 2}))
    validate(cfg, world_size=2)  # DP1: 3 micro-batches
    assert num_microbatches(cfg, 1) == 3
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size 2 x data-parallel size 2"):
        validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tp x pp"):
        validate(cfg, world_size=3)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("schedule:\n  train_itres: 3\n")
    with pytest.raises(ConfigError, match=r"schedule\.train_itres.*in .*typo\.yaml"):
        load_config(str(typo))


@pytest.mark.parametrize("name", ["sft.yaml", "grpo.yaml"])
def test_example_configs_load(name):
    path = os.path.join(ROOT, "examples", "qwen25vl_7b", name)
    cfg = load_config(path)
    assert cfg.mode == name.split(".")[0]
    # The family owns the shape: the 7B preset at TP4 (28 heads, 4 KV heads), no GPT stand-in keys.
    assert cfg.model.family == "qwen25vl" and cfg.model.preset == "7b" and cfg.parallel.tp == 4
    assert "gpt" not in to_dict(cfg)["model"] and "hidden_size" not in open(path).read()
    assert cfg.grpo.max_new_tokens == 1024
    # Every key in the file is a real key (load_config would raise otherwise), and the saved YAML
    # reproduces the config exactly.
    assert from_dict(to_dict(cfg)) == cfg


# ----------------------------------------------------------------------------------------- model families

QWEN = {"model": {"family": "qwen25vl", "preset": "7b"}, "data": {"train_prefix": "data/x"}}


def test_qwen25vl_shape_comes_from_the_preset():
    # Divisibility is checked against the real Qwen2.5-VL-7B (28 heads, 4 KV heads, 16 vision heads).
    cfg = load_config(None, ["--model.family=qwen25vl", "--model.preset=7b", "--parallel.tp=4",
                             "--data.train_prefix=d"])
    assert cfg.model.preset == "7b" and "gpt" not in to_dict(cfg)["model"]
    with pytest.raises(ConfigError, match=r"parallel\.tp=8 must divide the 28 attention heads of Qwen2\.5-VL '7b'"):
        from_dict(apply_overrides(QWEN, ["--parallel.tp=8"]))
    with pytest.raises(ConfigError, match=r"parallel\.tp=7 must divide the 4 key/value heads of Qwen2\.5-VL '7b'"):
        from_dict(apply_overrides(QWEN, ["--parallel.tp=7"]))
    with pytest.raises(ConfigError, match=r"parallel\.tp=4 must divide the 6 attention heads of Qwen2\.5-VL 'tiny'"):
        from_dict(apply_overrides(QWEN, ["--model.preset=tiny", "--parallel.tp=4"]))
    with pytest.raises(ConfigError, match=r"parallel\.pp=4 exceeds the 3 layers"):
        from_dict(apply_overrides(QWEN, ["--model.preset=tiny", "--parallel.pp=4"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.hidden_size'"):
        from_dict(apply_overrides(QWEN, ["--model.hidden_size=4"]))


def test_qwen25vl_preset_is_required_or_inferred_from_init_from(tmp_path):
    from m2mega.models.qwen25vl import preset

    with pytest.raises(ConfigError, match=r"model\.preset is required for model\.family qwen25vl"):
        from_dict({"model": {"family": "qwen25vl"}, "data": {"train_prefix": "d"}})
    empty = tmp_path / "ckpt_without_config"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model\.init_from .*ckpt_without_config holds no config\.json"):
        from_dict({"model": {"init_from": str(empty)}, "data": {"train_prefix": "d"}})
    # A converted or trained checkpoint carries its HF config.json: the shape is read from it, and the saved
    # config names the file it came from.
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text(__import__("json").dumps(preset("tiny").to_hf_dict()))
    cfg = from_dict({"model": {"init_from": str(ck)}, "data": {"train_prefix": "d"}})
    assert cfg.model.preset == str(ck / "config.json")
    assert yaml.safe_load(to_yaml(cfg))["model"]["preset"] == str(ck / "config.json")
    with pytest.raises(ConfigError, match=r"parallel\.tp=4 must divide the 6 attention heads"):
        from_dict({"model": {"init_from": str(ck)}, "data": {"train_prefix": "d"}, "parallel": {"tp": 4}})
