"""KV-cache generation (m2mega.inference) vs HF transformers' generate on the same tiny random Qwen2.5-VL.

A ragged batch of three prompts: one with a 84x140 image (several attention windows), one text-only, one
with two images. Checked at TP1 in-process:

- greedy tokens equal HF ``generate(do_sample=False)`` token for token, and the returned log-probs equal
  HF's ``log_softmax(scores)`` of those tokens;
- KV cache == full recompute (``use_cache=False``);
- an EOS token stops its row while the others continue (and HF agrees);
- seeded sampling is reproducible, ``top_k=1`` sampling is greedy, the top-k/top-p filter equals HF's warpers;
- bad inputs are refused with messages naming the prompt.

And in ONE spawn of 4 gloo ranks: TP2 x PP2, then TP2 with sequence parallelism (DP2): greedy equals HF,
cache equals recompute, seeded samples are identical on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import pytest
import torch

from m2mega.models.qwen25vl import preset
from m2mega.runtime.multiproc import free_port, run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

IMAGES = [[(84, 140)], [], [(56, 56), (28, 56)]]
NEW = 10
PAD = 0


def _split_images(batch, cfg):
    """The batch's concatenated patches/grids -> per-prompt lists (None for text-only prompts)."""
    pv, grids, p, g = [], [], 0, 0
    for imgs in IMAGES:
        if not imgs:
            pv.append(None)
            grids.append(None)
            continue
        gr = batch.image_grid_thw[g:g + len(imgs)]
        n = int(gr.prod(-1).sum())
        pv.append(batch.pixel_values[p:p + n])
        grids.append(gr)
        p, g = p + n, g + len(imgs)
    return pv, grids


def _hf_generate(hf, cfg, batch, **kw):
    S = max(s.numel() for s in batch.samples)
    ids = torch.full((len(batch.samples), S), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(batch.samples):
        ids[i, S - s.numel():] = s
        am[i, S - s.numel():] = 1
    out = hf.generate(input_ids=ids, attention_mask=am, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw, mm_token_type_ids=(ids == cfg.image_token_id).int(),
                      do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences[:, S:], torch.stack(out.scores, 1)  # [B, T], [B, T, V]


@functools.lru_cache(maxsize=1)
def _reference():
    from m2mega.models.qwen25vl.hf_parity import build_hf_model, synthetic_batch

    cfg = preset("tiny")
    batch = synthetic_batch(cfg, IMAGES, seed=3)
    hf = build_hf_model(cfg, seed=11)
    with torch.no_grad():
        tokens, scores = _hf_generate(hf, cfg, batch, max_new_tokens=NEW, eos_token_id=None)
    pv, grids = _split_images(batch, cfg)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return cfg, hf, batch, pv, grids, sd, tokens, scores


def _trim(row: torch.Tensor, eos: list[int]) -> list[int]:
    out = []
    for t in row.tolist():
        out.append(t)
        if t in eos:
            break
    return out


@pytest.fixture(scope="module")
def tp1_model():
    import m2mega.runtime as rt
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg, _, _, _, _, sd, _, _ = _reference()
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model = build_model(cfg)
        load_hf_into_model(model, sd, cfg)
        yield model
    finally:
        rt.shutdown()


def _gen(model, **kw):
    from m2mega.inference import generate

    _, _, batch, pv, grids, _, _, _ = _reference()
    return generate(model, batch.samples, pixel_values=pv, image_grid_thw=grids, pad_token_id=PAD, **kw)


# ----------------------------------------------------------------------------- TP1 in-process


def test_greedy_matches_hf_token_for_token_with_logprobs(tp1_model):
    cfg, _, batch, _, _, _, ref, scores = _reference()
    assert len({s.numel() for s in batch.samples}) == 3, "prompts must be ragged"
    out = _gen(tp1_model, max_new_tokens=NEW, greedy=True, return_logprobs=True)
    assert [t.tolist() for t in out.tokens] == ref.tolist()
    assert out.response_lengths.tolist() == [NEW] * 3 and not out.finished.any()
    # A text-only prompt may also say "no images" with empty tensors (as the RL prompt loader does).
    _, _, _, pv, grids, _, _, _ = _reference()
    from m2mega.inference import generate

    again = generate(tp1_model, batch.samples, pixel_values=[pv[0], torch.zeros(0, cfg.vision.patch_dim), pv[2]],
                     image_grid_thw=[grids[0], torch.zeros(0, 3, dtype=torch.long), grids[2]],
                     max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    assert [t.tolist() for t in again.tokens] == ref.tolist()
    hf_logp = torch.log_softmax(scores.float(), -1).gather(-1, ref[..., None]).squeeze(-1)
    got = torch.stack(out.logprobs)
    assert torch.allclose(got, hf_logp, atol=1e-4, rtol=0), (got - hf_logp).abs().max()


def test_kv_cache_equals_full_recompute(tp1_model):
    cached = _gen(tp1_model, max_new_tokens=NEW, greedy=True, return_logprobs=True)
    full = _gen(tp1_model, max_new_tokens=NEW, greedy=True, return_logprobs=True, use_cache=False)
    assert [t.tolist() for t in cached.tokens] == [t.tolist() for t in full.tokens]
    assert torch.allclose(torch.stack(cached.logprobs), torch.stack(full.logprobs), atol=1e-5, rtol=0)
    # Sampling too: same seed, same draws, whichever path computed the logits.
    a = _gen(tp1_model, max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=7)
    b = _gen(tp1_model, max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=7, use_cache=False)
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]


def test_eos_stops_one_row_while_others_continue(tp1_model):
    cfg, hf, batch, _, _, _, ref, _ = _reference()
    # An EOS that row 0 emits at step k but some other row never emits.
    eos, k = next(
        (t, j) for j, t in enumerate(ref[0].tolist()[1:-1], start=1)
        if t not in ref[0].tolist()[:j] and any(t not in ref[r].tolist() for r in (1, 2))
    )
    out = _gen(tp1_model, max_new_tokens=NEW, greedy=True, eos_token_id=[eos, 10_000])
    assert out.tokens[0].tolist() == ref[0, : k + 1].tolist() and bool(out.finished[0])
    survivors = [r for r in (1, 2) if eos not in ref[r].tolist()]
    for r in survivors:
        assert out.tokens[r].tolist() == ref[r].tolist() and not bool(out.finished[r])
    assert out.response_lengths.tolist() == [len(t) for t in out.tokens]
    with torch.no_grad():
        hf_tokens, _ = _hf_generate(hf, cfg, batch, max_new_tokens=NEW, eos_token_id=eos)
    assert [t.tolist() for t in out.tokens] == [_trim(row, [eos]) for row in hf_tokens]


def test_sampling_is_reproducible_and_filters_like_hf(tp1_model):
    cfg, _, _, _, _, _, ref, _ = _reference()
    a = _gen(tp1_model, max_new_tokens=NEW, temperature=1.0, seed=123, return_logprobs=True)
    b = _gen(tp1_model, max_new_tokens=NEW, generator=torch.Generator().manual_seed(123), return_logprobs=True)
    c = _gen(tp1_model, max_new_tokens=NEW, temperature=1.0, seed=124)
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert [t.tolist() for t in a.tokens] != [t.tolist() for t in c.tokens]
    assert all(int(t.max()) < cfg.text.vocab_size for t in a.tokens), "padded vocabulary must never be sampled"
    top1 = _gen(tp1_model, max_new_tokens=NEW, temperature=1.3, top_k=1, seed=5)
    assert [t.tolist() for t in top1.tokens] == ref.tolist()


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from m2mega.inference import filter_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 203, generator=g) * 3
    logits[0, :7] = 2.5  # ties at the top-k boundary
    for k, p in [(0, 0.9), (17, 1.0), (17, 0.5), (1, 1.0), (0, 0.01)]:
        want = logits.clone()
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1.0:
            want = TopPLogitsWarper(p)(None, want)
        assert torch.equal(filter_logits(logits, k, p), want), (k, p)


def test_bad_inputs_are_refused(tp1_model):
    from m2mega.inference import generate

    cfg, _, batch, pv, grids, _, _, _ = _reference()
    bad = list(batch.samples)
    bad[1] = bad[1].clone()
    bad[1][0] = cfg.text.vocab_size + 3
    with pytest.raises(ValueError, match="prompt 1 has token ids"):
        generate(tp1_model, bad, pixel_values=pv, image_grid_thw=grids, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty 1-D"):
        generate(tp1_model, [batch.samples[0][None]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 2: pixel_values"):
        generate(tp1_model, batch.samples, pixel_values=[pv[0], None, pv[2][:-4]], image_grid_thw=grids,
                 max_new_tokens=2)
    with pytest.raises(ValueError, match="placeholder"):  # image tokens without their image
        generate(tp1_model, batch.samples, pixel_values=[None, None, pv[2]], image_grid_thw=[None, None, grids[2]],
                 max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tp1_model, batch.samples, pixel_values=pv, image_grid_thw=grids, max_new_tokens=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        generate(tp1_model, batch.samples, pixel_values=pv, image_grid_thw=grids, max_new_tokens=1, pad_token_id=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(tp1_model, batch.samples, pixel_values=pv, image_grid_thw=grids, max_new_tokens=1, top_p=0.0)


# ----------------------------------------------------------------------------- TP2 x PP2 and TP2 + SP


def _layout_body(sd, samples, pv, grids):
    from megatron.core import parallel_state as ps

    import m2mega.runtime as rt
    from m2mega.inference import generate
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg = preset("tiny")
    results = {}
    for name, (tp, pp, sp) in {"tp2pp2": (2, 2, False), "tp2sp": (2, 1, True)}.items():
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        rt.init(tp, pp)
        fsl = 1 if pp > 1 else None
        model = build_model(cfg, first_stage_layers=fsl, language_overrides={"sequence_parallel": sp})
        load_hf_into_model(model, sd, cfg, first_stage_layers=fsl)
        kw = dict(pixel_values=pv, image_grid_thw=grids, pad_token_id=PAD, max_new_tokens=NEW)

        def sp_state():
            return [model.config.sequence_parallel] + [
                m.sequence_parallel for m in model.modules() if isinstance(getattr(m, "sequence_parallel", None), bool)
            ]

        before = sp_state()
        cached = generate(model, samples, greedy=True, **kw)
        full = generate(model, samples, greedy=True, use_cache=False, **kw)
        sampled = generate(model, samples, temperature=1.0, top_k=50, seed=99, return_logprobs=True, **kw)
        results[name] = {
            "cached": [t.tolist() for t in cached.tokens],
            "full": [t.tolist() for t in full.tokens],
            "sampled": [t.tolist() for t in sampled.tokens],
            "sampled_logp": [x for x in sampled.logprobs],
            "sp_restored": sp_state() == before and before[0] == sp,
            "training_restored": model.training,
        }
    return results


@pytest.mark.multirank
@pytest.mark.slow
def test_tp2pp2_and_tp2_sequence_parallel_generation():
    _, _, batch, pv, grids, sd, ref, _ = _reference()
    results = run_ranks(_layout_body, 4, args=(sd, batch.samples, pv, grids), timeout_s=600)
    for name in ("tp2pp2", "tp2sp"):
        per_rank = [r[name] for r in results]
        for rank, r in enumerate(per_rank):
            assert r["cached"] == ref.tolist(), f"{name} rank {rank}: greedy tokens differ from HF"
            assert r["full"] == r["cached"], f"{name} rank {rank}: KV cache differs from recompute"
            assert r["sampled"] == per_rank[0]["sampled"], f"{name}: rank {rank} sampled different tokens"
            assert all(torch.equal(a, b) for a, b in zip(r["sampled_logp"], per_rank[0]["sampled_logp"]))
            assert r["sp_restored"] and r["training_restored"], f"{name} rank {rank}: model state not restored"
