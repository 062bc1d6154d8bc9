"""m2mega Qwen2.5-VL vs HF transformers' Qwen2_5_VLForConditionalGeneration on the same weights (fp32, CPU).

Tiny random config with odd sizes (FFN 74, vocab 203 padded to 208, vision FFN 54), a batch of three
samples: two images of different resolutions (several 112-px attention windows), a text-only sample, and
one larger image. Checked:

- logits, padded batch (BSHD) and packed (THD), max relative error < 1e-4, at TP1/PP1 in-process;
- the same at TP2, TP2 + sequence parallel, PP2 and TP2xPP2 in ONE spawn of 4 gloo ranks (PP through
  megatron's forward_backward schedule), plus the vision tower's output at TP2;
- gradients of a masked next-token loss for every parameter, gathered over TP/PP and mapped to HF names;
- the HF <-> mcore <-> TP/PP shard conversions round-trip exactly; config.json parsing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from m2mega.models.qwen25vl import Qwen25VLConfig, preset
from m2mega.models.qwen25vl.hf_parity import build_hf_model, hf_forward, synthetic_batch
from m2mega.models.qwen25vl.sharding import (
    hf_to_mcore,
    mcore_to_hf,
    merge_shards,
    normalize_hf_names,
    shard_for_rank,
)
from m2mega.runtime.multiproc import free_port, run_ranks

# Not importorskip: spawned ranks import this module and must not pay for importing transformers.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

LOGIT_TOL = 1e-4
GRAD_TOL = 2e-5
FIRST_STAGE_LAYERS = 1  # tiny LM has 3 layers: PP2 = [1 (+ ViT), 2]
# (TP, PP, sequence parallel)
LAYOUTS = [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)]
IMAGES = [[(84, 140), (56, 56)], [], [(140, 196)]]


@functools.lru_cache(maxsize=1)
def _reference():
    """HF model, batch (even lengths so TP2 sequence parallelism can split them), logits and grads."""
    cfg = preset("tiny")
    base = [s.numel() for s in synthetic_batch(cfg, IMAGES, seed=3).samples]
    extra = next(
        list(e) for e in itertools.product(range(3), repeat=len(base))
        if sum(b + x for b, x in zip(base, e)) % 2 == 0 and max(b + x for b, x in zip(base, e)) % 2 == 0
    )
    batch = synthetic_batch(cfg, IMAGES, seed=3, extra_text=extra)
    hf = build_hf_model(cfg, seed=11)
    logits = hf_forward(hf, cfg, batch)
    labels, lmask = batch.padded_labels()
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    loss = (per_tok * lmask.reshape(-1)).sum() / lmask.sum()
    hf.zero_grad()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf.named_parameters()}
    with torch.no_grad():
        vision = hf.model.visual(batch.pixel_values, grid_thw=batch.image_grid_thw).pooler_output
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return cfg, batch, sd, logits.detach(), loss.item(), grads, vision


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare_grads(mcore_grads: dict, cfg, ref_grads: dict, where: str):
    got = mcore_to_hf(mcore_grads, cfg, style="transformers")
    assert set(got) == set(ref_grads), f"{where}: grad names differ: {set(got) ^ set(ref_grads)}"
    errs = {k: _rel(got[k], ref_grads[k]) for k in ref_grads}
    worst = max(errs, key=errs.get)
    assert errs[worst] < GRAD_TOL, f"{where}: gradient of {worst} differs from HF (rel {errs[worst]:.2e})"
    return errs


# ----------------------------------------------------------------------------- conversions (no dist)


def test_hf_config_reader_handles_hub_and_nested_formats(tmp_path):
    import json

    flat = {
        "model_type": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3,
                          "window_size": 112, "tokens_per_second": 2, "spatial_patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(flat))
    got = Qwen25VLConfig.from_hf(tmp_path)
    want = preset("7b")
    assert got.text == want.text and got.vision == want.vision
    nested = Qwen25VLConfig.from_hf(preset("tiny").to_hf_dict())
    assert nested.text == preset("tiny").text and nested.vision == preset("tiny").vision
    for name in ("3b", "7b", "32b", "72b"):
        c = preset(name)
        assert c.text.head_dim == 128 and c.vision.head_dim == 80
        assert c.padded_vocab_size(4) % 4 == 0
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        Qwen25VLConfig.from_hf({k: v for k, v in flat.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="mrope_section"):
        preset("tiny").replace(text=preset("tiny").text.__class__(**{**preset("tiny").text.__dict__,
                                                                    "mrope_section": (2, 2, 2)}))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_mcore_shard_round_trip_is_exact(tied):
    cfg = preset("tiny")
    if tied:
        cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "tie_word_embeddings": True}))
    hf = build_hf_model(cfg, seed=5)
    hf_sd = normalize_hf_names(hf.state_dict())
    full = hf_to_mcore(hf.state_dict(), cfg)
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2), (2, 3)]:
        fsl = FIRST_STAGE_LAYERS if pp > 1 else None
        shards = {
            (t, p): shard_for_rank(full, cfg, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, first_stage_layers=fsl)
            for t in range(tp) for p in range(pp)
        }
        # Padding is exact zeros and every local tensor has the TP-sliced shape.
        emb = shards[(0, 0)]["language_model.embedding.word_embeddings.weight"]
        assert emb.shape[0] == cfg.padded_vocab_size(tp) // tp
        back = mcore_to_hf(merge_shards(shards, cfg, tp, pp, fsl), cfg)
        assert set(back) == set(hf_sd)
        for k in hf_sd:
            assert torch.equal(back[k], hf_sd[k]), f"TP{tp}PP{pp}: {k} did not round-trip"


# ----------------------------------------------------------------------------- TP1 in-process


@contextlib.contextmanager
def _single_rank():
    import m2mega.runtime as rt

    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        rt.shutdown()


def test_tp1_logits_and_grads_match_hf():
    from m2mega.models.qwen25vl import build_model, load_hf_into_model, packed_seq_params_from_lengths

    cfg, batch, sd, ref_logits, ref_loss, ref_grads, _ = _reference()
    V = cfg.text.vocab_size
    ids, am = batch.padded()
    keep = am.bool()
    with _single_rank():
        model = build_model(cfg)
        load_hf_into_model(model, sd, cfg)
        with torch.no_grad():
            bshd = model(ids, attention_mask=am, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        assert bshd.shape == (*ids.shape, cfg.padded_vocab_size(1))
        assert torch.isinf(bshd[..., V:]).all(), "padded vocabulary columns must be -inf"
        assert _rel(bshd[..., :V][keep], ref_logits[keep]) < LOGIT_TOL
        # Left padding (generation-style batches): same logits at the real tokens.
        left = torch.zeros_like(ids)
        left_am = torch.zeros_like(am)
        for b, smp in enumerate(batch.samples):
            left[b, ids.shape[1] - smp.numel():] = smp
            left_am[b, ids.shape[1] - smp.numel():] = 1
        with torch.no_grad():
            out_left = model(left, attention_mask=left_am, pixel_values=batch.pixel_values,
                             image_grid_thw=batch.image_grid_thw)
        assert _rel(out_left[..., :V][left_am.bool()], ref_logits[keep]) < LOGIT_TOL

        packed, lens = batch.packed()
        psp = packed_seq_params_from_lengths(lens)
        labels, lmask = batch.packed_labels()
        per_tok = model(packed, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                        packed_seq_params=psp, labels=labels)
        loss = (per_tok * lmask).sum() / lmask.sum()
        assert abs(loss.item() - ref_loss) / ref_loss < 1e-5
        loss.backward()
        with torch.no_grad():
            thd = model(packed, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                        packed_seq_params=psp)
        assert _rel(thd[0, :, :V], ref_logits[keep]) < LOGIT_TOL
        grads = {k: p.grad for k, p in model.named_parameters()}
        errs = _compare_grads(merge_shards({(0, 0): grads}, cfg, 1, 1), cfg, ref_grads, "TP1")
        print(f"TP1: logits rel err BSHD {_rel(bshd[..., :V][keep], ref_logits[keep]):.1e} "
              f"THD {_rel(thd[0, :, :V], ref_logits[keep]):.1e}, loss {abs(loss.item() - ref_loss) / ref_loss:.1e}, "
              f"worst grad rel err {max(errs.values()):.1e}")


# ----------------------------------------------------------------------------- TP / PP in one spawn


def _schedule(model, kw, seq_len, mbs, forward_only, loss_mask=None):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        out = model(**next(data_iterator))

        def loss_func(output):
            if forward_only:
                return output.sum() * 0.0, {"out": output.detach()}
            loss = (output * loss_mask).sum() / loss_mask.sum()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([kw]), model=[model], num_microbatches=1,
        seq_length=seq_len, micro_batch_size=mbs, forward_only=forward_only,
    )


def _layouts_body(cfg, batch, sd, layouts):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    import m2mega.runtime as rt
    from m2mega.models.qwen25vl import build_model, load_full_into_model, packed_seq_params_from_lengths

    rt.init(1, 1)
    full = hf_to_mcore(sd, cfg)
    ids, am = batch.padded()
    packed, lens = batch.packed()
    labels, lmask = batch.packed_labels()
    vis_kw = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    results = {}
    for tp, pp, sp in layouts:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        fsl = FIRST_STAGE_LAYERS if pp > 1 else None
        torch.manual_seed(999)  # different init: parity must come from the loaded weights
        model = build_model(cfg, first_stage_layers=fsl, language_overrides={"sequence_parallel": sp})
        load_full_into_model(model, full, cfg, fsl)
        last = ps.is_pipeline_last_stage()
        r = {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
             "dp_rank": ps.get_data_parallel_rank()}
        psp = packed_seq_params_from_lengths(lens)
        with torch.no_grad():
            out = _schedule(model, dict(input_ids=ids, attention_mask=am, **vis_kw), ids.shape[1], ids.shape[0], True)
            if last:
                r["bshd"] = tensor_parallel.gather_from_tensor_model_parallel_region(out[0]["out"])
            out = _schedule(model, dict(input_ids=packed, packed_seq_params=psp, **vis_kw), packed.shape[1], 1, True)
            if last:
                r["thd"] = tensor_parallel.gather_from_tensor_model_parallel_region(out[0]["out"])
            if ps.is_pipeline_first_stage():
                r["vision"] = model.vision_model(batch.pixel_values, batch.image_grid_thw)
        model.zero_grad(set_to_none=True)
        out = _schedule(model, dict(input_ids=packed, packed_seq_params=psp, labels=labels, **vis_kw),
                        packed.shape[1], 1, False, loss_mask=lmask)
        if last:
            r["loss"] = out[0]["loss"].item()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if getattr(p, "sequence_parallel", False):
                # Under sequence parallelism each rank saw part of the sequence (megatron's DDP does this).
                g = g.clone()
                torch.distributed.all_reduce(g, group=ps.get_tensor_model_parallel_group())
            grads[name] = g.detach().clone()
        r["grads"] = grads
        results[(tp, pp, sp)] = r if r["dp_rank"] == 0 else {"dp_rank": r["dp_rank"]}
        del model
    return results


@pytest.mark.multirank
@pytest.mark.slow
def test_tp_pp_layouts_match_hf():
    cfg, batch, sd, ref_logits, ref_loss, ref_grads, ref_vision = _reference()
    V = cfg.text.vocab_size
    _, am = batch.padded()
    keep = am.bool()
    per_rank = run_ranks(_layouts_body, 4, args=(cfg, batch, sd, LAYOUTS), timeout_s=600)
    for layout in LAYOUTS:
        tp, pp, sp = layout
        where = f"TP{tp}PP{pp}{'+SP' if sp else ''}"
        ranks = [r[layout] for r in per_rank if r[layout]["dp_rank"] == 0]
        assert len(ranks) == tp * pp
        lasts = [r for r in ranks if "bshd" in r]
        assert len(lasts) == tp, f"{where}: expected logits from {tp} last-stage ranks"
        for r in lasts:
            assert _rel(r["bshd"][..., :V][keep], ref_logits[keep]) < LOGIT_TOL, f"{where}: BSHD logits"
            assert torch.isinf(r["bshd"][..., V:]).all()
            assert _rel(r["thd"][0, :, :V], ref_logits[keep]) < LOGIT_TOL, f"{where}: THD logits"
            assert abs(r["loss"] - ref_loss) / ref_loss < 1e-5, f"{where}: loss {r['loss']} vs HF {ref_loss}"
        for r in ranks:
            if "vision" in r:
                assert _rel(r["vision"], ref_vision) < LOGIT_TOL, f"{where}: vision tower output"
        shards = {(r["tp_rank"], r["pp_rank"]): r["grads"] for r in ranks}
        merged = merge_shards(shards, cfg, tp, pp, FIRST_STAGE_LAYERS if pp > 1 else None)
        errs = _compare_grads(merged, cfg, ref_grads, where)
        vis = max(_rel(r["vision"], ref_vision) for r in ranks if "vision" in r)
        loss_err = max(abs(r["loss"] - ref_loss) / ref_loss for r in lasts)
        print(f"{where}: logits rel err BSHD {max(_rel(r['bshd'][..., :V][keep], ref_logits[keep]) for r in lasts):.1e} "
              f"THD {max(_rel(r['thd'][0, :, :V], ref_logits[keep]) for r in lasts):.1e}, loss {loss_err:.1e}, "
              f"vision {vis:.1e}, worst grad rel err {max(errs.values()):.1e} ({max(errs, key=errs.get)})")


def test_bf16_error_is_comparable_to_hf_bf16():
    """bf16 has no exact reference: both sides' bf16 logits vs the fp32 HF logits; ours may not be much worse."""
    from m2mega.models.qwen25vl import build_model, load_hf_into_model, packed_seq_params_from_lengths

    cfg, batch, sd, ref_logits, *_ = _reference()
    V = cfg.text.vocab_size
    _, am = batch.padded()
    keep = am.bool()
    hf_bf = build_hf_model(cfg, seed=11, dtype=torch.bfloat16)
    with torch.no_grad():
        b16 = type(batch)(batch.samples, batch.image_grid_thw, batch.pixel_values.bfloat16(), batch.loss_mask)
        hf_err = _rel(hf_forward(hf_bf, cfg, b16).float()[keep], ref_logits[keep])
    packed, lens = batch.packed()
    with _single_rank():
        model = build_model(cfg, torch.bfloat16)
        load_hf_into_model(model, sd, cfg)
        with torch.no_grad():
            out = model(packed, pixel_values=batch.pixel_values.bfloat16(), image_grid_thw=batch.image_grid_thw,
                        packed_seq_params=packed_seq_params_from_lengths(lens))
    ours_err = _rel(out[0, :, :V].float(), ref_logits[keep])
    print(f"bf16 logits rel err vs fp32: ours {ours_err:.2e}, HF {hf_err:.2e}")
    assert ours_err < 3e-2 and ours_err < 2.0 * hf_err


def test_tied_embeddings_match_hf():
    """3B-style tied input/output embedding: the output layer reuses the word embedding."""
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg = preset("tiny")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "tie_word_embeddings": True}))
    hf = build_hf_model(cfg, seed=7)
    batch = synthetic_batch(cfg, IMAGES[:2], seed=5)
    with torch.no_grad():
        ref = hf_forward(hf, cfg, batch)
    ids, am = batch.padded()
    with _single_rank():
        model = build_model(cfg)
        assert model.language_model.output_layer.weight is None  # shares the embedding
        load_hf_into_model(model, hf.state_dict(), cfg)
        with torch.no_grad():
            out = model(ids, attention_mask=am, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    keep = am.bool()
    assert _rel(out[..., : cfg.text.vocab_size][keep], ref[keep]) < LOGIT_TOL
