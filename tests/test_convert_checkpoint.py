"""HF safetensors <-> megatron distributed checkpoint conversion (m2mega.convert, tools/convert_checkpoint.py).

A tiny random HF Qwen2.5-VL saved by transformers' ``save_pretrained`` as several safetensors shards is
converted to a megatron checkpoint from a TP2 x PP2 layout (ONE spawn of 4 gloo ranks), then in-process:

- exported back at TP1 (through the CLI): every file is byte-identical to transformers' own output, the
  index json included, and config / tokenizer files come back;
- loaded into a TP1 model (a different layout than it was saved with): logits equal HF's;
- checkpoints that do not match the config are refused with messages naming the tensors (HF side before
  any process starts; megatron side before loading), pickled weights and unsafe checkpoint metadata too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil

import pytest
import torch

from m2mega.models.qwen25vl import preset

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

SHARD = "60KB"  # the tiny model (~760 KB fp32) in 11 shards
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_hf(cfg, path, seed=11):
    from m2mega.models.qwen25vl.hf_parity import build_hf_model

    hf = build_hf_model(cfg, seed=seed)
    hf.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD)
    return hf


def _cli():
    path = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_all(d):
    from safetensors import safe_open

    out = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), framework="pt") as f:
                out.update({(fn, k): f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from m2mega.convert import convert_hf_to_mcore

    cfg = preset("tiny")
    root = tmp_path_factory.mktemp("convert")
    hf_dir, mc_dir = root / "hf", root / "mcore"
    hf = _save_hf(cfg, hf_dir)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (hf_dir / "chat_template.jinja").write_text("{{ messages }}")
    ranks = convert_hf_to_mcore(hf_dir, mc_dir, tp=2, pp=2, first_stage_layers=1)
    return cfg, hf, hf_dir, mc_dir, ranks


# ----------------------------------------------------------------------------- round trip (one spawn)


@pytest.mark.multirank
@pytest.mark.slow
def test_hf_to_mcore_tp2pp2_to_hf_is_bit_exact(converted, tmp_path):
    cfg, _, hf_dir, mc_dir, ranks = converted
    n_shards = len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")])
    assert n_shards > 3, "the HF input must be sharded"
    # Each rank read only its PP stage's tensors; the two stages together read every tensor once.
    by_stage = {r["pp_rank"]: r["hf_tensors_read"] for r in ranks}
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sum(by_stage.values()) == len(json.load(open(hf_dir / "model.safetensors.index.json"))["weight_map"])
    layout = json.load(open(mc_dir / "m2mega_checkpoint.json"))
    assert (layout["saved_tp"], layout["saved_pp"], layout["dtype"]) == (2, 2, "float32")
    for fn in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (mc_dir / fn).read_bytes() == (hf_dir / fn).read_bytes(), fn

    out = tmp_path / "hf_back"
    assert _cli().main(["mcore-to-hf", "--mcore-dir", str(mc_dir), "--out", str(out), "--max-shard-size", SHARD]) == 0
    want, got = _read_all(hf_dir), _read_all(out)
    assert set(got) == set(want), f"files/tensors differ: {sorted(set(got) ^ set(want))[:5]}"
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), f"{key} is not bit-exact"
    for fn in sorted(os.listdir(hf_dir)):  # safetensors shards, the index json, config and tokenizer files
        assert (out / fn).read_bytes() == (hf_dir / fn).read_bytes(), f"{fn} differs from transformers' output"


@pytest.mark.multirank
@pytest.mark.slow
def test_tp2pp2_checkpoint_loads_at_tp1_with_hf_logits(converted):
    import m2mega.runtime as rt
    from m2mega.convert import load_mcore_checkpoint
    from m2mega.models.qwen25vl import build_model
    from m2mega.models.qwen25vl.hf_parity import hf_forward, synthetic_batch
    from m2mega.runtime.multiproc import free_port

    cfg, hf, _, mc_dir, _ = converted
    batch = synthetic_batch(cfg, [[(84, 140)], [], [(56, 56)]], seed=4)
    with torch.no_grad():
        ref = hf_forward(hf, cfg, batch)
    ids, am = batch.padded()
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model = build_model(cfg)  # random init, then overwritten by the checkpoint
        load_mcore_checkpoint(model, mc_dir)
        with torch.no_grad():
            logits = model(ids, attention_mask=am, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    finally:
        rt.shutdown()
    keep = am.bool()
    got, want = logits[..., : cfg.text.vocab_size][keep].double(), ref[keep].double()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.multirank
@pytest.mark.slow
def test_mcore_checkpoint_not_matching_config_names_tensor(converted, tmp_path):
    from m2mega.convert import CheckpointMismatch, convert_mcore_to_hf

    cfg, _, _, mc_dir, _ = converted

    def with_config(name, **text):
        d = tmp_path / name
        shutil.copytree(mc_dir, d)
        c = json.load(open(d / "config.json"))
        c["text_config"].update(text)
        (d / "config.json").write_text(json.dumps(c))
        return d

    wider = with_config("wider", intermediate_size=80)  # the checkpoint's FFN (74) is narrower than the config
    with pytest.raises(CheckpointMismatch, match=r"language_model\.decoder\.layers\.mlp\.linear_fc2\.weight"):
        convert_mcore_to_hf(wider, tmp_path / "out1")
    narrower = with_config("narrower", intermediate_size=70)  # 74 would pass for TP padding, but is not zero
    with pytest.raises(CheckpointMismatch, match=r"linear_fc1\.weight.*non-zero weights beyond.*intermediate_size 70"):
        convert_mcore_to_hf(narrower, tmp_path / "out2")
    heads = with_config("heads", num_key_value_heads=3, num_attention_heads=6)
    with pytest.raises(CheckpointMismatch, match=r"linear_qkv\.weight' has global shape \(3, 80, 48\)"):
        convert_mcore_to_hf(heads, tmp_path / "out3")
    assert not os.path.exists(tmp_path / "out1") or not os.listdir(tmp_path / "out1")


# ----------------------------------------------------------------------------- refusals (no spawn)


def test_hf_shape_mismatch_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from m2mega.convert import CheckpointMismatch, convert_hf_to_mcore

    cfg = preset("tiny")
    d = tmp_path / "hf"
    _save_hf(cfg, d)
    index_path = d / "model.safetensors.index.json"
    index = json.load(open(index_path))
    name = "model.layers.1.mlp.up_proj.weight"
    fn = index["weight_map"][name]
    shard = load_file(d / fn)
    shard[name] = shard[name][:70].clone()
    save_file(shard, d / fn, metadata={"format": "pt"})
    want = r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(70, 48\) but the config needs \(74, 48\)"
    with pytest.raises(CheckpointMismatch, match=want):
        convert_hf_to_mcore(d, tmp_path / "out", tp=2, pp=2)
    # The CLI refuses the same way (before starting any rank).
    with pytest.raises(CheckpointMismatch, match="up_proj"):
        _cli().main(["hf-to-mcore", "--hf-dir", str(d), "--out", str(tmp_path / "out"), "--tp", "2", "--pp", "2"])

    shard[name] = torch.zeros(74, 48)
    gone = "visual.blocks.2.attn.proj.bias"
    gone_file = index["weight_map"].pop(gone)
    shard["model.extra_head.weight"] = torch.zeros(2)
    index["weight_map"]["model.extra_head.weight"] = fn
    save_file(shard, d / fn, metadata={"format": "pt"})
    other = load_file(d / gone_file)
    other.pop(gone)
    save_file(other, d / gone_file, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatch, match=r"missing tensors \['visual\.blocks\.2\.attn\.proj\.bias'\].*"
                                                   r"unexpected tensors \['model\.extra_head\.weight'\]"):
        convert_hf_to_mcore(d, tmp_path / "out", tp=1, pp=1)
    assert not (tmp_path / "out").exists()


def test_expected_hf_shapes_match_transformers():
    from m2mega.convert import expected_hf_shapes
    from m2mega.models.qwen25vl.hf_parity import build_hf_model
    from m2mega.models.qwen25vl.sharding import normalize_hf_names

    for tied in (False, True):
        cfg = preset("tiny")
        cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "tie_word_embeddings": tied}))
        hf = normalize_hf_names(build_hf_model(cfg).state_dict())
        want, optional = expected_hf_shapes(cfg)
        assert {k: tuple(v.shape) for k, v in hf.items()} == want
        assert optional == ({"lm_head.weight"} if tied else set())


def test_pickled_weights_and_unsafe_metadata_are_refused(tmp_path):
    from m2mega.convert import convert_hf_to_mcore, verify_dcp_metadata

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights.*never pickles"):
        convert_hf_to_mcore(d, tmp_path / "out")

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    m = tmp_path / "mcore"
    m.mkdir()
    (m / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match=r"unsafe checkpoint metadata: refusing to unpickle (posix|os)\.system"):
        verify_dcp_metadata(m)
    assert not marker.exists()
