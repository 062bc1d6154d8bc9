"""The fused CPU decode step (csrc/lm_decode_cpu.cpp, m2mega.inference.fused_decode) against the torch path.

- one decode step on a random KV slab (ragged slot lengths, a span that is not a multiple of anything,
  GQA with 1, 2 and 6 KV heads of the tiny model's 6 query heads, biases on every linear): logits within
  fp32 rounding of ``LMStage``'s torch path, the same keys/values written at the same slab positions, the
  hidden states of a non-last stage, the same bits at 1 and 2 threads;
- the engine end to end, fused on vs off: the same tokens under greedy (== HF ``generate``) and sampling,
  through continuous batching, log-probs within 1e-5;
- the selection rule (auto / on / off, ``M2MEGA_FUSED_DECODE``, one-line errors naming why) and the
  cascade threshold it moves; bad input to the kernel raises a ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from m2mega.inference.fused_decode import fused_decode_available, use_fused_decode
from m2mega.models.qwen25vl import preset
from m2mega.runtime.multiproc import free_port

needs_ext = pytest.mark.skipif(not fused_decode_available(), reason="m2mega._C not built with lm_decode_cpu")


@pytest.fixture(scope="module")
def runtime():
    import m2mega.runtime as rt

    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        rt.shutdown()


def _stage(kv_heads: int, seed: int):
    from m2mega.inference.stage import LMStage
    from m2mega.models.qwen25vl import build_model

    cfg = preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_key_value_heads=kv_heads))
    torch.manual_seed(seed)
    model = build_model(cfg)
    st = LMStage(model)
    g = torch.Generator().manual_seed(seed)
    for L in st.layers:  # every bias path of the kernel (Qwen2.5 itself has only the QKV bias)
        L.bproj = torch.randn(st.hidden, generator=g) * 0.1
        L.bfc1 = torch.randn(L.wfc1.shape[0], generator=g) * 0.1
        L.bfc2 = torch.randn(st.hidden, generator=g) * 0.1
    st.fused_decode = True
    return st


def _random_step(st, seed: int):
    g = torch.Generator().manual_seed(seed)
    slab = st.new_slab(7, 45)
    pos = torch.tensor([0, 3, 17, 38, 9])  # cache positions of the 5 live rows: ragged prefixes
    slab.k.normal_(generator=g)
    slab.v.normal_(generator=g)
    for i, p in enumerate(pos.tolist()):
        slab.mask[i, : p + 1] = 0.0
    tokens = torch.randint(0, st.vocab, (5,), generator=g)
    rope = pos + torch.tensor([4, 0, 2, 1, 30])  # M-RoPE: rotary positions run ahead of cache positions
    return slab, tokens, pos, rope, 39  # span 39: columns past it are never read


def _torch_step(st, slab, tokens, pos, rope, span):
    fused, st._fused = st._fused, None
    try:
        return st.decode(tokens, pos, rope, slab, span)
    finally:
        st._fused = fused


@needs_ext
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_fused_step_equals_torch_path(runtime, kv_heads):
    st = _stage(kv_heads, seed=kv_heads)
    slab, tokens, pos, rope, span = _random_step(st, seed=10 + kv_heads)
    k0, v0 = slab.k.clone(), slab.v.clone()
    with torch.no_grad():
        st.pack_weights()
        ref = _torch_step(st, slab, tokens, pos, rope, span)
        k_ref, v_ref = slab.k.clone(), slab.v.clone()
        outs = []
        for threads in (1, 2):
            slab.k.copy_(k0)
            slab.v.copy_(v0)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                outs.append(st.decode(tokens, pos, rope, slab, span))
            finally:
                torch.set_num_threads(before)
    assert ref.shape == outs[0].shape == (5, st.vocab)
    err = (outs[0] - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err
    # 1 vs 2 threads: the kernel's own loops split (slot, KV group) pairs, each computed alike; only MKL's
    # blocking may round differently.
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0), (outs[0] - outs[1]).abs().max()
    # The step's keys and values land where the torch path writes them, nothing else changes.
    assert torch.allclose(slab.k, k_ref, atol=1e-6, rtol=1e-6) and torch.allclose(slab.v, v_ref, atol=1e-6, rtol=1e-6)
    changed = (slab.k != k0).any(-1)
    assert changed.sum() == len(st.layers) * 5 * st.groups
    # A non-last pipeline stage gets the hidden states back (no final norm / output layer).
    from m2mega import _C

    fw = st._fused
    empty = torch.empty(0)
    x = st._embed(tokens).detach()
    slab.k.copy_(k0)
    slab.v.copy_(v0)
    with torch.no_grad():
        hidden = _C.lm_decode_cpu(x, st.rotary.cos, st.rotary.sin, rope, fw.flat, slab.k, slab.v, pos, slab.mask,
                                  span, st.groups, st.qpg, st.eps, st.scale, empty, empty)
        slab.k.copy_(k0)
        slab.v.copy_(v0)
        cos, sin = st.rotary.lookup(rope)
        want = st._layers(x, cos, sin, st._slab_attend(slab, pos, 5, span))
    assert torch.allclose(hidden, want, atol=1e-5, rtol=1e-5), (hidden - want).abs().max()
    st.unpack_weights()
    assert st._fused is None


@needs_ext
def test_fused_kernel_rejects_bad_input(runtime):
    from m2mega import _C

    st = _stage(2, seed=0)
    slab, tokens, pos, rope, span = _random_step(st, seed=1)
    st.pack_weights()
    fw = st._fused
    x = st._embed(tokens).detach()

    def call(**kw):
        a = dict(x=x, cos=st.rotary.cos, sin=st.rotary.sin, rope=rope, flat=fw.flat, pos=pos, span=span)
        a.update(kw)
        with torch.no_grad():
            return _C.lm_decode_cpu(a["x"], a["cos"], a["sin"], a["rope"], a["flat"], slab.k, slab.v, a["pos"],
                                    slab.mask, a["span"], st.groups, st.qpg, st.eps, st.scale, fw.final_ln, fw.out_t)

    with pytest.raises(ValueError, match="lm_decode_cpu: x must be a contiguous fp32 CPU tensor"):
        call(x=x.double())
    with pytest.raises(ValueError, match="cache position 38 outside the span"):
        call(span=20)
    with pytest.raises(ValueError, match="rotary position -1 outside the table"):
        call(rope=rope - 5)
    with pytest.raises(ValueError, match="10 tensors per layer"):
        call(flat=fw.flat[:-1])
    with pytest.raises(ValueError, match="layer 1 weights do not match"):
        call(flat=fw.flat[:11] + [fw.flat[11][:, :-1].contiguous()] + fw.flat[12:])


@needs_ext
def test_engine_fused_on_equals_off_and_hf(runtime):
    """Through the engine (4 slots for 3 prompts x 3 samples, so rows finish, move and refill), with the
    HF parity model's weights: greedy tokens == HF generate's, fused on == off; sampled tokens equal."""
    pytest.importorskip("transformers")
    from test_rollout_engine import _reference, _tokens, ab_generate, assert_same_samples

    from m2mega.inference import SamplingParams
    from m2mega.models.qwen25vl import build_model, load_hf_into_model

    cfg, _, _, _, sd, hf = _reference()
    model = build_model(cfg)
    load_hf_into_model(model, sd, cfg)
    for sp in (SamplingParams(greedy=True), SamplingParams(temperature=1.0)):
        outs = {}
        for mode in ("on", "off"):
            eng, _, outs[mode] = ab_generate(model, sp, fused_decode=mode)
            assert eng.stats.fused_decode == (mode == "on")
        assert_same_samples(outs["on"], outs["off"])
        if sp.is_greedy:  # the first prompt's samples stop after 4 tokens
            assert _tokens(outs["on"]) == [[hf[0][:4]] * 3] + [[row] * 3 for row in hf[1:]]


def test_fused_decode_selection_rule():
    from m2mega.inference.cascade import CASCADE_MIN_PROMPT_FUSED, use_cascade

    def stage(**kw):
        base = dict(device=torch.device("cpu"), dtype=torch.float32, tp=1, act=F.silu)
        base.update(kw)
        return SimpleNamespace(**base)

    ok = fused_decode_available()
    assert use_fused_decode("auto", stage(), environ={}) is ok
    assert use_fused_decode("off", stage(), environ={}) is False
    assert use_fused_decode("auto", stage(), environ={"M2MEGA_FUSED_DECODE": "off"}) is False
    for kw, why in ((dict(dtype=torch.bfloat16), "fp32 weights"), (dict(device=torch.device("cuda")), "a CPU model"),
                    (dict(tp=2), "TP1"), (dict(act=F.gelu), "a SwiGLU MLP")):
        assert use_fused_decode("auto", stage(**kw), environ={}) is False
        with pytest.raises(ValueError, match=f"fused_decode=on needs {why}"):
            use_fused_decode("on", stage(**kw), environ={})
        with pytest.raises(ValueError, match=f"fused_decode=on needs {why}"):
            use_fused_decode("auto", stage(**kw), environ={"M2MEGA_FUSED_DECODE": "on"})
    with pytest.raises(ValueError, match="auto, on or off"):
        use_fused_decode("fast", stage(), environ={})
    # The fused slab decode outruns cascade attention up to prompts of ~2k tokens (docs/generate.md).
    assert use_cascade("auto", True, [300, 500], [8, 8], fused_decode=False) is True
    assert use_cascade("auto", True, [300, 500], [8, 8], fused_decode=True) is False
    long = [CASCADE_MIN_PROMPT_FUSED, CASCADE_MIN_PROMPT_FUSED + 10]
    assert use_cascade("auto", True, long, [8, 8], fused_decode=True) is True
    assert use_cascade("on", True, [30], [8], fused_decode=True) is True
