"""Videos through the m2mega Qwen2.5-VL vs HF's Qwen2_5_VLForConditionalGeneration (fp32, CPU, same weights).

Two samples: a video alone (4 frames, 0.5 s per temporal grid step) and an image followed by a video
(6 frames, 1.25 s per step: the temporal position step 2.5 is truncated, as HF does), plus a text-only
sample. The model computes the M-RoPE ids itself from ``video_grid_thw`` and ``second_per_grid_ts``.
Logits (padded batch and THD-packed) must match HF's to a max relative error < 1e-4, at TP1 in-process
and at TP2 in one spawn of two gloo ranks. At TP1 also: GRPO rollouts of the three prompts (the generator's
video path) equal HF's greedy ``generate`` token for token, and the GRPO update's packed micro-batch of
those rollouts (prompt + response, videos included) gives HF's logits.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from m2mega.models.qwen25vl import preset
from m2mega.models.qwen25vl.hf_parity import build_hf_model, hf_forward, synthetic_batch
from m2mega.models.qwen25vl.sharding import hf_to_mcore
from m2mega.runtime.multiproc import free_port, run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

LOGIT_TOL = 1e-4
IMAGES = [[], [(56, 56)], []]
VIDEOS = [[(4, 56, 84, 0.5)], [(6, 112, 56, 1.25)], []]


@functools.lru_cache(maxsize=1)
def _reference():
    cfg = preset("tiny")
    batch = synthetic_batch(cfg, IMAGES, seed=4, videos_per_sample=VIDEOS, extra_text=[0, 0, 3])
    hf = build_hf_model(cfg, seed=13)
    with torch.no_grad():
        logits = hf_forward(hf, cfg, batch)
    return cfg, batch, {k: v.detach().clone() for k, v in hf.state_dict().items()}, logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _logits(model, batch):
    """(BSHD logits [b, s, V_pad/TP], THD logits [1, T, V_pad/TP]) of this rank."""
    from m2mega.models.qwen25vl import packed_seq_params_from_lengths

    ids, am = batch.padded()
    packed, lens = batch.packed()
    with torch.no_grad():
        bshd = model(ids, attention_mask=am, **batch.vision_kwargs())
        thd = model(packed, packed_seq_params=packed_seq_params_from_lengths(lens), **batch.vision_kwargs())
    return bshd, thd


def test_video_positions_use_the_time_axis():
    """The reference batch exercises what the parity checks rely on: second_per_grid_ts moves the
    temporal M-RoPE ids (0.5 s -> step 1, 1.25 s -> step 2.5 truncated), so a model ignoring it would fail."""
    from m2mega.models.qwen25vl.rope_index import get_rope_index

    cfg, batch, *_ = _reference()
    assert batch.video_grid_thw.tolist() == [[2, 4, 6], [3, 8, 4]]
    kw = dict(image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
              vision_start_token_id=cfg.vision_start_token_id)
    ids = batch.samples[1]
    pos, _ = get_rope_index(ids, batch.image_grid_thw, video_grid_thw=batch.video_grid_thw[1:],
                            second_per_grid_ts=batch.second_per_grid_ts[1:], **kw)
    t = pos[0][ids == cfg.video_token_id]
    assert (t.unique() - t.min()).tolist() == [0, 2, 5]
    flat, _ = get_rope_index(ids, batch.image_grid_thw, video_grid_thw=batch.video_grid_thw[1:],
                             second_per_grid_ts=torch.tensor([0.5]), **kw)
    assert not torch.equal(flat, pos)


def _per_sample(batch) -> list[dict]:
    """Each sample's own images / videos (RLPrompt fields)."""
    out, off = [], {"i": 0, "v": 0, "pi": 0, "pv": 0}
    for imgs, vids in zip(IMAGES, VIDEOS):
        gi = batch.image_grid_thw[off["i"] : off["i"] + len(imgs)]
        gv = batch.video_grid_thw[off["v"] : off["v"] + len(vids)]
        ni, nv = int(gi.prod(-1).sum()), int(gv.prod(-1).sum())
        out.append(dict(pixel_values=batch.pixel_values[off["pi"] : off["pi"] + ni] if imgs else None,
                        image_grid_thw=gi, video_grid_thw=gv,
                        pixel_values_videos=batch.pixel_values_videos[off["pv"] : off["pv"] + nv] if vids else None,
                        second_per_grid_ts=batch.second_per_grid_ts[off["v"] : off["v"] + len(vids)]))
        off = {"i": off["i"] + len(imgs), "v": off["v"] + len(vids), "pi": off["pi"] + ni, "pv": off["pv"] + nv}
    return out


def _hf_greedy(cfg, batch, sd, new_tokens: int, suppress: list[int]) -> list[list[int]]:
    """HF ``generate`` (greedy, left padding, vision tokens suppressed as GRPO does)."""
    hf = build_hf_model(cfg, seed=13)
    hf.load_state_dict(sd)
    S = max(x.numel() for x in batch.samples)
    ids = torch.zeros(len(batch.samples), S, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, x in enumerate(batch.samples):
        ids[i, S - x.numel():], am[i, S - x.numel():] = x, 1
    mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=am, mm_token_type_ids=mm, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                          suppress_tokens=suppress, **batch.vision_kwargs())
    return out[:, S:].tolist()


def _rollouts_and_update_batch(model, cfg, batch):
    """GRPO's path: RLPrompts -> generate_rollouts (2 per prompt) -> pack_rollouts -> model logits."""
    from m2mega.data.indexed import SampleInfo
    from m2mega.data.loader import RLPrompt, model_inputs
    from m2mega.models.qwen25vl.rope_index import get_rope_index
    from m2mega.rl.rollout import generate_rollouts
    from m2mega.train.grpo_update import pack_rollouts

    prompts = []
    for i, (ids, vis) in enumerate(zip(batch.samples, _per_sample(batch))):
        pos, delta = get_rope_index(
            ids, vis["image_grid_thw"] if len(vis["image_grid_thw"]) else None, image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
            video_grid_thw=vis["video_grid_thw"] if len(vis["video_grid_thw"]) else None,
            second_per_grid_ts=vis["second_per_grid_ts"])
        info = SampleInfo(i, str(i), "1", "spatial", "number", 0.5, float("nan"), True, ids.numel(), ids.numel(), "", i)
        prompts.append(RLPrompt(index=i, prompt_tokens=ids, position_ids=pos, rope_delta=delta, info=info, **vis))
    r = generate_rollouts(model, prompts, group_size=2, max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=[],
                          pad_token_id=0, seed=0)
    n = r.n
    mb = pack_rollouts(r, list(range(n)), torch.zeros(n), torch.ones(n))
    assert mb.video_grid_thw.tolist() == [g for k in range(len(prompts)) for g in
                                          2 * prompts[k].video_grid_thw.tolist()]
    with torch.no_grad():
        logits = model(**model_inputs(mb, with_labels=False))
    return r, logits


NEW_TOKENS = 5


def test_tp1_video_logits_generation_and_rollouts_match_hf():
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    import m2mega.runtime as rt

    cfg, batch, sd, ref = _reference()
    V = cfg.text.vocab_size
    _, am = batch.padded()
    keep = am.bool()
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model = build_model(cfg)
        load_hf_into_model(model, sd, cfg)
        bshd, thd = _logits(model, batch)
        rollouts, packed_logits = _rollouts_and_update_batch(model, cfg, batch)
    finally:
        rt.shutdown()
    e_bshd, e_thd = _rel(bshd[..., :V][keep], ref[keep]), _rel(thd[0, :, :V], ref[keep])
    print(f"TP1 video logits rel err: BSHD {e_bshd:.1e}, THD {e_thd:.1e}")
    assert e_bshd < LOGIT_TOL and e_thd < LOGIT_TOL

    suppress = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    want = _hf_greedy(cfg, batch, sd, NEW_TOKENS, suppress)
    got = [t.tolist() for t in rollouts.response_tokens]
    assert got == [w for w in want for _ in range(2)], "rollouts differ from HF greedy generation"

    # The update batch: each rollout's prompt + response through HF (videos repeated per rollout).
    full = type(batch)([torch.cat([batch.samples[i // 2], rollouts.response_tokens[i]]) for i in range(rollouts.n)],
                       None, None, [torch.zeros(1)] * rollouts.n)
    parts = [p for p in _per_sample(batch) for _ in range(2)]
    cat = lambda k: torch.cat([p[k] for p in parts if p[k] is not None and len(p[k])])  # noqa: E731
    full.image_grid_thw, full.pixel_values = cat("image_grid_thw"), cat("pixel_values")
    full.video_grid_thw, full.pixel_values_videos = cat("video_grid_thw"), cat("pixel_values_videos")
    full.second_per_grid_ts = cat("second_per_grid_ts")
    hf = build_hf_model(cfg, seed=13)
    hf.load_state_dict(sd)
    with torch.no_grad():
        ref_full = hf_forward(hf, cfg, full)
    keep_full = full.padded()[1].bool()
    e_upd = _rel(packed_logits[0, :, :V], ref_full[keep_full])
    print(f"TP1 GRPO update batch (rollouts with videos) logits rel err: {e_upd:.1e}")
    assert e_upd < LOGIT_TOL


def _tp2_body(cfg, batch, sd):
    from megatron.core import tensor_parallel

    import m2mega.runtime as rt
    from m2mega.models.qwen25vl import build_model, load_full_into_model

    rt.init(2, 1)
    torch.manual_seed(999)  # a different init: parity must come from the loaded weights
    model = build_model(cfg)
    load_full_into_model(model, hf_to_mcore(sd, cfg), cfg)
    bshd, thd = _logits(model, batch)
    gather = tensor_parallel.gather_from_tensor_model_parallel_region
    return {"bshd": gather(bshd), "thd": gather(thd)}


@pytest.mark.multirank
def test_tp2_video_logits_match_hf():
    cfg, batch, sd, ref = _reference()
    V = cfg.text.vocab_size
    _, am = batch.padded()
    keep = am.bool()
    for rank, r in enumerate(run_ranks(_tp2_body, 2, args=(cfg, batch, sd), timeout_s=300)):
        e_bshd, e_thd = _rel(r["bshd"][..., :V][keep], ref[keep]), _rel(r["thd"][0, :, :V], ref[keep])
        print(f"TP2 rank {rank} video logits rel err: BSHD {e_bshd:.1e}, THD {e_thd:.1e}")
        assert e_bshd < LOGIT_TOL and e_thd < LOGIT_TOL
