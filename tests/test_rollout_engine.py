"""The rollout engine (m2mega.inference.engine) on the tiny random Qwen2.5-VL, at TP1 in-process.

Same three ragged prompts as tests/test_generate.py (one 84x140 image, text only, two images), loaded with
the weights of the HF parity model:

- greedy: every sample of every group == HF ``generate`` == m2mega's ``generate()`` token for token, with
  fewer slots than samples (continuous batching refills slots) and several prompts per prefill;
- sampling: a sample's tokens depend only on (seed, request key, member), not on the number of slots, the
  request order or the other requests; the stream hash equals its Python reference;
- stop tokens, stop strings, per-request ``max_new_tokens``;
- the KV slab and the rotary table keep their addresses through a call and across calls; a padded
  static-shape decode (what CUDA graphs replay) gives the same logits as the compact one; the graph
  selection rule;
- rollout log-probs == the training forward's log-probs of the same tokens (teacher forcing, fp32);
- the inference stage's prefill logits == the training forward's logits;
- the benchmark command end to end at tiny sizes;
- (slow, 4 gloo ranks) TP2 x PP2, TP2 and PP2 (the fused CPU decode per stage): greedy == HF, samples identical on every rank and equal to TP1's.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2mega.models.qwen25vl import preset
from m2mega.runtime.multiproc import free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [[(84, 140)], [], [(56, 56), (28, 56)]]
NEW = 10
PAD = 0


def _config(kv_heads: int = 2):
    import dataclasses

    cfg = preset("tiny")
    return cfg if kv_heads == 2 else cfg.replace(text=dataclasses.replace(cfg.text, num_key_value_heads=kv_heads))


@functools.lru_cache(maxsize=2)
def _reference(kv_heads: int = 2):
    from m2mega.models.qwen25vl.hf_parity import build_hf_model, synthetic_batch

    cfg = _config(kv_heads)
    batch = synthetic_batch(cfg, IMAGES, seed=3)
    hf = build_hf_model(cfg, seed=11)
    S = max(s.numel() for s in batch.samples)
    ids = torch.full((len(batch.samples), S), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(batch.samples):
        ids[i, S - s.numel():] = s
        am[i, S - s.numel():] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=am, pixel_values=batch.pixel_values,
                          image_grid_thw=batch.image_grid_thw, mm_token_type_ids=(ids == cfg.image_token_id).int(),
                          do_sample=False, pad_token_id=PAD, max_new_tokens=NEW, eos_token_id=None)
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
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    return cfg, batch, pv, grids, sd, out[:, S:].tolist()


@pytest.fixture(scope="module")
def model():
    import m2mega.runtime as rt
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg, _, _, _, sd, _ = _reference()
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        m = build_model(cfg)
        load_hf_into_model(m, sd, cfg)
        yield m
    finally:
        rt.shutdown()


def _requests(G: int, order=(0, 1, 2), kv_heads: int = 2, **kw):
    from m2mega.inference.engine import Request

    _, batch, pv, grids, _, _ = _reference(kv_heads)
    return [Request(batch.samples[i], pv[i], grids[i], num_samples=G, key=i, **kw) for i in order]


def _tokens(out) -> list[list[list[int]]]:
    return [[s.tokens.tolist() for s in group] for group in out]


def ab_generate(model, sampling, **engine_kw):
    """The A/B workload of two engine settings: 3 samples of each prompt through 4 slots, the first
    prompt's samples stopping after 4 tokens (rows finish, later rows move into their slots, refills).
    Returns (engine, requests, output)."""
    from m2mega.inference.engine import RolloutEngine

    eng = RolloutEngine(model, max_batch=4, **engine_kw)
    reqs = _requests(3)
    reqs[0].max_new_tokens = 4
    return eng, reqs, eng.generate(reqs, max_new_tokens=NEW, sampling=sampling, seed=4)


def assert_same_samples(a, b) -> None:
    """Same tokens in every sample, log-probs within fp32 rounding (1e-5)."""
    assert _tokens(a) == _tokens(b)
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert torch.allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0), (x.logprobs - y.logprobs).abs().max()


def test_greedy_equals_generate_and_hf_with_continuous_batching(model):
    from m2mega.inference import generate
    from m2mega.inference.engine import RolloutEngine

    cfg, batch, pv, grids, _, hf = _reference()
    G = 3
    eng = RolloutEngine(model, max_batch=4, max_tokens_per_step=64)  # 9 samples through 4 slots
    out = eng.generate(_requests(G), max_new_tokens=NEW)
    assert _tokens(out) == [[row] * G for row in hf]
    assert all(s.stop == "length" and not s.finished for group in out for s in group)
    st = eng.stats
    assert st.slots == 4 and st.samples == 9 and st.generated_tokens == 9 * NEW
    assert st.images_encoded == 3, "each prompt's images go through the vision tower once, not once per sample"
    assert st.prompt_tokens == sum(s.numel() for s in batch.samples)
    old = generate(model, batch.samples, pixel_values=pv, image_grid_thw=grids, max_new_tokens=NEW, greedy=True,
                   pad_token_id=PAD, return_logprobs=True)
    assert [t.tolist() for t in old.tokens] == hf
    for group, lp in zip(out, old.logprobs):
        for s in group:
            assert torch.allclose(s.logprobs, lp, atol=1e-5, rtol=0), (s.logprobs - lp).abs().max()


def test_sampling_depends_only_on_seed_request_and_member(model):
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import RolloutEngine
    from m2mega.inference.sampling import _splitmix64, stream_key, stream_uniforms

    sp = SamplingParams(temperature=1.0, top_p=0.9)
    G = 4
    wide = RolloutEngine(model, max_batch=64).generate(_requests(G), max_new_tokens=NEW, sampling=sp, seed=7)
    narrow = RolloutEngine(model, max_batch=3).generate(_requests(G), max_new_tokens=NEW, sampling=sp, seed=7)
    reordered = RolloutEngine(model, max_batch=5).generate(_requests(G, order=(2, 0)), max_new_tokens=NEW,
                                                           sampling=sp, seed=7)
    assert _tokens(wide) == _tokens(narrow)
    assert _tokens(reordered) == [_tokens(wide)[2], _tokens(wide)[0]]
    members = [t for group in _tokens(wide) for t in group]
    assert len({tuple(t) for t in members}) == len(members), "group members must draw different samples"
    other = RolloutEngine(model, max_batch=64).generate(_requests(G), max_new_tokens=NEW, sampling=sp, seed=8)
    assert _tokens(other) != _tokens(wide)
    # top_k=1 sampling is greedy whatever the stream.
    _, _, _, _, _, hf = _reference()
    top1 = RolloutEngine(model).generate(_requests(1), max_new_tokens=NEW, sampling=SamplingParams(top_k=1), seed=3)
    assert _tokens(top1) == [[row] for row in hf]
    # The tensor hash is splitmix64 (checked against the Python reference, keys of both signs).
    keys = [stream_key(7, p, m) for p in range(3) for m in range(3)] + [-1, 2**63 - 1, -2**63]
    steps = list(range(len(keys)))
    want = [(_splitmix64(((k % 2**64) + (s + 1) * 0x9E3779B97F4A7C15) % 2**64) >> 11) / 2**53
            for k, s in zip(keys, steps)]
    assert stream_uniforms(torch.tensor(keys), torch.tensor(steps)).tolist() == want


def test_stop_tokens_stop_strings_and_per_request_max_new_tokens(model):
    from m2mega.inference.engine import Request, RolloutEngine

    _, batch, pv, grids, _, hf = _reference()
    # An EOS token that row 0 emits first at step k (k > 0) and row 1 not in its first 3 tokens.
    k, eos = next((j, t) for j, t in enumerate(hf[0]) if j > 0 and t not in hf[0][:j] and t not in hf[1][:3])
    reqs = [Request(batch.samples[0], pv[0], grids[0], num_samples=2),
            Request(batch.samples[1], num_samples=2, max_new_tokens=3)]
    out = RolloutEngine(model, max_batch=3).generate(reqs, max_new_tokens=NEW, eos_token_id=[eos, 10_000])
    assert [s.tokens.tolist() for s in out[0]] == [hf[0][:k + 1]] * 2 and out[0][0].stop == "eos"
    assert [s.tokens.tolist() for s in out[1]] == [hf[1][:3]] * 2 and out[1][0].stop == "length"
    # Samples that stop at their first token free their slots at once: later prompts are prefilled then.
    first = hf[0][0]
    out = RolloutEngine(model, max_batch=2).generate(_requests(3), max_new_tokens=NEW, eos_token_id=first)
    trim = [row[: row.index(first) + 1] if first in row else row for row in hf]
    assert _tokens(out) == [[t] * 3 for t in trim] and trim[0] == [first]
    # A stop string (of a toy detokeniser) completed by row 2's token j ends that sample there.
    text = lambda ids: "".join(f"<{t}>" for t in ids)  # noqa: E731
    j = next(j for j in range(2, NEW) if text(hf[2][j - 1:j + 1]) not in text(hf[2][:j]))
    out2 = RolloutEngine(model).generate([Request(batch.samples[2], pv[2], grids[2], num_samples=2)],
                                         max_new_tokens=NEW, stop_strings=["<none>", text(hf[2][j - 1:j + 1])],
                                         decode=text)
    assert [s.tokens.tolist() for s in out2[0]] == [hf[2][:j + 1]] * 2 and out2[0][0].stop == "stop_string"
    assert all(s.logprobs.numel() == s.tokens.numel() for g in out for s in g)
    with pytest.raises(ValueError, match="stop_strings need decode"):
        RolloutEngine(model).generate(reqs, max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="request 1: max_new_tokens"):
        RolloutEngine(model).generate([reqs[0], Request(batch.samples[1], max_new_tokens=0)], max_new_tokens=2)
    with pytest.raises(ValueError, match="request 0: pixel_values"):
        RolloutEngine(model).generate([Request(batch.samples[0], pv[0][:-4], grids[0])], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_kv_tokens"):
        RolloutEngine(model, max_kv_tokens=8).generate(reqs, max_new_tokens=2)


def test_slab_and_rotary_table_never_move_and_padded_decode_matches(model):
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import RolloutEngine

    eng = RolloutEngine(model, max_batch=4)
    seen = []
    real_decode = eng.stage.decode

    def spy(*args):
        slab = args[3]
        seen.append((slab.data_ptrs(), eng.stage.rotary.cos.data_ptr(), eng.stage.rotary.sin.data_ptr()))
        return real_decode(*args)

    eng.stage.decode = spy
    sp = SamplingParams(temperature=1.0)
    eng.generate(_requests(3), max_new_tokens=NEW, sampling=sp)
    eng.generate(_requests(2), max_new_tokens=NEW - 2, sampling=sp)  # smaller: reuses the slab
    assert len(seen) > NEW and len(set(seen)) == 1, "the slab or the rotary table was reallocated"
    assert eng.stats.slab_allocations == 1
    eng.stage.decode = real_decode
    # The static-shape step CUDA graphs replay: n live rows padded to a bucket with free slots (token 0 at
    # position 0, which their mask keeps open) gives the live rows the compact step's logits (up to the
    # batch-size-dependent rounding of the matmuls) and nothing non-finite.
    slab = eng.stage.new_slab(8, 64)
    tok = torch.tensor([5, 9, 11])
    pos = torch.tensor([20, 31, 7])
    for i in range(3):
        slab.k[:, i].normal_()
        slab.v[:, i].normal_()
        slab.mask[i, : int(pos[i]) + 1] = 0.0
    with torch.no_grad():
        compact = eng.stage.decode(tok, pos, pos + 2, slab, 64)
        pad = torch.zeros(5, dtype=torch.long)
        padded = eng.stage.decode(torch.cat([tok, pad]), torch.cat([pos, pad]), torch.cat([pos + 2, pad]), slab, 64)
    assert torch.isfinite(padded).all()
    assert torch.allclose(compact, padded[:3], atol=1e-5, rtol=0), (compact - padded[:3]).abs().max()


def test_cpu_fast_paths_equal_the_reference_ops(model):
    """The CPU decode's shortcuts: torch's rms_norm == the model's five-op RMSNorm bit for bit; packed
    [in, out] weights and matmul attention give SDPA + F.linear's logits (the packed runs take the fused
    decode step where m2mega._C has it: the engine's default); the packed copies exist only during
    generate()."""
    from m2mega.inference.engine import RolloutEngine
    from m2mega.inference.stage import _rms

    g = torch.Generator().manual_seed(0)
    for shape in ((1, 64), (7, 256), (33, 48)):
        x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
        ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.equal(_rms(x, w, 1e-6, False), ref)
    eng = RolloutEngine(model, max_batch=4)
    st = eng.stage
    slab = st.new_slab(4, 64)
    tok, pos = torch.tensor([5, 9, 11]), torch.tensor([20, 31, 7])
    for i in range(3):
        slab.k[:, i].normal_(generator=g)
        slab.v[:, i].normal_(generator=g)
        slab.mask[i, : int(pos[i]) + 1] = 0.0
    k0, v0 = slab.k.clone(), slab.v.clone()
    outs = {}
    with torch.no_grad():
        for packed in (False, True):
            for matmul in (False, True):
                slab.k.copy_(k0)
                slab.v.copy_(v0)
                st.matmul_attention = matmul
                if packed:
                    st.pack_weights()
                outs[packed, matmul] = st.decode(tok, pos, pos + 2, slab, 64)
                st.unpack_weights()
    st.matmul_attention = True
    ref = outs[False, False]  # F.linear + SDPA: what the model's own layers compute
    for key, out in outs.items():
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (key, (out - ref).abs().max())
    eng.generate(_requests(1), max_new_tokens=3)
    assert all(L.t is None for L in st.layers) and st.out_t is None, "packed weights outlived generate()"
    assert torch.equal(st.out_w, model.output_weight())


def test_cuda_graph_selection_rule():
    from m2mega.inference.engine import _bucket, use_cuda_graphs

    assert use_cuda_graphs("auto", "cuda", 1, 1, environ={}) is True
    assert use_cuda_graphs("auto", "cpu", 1, 1, environ={}) is False
    assert use_cuda_graphs("auto", "cuda", 2, 1, environ={}) is False  # collectives inside the step
    assert use_cuda_graphs("auto", "cuda", 1, 2, environ={}) is False
    assert use_cuda_graphs("off", "cuda", 1, 1, environ={}) is False
    assert use_cuda_graphs("auto", "cuda", 1, 1, environ={"M2MEGA_CUDA_GRAPHS": "off"}) is False
    with pytest.raises(ValueError, match="needs a CUDA device"):
        use_cuda_graphs("on", "cpu", 1, 1, environ={})
    with pytest.raises(ValueError, match="needs TP1 x PP1"):
        use_cuda_graphs("auto", "cuda", 2, 1, environ={"M2MEGA_CUDA_GRAPHS": "on"})
    with pytest.raises(ValueError, match="auto, on or off"):
        use_cuda_graphs("sometimes", "cuda", 1, 1, environ={})
    assert [_bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]


def test_cascade_decode_equals_slab_decode(model):
    """Cascade attention (each prompt's keys once per group, m2mega.inference.cascade) gives the slab
    path's tokens under greedy and sampling, through refills, moves and a prompt's group split over two
    admissions (4 slots, 3 samples of 3 prompts, the first prompt's samples stopping early so that later
    rows move into their slots), log-probs within fp32 rounding; the selection rule."""
    from m2mega.inference import SamplingParams
    from m2mega.inference.cascade import CascadeKV
    from m2mega.inference.engine import RolloutEngine, use_cascade
    from m2mega.inference.kv_cache import KVSlab

    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=1.0)):
        outs = {}
        for mode in ("off", "on"):
            eng, reqs, outs[mode] = ab_generate(model, sp, cascade=mode)
            assert isinstance(eng.slab, CascadeKV if mode == "on" else KVSlab) and eng.stats.cascade == (mode == "on")
            again = eng.generate(reqs[1:], max_new_tokens=NEW, sampling=sp, seed=4)  # the cache reused, reset
            assert _tokens(again) == _tokens(outs[mode])[1:] and eng.stats.slab_allocations == 1
        assert_same_samples(outs["on"], outs["off"])
        assert [len(x) for x in _tokens(outs["on"])[0]] == [4] * 3
    assert use_cascade("auto", True, [300, 500], [8, 8]) is True
    assert use_cascade("auto", True, [30, 50], [8, 8]) is False  # short prompts: re-reading them is cheaper
    assert use_cascade("auto", True, [300, 500], [1, 1]) is False  # nothing shared
    assert use_cascade("auto", False, [300, 500], [8, 8]) is False  # CUDA: the slab (graphs replay it)
    assert use_cascade("on", True, [3], [1]) is True and use_cascade("off", True, [300], [8]) is False
    with pytest.raises(ValueError, match="cascade must be"):
        RolloutEngine(model, cascade="sometimes")


def test_rollout_logprobs_match_teacher_forced_training_forward(model):
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import RolloutEngine
    from m2mega.inference.generate import _inference_mode

    cfg, batch, pv, grids, _, _ = _reference()
    eng = RolloutEngine(model, max_batch=3)
    out = eng.generate(_requests(2), max_new_tokens=NEW, sampling=SamplingParams(temperature=1.0), seed=5)
    worst = 0.0
    with _inference_mode(model):
        for i, group in enumerate(out):
            for s in group:
                seq = torch.cat([batch.samples[i], s.tokens])
                labels = torch.cat([seq[1:], seq.new_zeros(1)])
                ce = model(seq[None], pixel_values=pv[i], image_grid_thw=grids[i], labels=labels[None])[0]
                P = batch.samples[i].numel()
                train_lp = -ce[P - 1: P - 1 + s.tokens.numel()]
                worst = max(worst, float((train_lp - s.logprobs).abs().max()))
        # The inference stage's packed prefill (all three prompts in one forward) vs the training forward.
        from m2mega.inference.engine import _packed_positions

        stage = eng.stage
        ids = torch.cat(batch.samples)
        pos, _ = _packed_positions(model, batch.samples, batch.image_grid_thw, None, None)
        last, keys, _ = stage.prefill(ids, pos, [s.numel() for s in batch.samples], batch.pixel_values,
                                      batch.image_grid_thw)
        for i, smp in enumerate(batch.samples):
            ref = model(smp[None], pixel_values=pv[i], image_grid_thw=grids[i])[0, -1, : cfg.text.vocab_size]
            assert torch.allclose(last[i], ref, atol=1e-5, rtol=0), (last[i] - ref).abs().max()
    assert worst < 1e-4, worst
    assert len(keys) == cfg.text.num_layers and keys[0].shape == (ids.numel(), 2, cfg.text.head_dim)


def test_bench_command_end_to_end(tmp_path):
    from m2mega.inference.fused_decode import fused_decode_available

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "m2mega.inference.bench_rollout", "--layers", "1", "--prompts", "2",
           "--image-prompts", "1", "--image-size", "56", "56", "--prompt-len", "8", "12", "--group", "3",
           "--new-tokens", "6", "--eos-every", "30", "--repeats", "1", "--threads", "1", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["greedy"]["same_tokens"] is True
    for mode in ("greedy", "sample"):
        for name in ("static", "engine", "hf"):
            row = r[mode][name]
            assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["prefill_first_token_s"] > 0
        assert r[mode]["engine"]["images_encoded"] == 1  # one image prompt, encoded once for its 3 samples
        assert r[mode]["engine"]["fused_decode"] is fused_decode_available()  # --fused-decode auto
        assert r[mode]["engine_vs_hf"] > 0 and r[mode]["engine_vs_static"] > 0
    assert json.loads(p.stdout.strip().splitlines()[-1]) == r


def _layout_body(sd, samples, pv, grids):
    from megatron.core import parallel_state as ps

    import m2mega.runtime as rt
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import Request, RolloutEngine
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg = preset("tiny")
    results = {}
    # pp2 (TP1, 2 data-parallel replicas): each stage decodes with the fused CPU kernel where it is built.
    for name, (tp, pp) in {"tp2pp2": (2, 2), "tp2": (2, 1), "pp2": (1, 2)}.items():
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        rt.init(tp, pp)
        fsl = 1 if pp > 1 else None
        model = build_model(cfg, first_stage_layers=fsl)
        load_hf_into_model(model, sd, cfg, first_stage_layers=fsl)
        reqs = [Request(s, p, g, num_samples=2) for s, p, g in zip(samples, pv, grids)]
        eng = RolloutEngine(model, max_batch=4)
        greedy = eng.generate(reqs, max_new_tokens=NEW)
        sampled = eng.generate(reqs, max_new_tokens=NEW, sampling=SamplingParams(temperature=1.0, top_k=50), seed=9)
        results[name] = {"greedy": _tokens(greedy), "sampled": _tokens(sampled),
                         "logp": [s.logprobs for g in sampled for s in g], "fused": eng.stats.fused_decode}
    return results


@pytest.mark.multirank
@pytest.mark.slow
def test_engine_tp2pp2_tp2_pp2_match_hf_and_agree_across_ranks(model):
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import RolloutEngine
    from m2mega.runtime.multiproc import run_ranks

    _, batch, pv, grids, sd, hf = _reference()
    tp1 = _tokens(RolloutEngine(model, max_batch=4).generate(
        _requests(2), max_new_tokens=NEW, sampling=SamplingParams(temperature=1.0, top_k=50), seed=9))
    results = run_ranks(_layout_body, 4, args=(sd, batch.samples, pv, grids), timeout_s=600)
    from m2mega.inference.fused_decode import fused_decode_available

    assert [r["pp2"]["fused"] for r in results] == [fused_decode_available()] * 4
    assert not any(r[name]["fused"] for r in results for name in ("tp2pp2", "tp2"))
    for name in ("tp2pp2", "tp2", "pp2"):
        for rank, r in enumerate(results):
            assert r[name]["greedy"] == [[row] * 2 for row in hf], f"{name} rank {rank}: greedy differs from HF"
            assert r[name]["sampled"] == results[0][name]["sampled"], f"{name}: rank {rank} sampled differently"
            assert all(torch.equal(a, b) for a, b in zip(r[name]["logp"], results[0][name]["logp"]))
        # The streams do not depend on the layout either (up to last-bit differences of TP's reductions,
        # which a draw at a CDF boundary could notice: none here).
        assert results[0][name]["sampled"] == tp1, f"{name}: samples differ from TP1's"



def _tp_over_kv_body(sd, samples, pv, grids):
    import m2mega.runtime as rt
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import Request, RolloutEngine
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg = _config(1)
    rt.init(2, 1)
    model = build_model(cfg)
    load_hf_into_model(model, sd, cfg)
    eng = RolloutEngine(model, max_batch=4)
    assert eng.stage.kv_rep == 2 and eng.stage.groups == 1 and eng.stage.heads == 3
    reqs = [Request(s, p, g, num_samples=2) for s, p, g in zip(samples, pv, grids)]
    greedy = eng.generate(reqs, max_new_tokens=NEW)
    sampled = eng.generate(reqs, max_new_tokens=NEW, sampling=SamplingParams(temperature=1.0), seed=9)
    cascade = RolloutEngine(model, max_batch=4, cascade="on").generate(reqs, max_new_tokens=NEW)
    return {"greedy": _tokens(greedy), "sampled": _tokens(sampled), "logp": [s.logprobs for g in sampled for s in g],
            "cascade": _tokens(cascade)}


@pytest.mark.multirank
@pytest.mark.slow
def test_engine_tp2_over_one_kv_head_matches_hf_and_tp1(model):
    """TP2 with 1 KV head (each rank holds a replica of it, as megatron does): greedy == HF, and the
    samples and their log-probs equal TP1's on every rank."""
    from m2mega.inference import SamplingParams
    from m2mega.inference.engine import RolloutEngine
    from m2mega.models.qwen25vl import build_model, load_hf_into_model
    from m2mega.runtime.multiproc import run_ranks

    cfg, batch, pv, grids, sd, hf = _reference(1)
    m1 = build_model(cfg)
    load_hf_into_model(m1, sd, cfg)
    eng = RolloutEngine(m1, max_batch=4)
    assert _tokens(eng.generate(_requests(1, kv_heads=1), max_new_tokens=NEW)) == [[row] for row in hf]
    tp1 = eng.generate(_requests(2, kv_heads=1), max_new_tokens=NEW, sampling=SamplingParams(temperature=1.0), seed=9)
    results = run_ranks(_tp_over_kv_body, 2, args=(sd, batch.samples, pv, grids), timeout_s=600)
    for rank, r in enumerate(results):
        assert r["greedy"] == [[row] * 2 for row in hf], f"rank {rank}: greedy differs from HF"
        assert r["cascade"] == r["greedy"], f"rank {rank}: cascade attention's greedy tokens differ"
        assert r["sampled"] == _tokens(tp1), f"rank {rank}: samples differ from TP1's"
        for a, b in zip(r["logp"], [s.logprobs for g in tp1 for s in g]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()



def test_grpo_step_reports_rollout_speed_mismatch_eta_and_uses_rollout_logprobs_as_pi_old(tmp_path):
    """One GRPO run (spawned, TP1, 2 rollout steps) with ``grpo.old_logprobs: rollout``: the sampler's
    log-probs are pi_old, so with one update per step the ratio is 1 up to the train/rollout mismatch,
    which is logged (fp32: tiny); rollout tokens/s, its share of the step and the ETA are reported."""
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer
    from m2mega.runtime.multiproc import run_ranks
    from m2mega.testing.sample_files import write_sample_jsonl
    from test_grpo_runner import _body, _cfg

    write_sample_jsonl(str(tmp_path / "rows.jsonl"), 8, seed=3, rl_fraction=1.0, image_sides=(28, 56))
    tok = build_tiny_qwen_tokenizer(str(tmp_path / "tok"), vocab_size=300)
    preprocess([str(tmp_path / "rows.jsonl")], str(tmp_path / "rl"), PreprocessConfig(
        tokenizer_model=tok, order="curriculum", seq_length=512, progress=False, system_prompt=None))
    cfg = _cfg(str(tmp_path / "rl"), seed=4, iters=2, grpo={
        "prompts_per_step": 3, "group_size": 4, "max_new_tokens": 6, "kl_schedule": "constant", "beta": 0.0,
        "old_logprobs": "rollout", "rollout_batch": 5})
    hist = run_ranks(_body, 1, args=(cfg, 1), timeout_s=600, env={"TRITON_INTERPRET": "0"})[0]["metrics"]
    assert len(hist) == 2
    for m in hist:
        assert m["updates"] == 1 and m["groups"] - m["degenerate_groups"] >= 1, m
        assert 0 <= m["rollout_logp_mismatch_mean"] < 1e-4 and m["rollout_logp_mismatch_max"] < 1e-3, m
        assert abs(m["mean_ratio"] - 1.0) < 1e-4, m  # pi_old = the sampler's log-probs of the same tokens
        assert m["rollout_tokens_per_s"] > 0 and 0 < m["rollout_share"] < 1 and m["rollout_s"] > 0, m
    assert hist[0]["eta_s"] > 0 and hist[1]["eta_s"] == 0  # one rollout step left after the first, none after
