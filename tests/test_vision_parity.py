"""Qwen2.5-VL vision tower: metadata, packed attention and encoder output vs HF transformers (CPU)."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from m2mega.models.qwen25vl import preset
from m2mega.runtime.multiproc import free_port

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

# (t, h, w) patch grids: several windows, exact multiples of the window (HF pads an empty window then
# drops it), a 2-frame video grid, a single merge block.
GRIDS = [(1, 6, 10), (1, 16, 8), (2, 4, 6), (1, 2, 2), (1, 10, 14)]


@needs_hf
def test_vision_metadata_matches_hf():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    from m2mega.models.qwen25vl.vision import _vision_metadata, vision_metadata

    grid = torch.tensor(GRIDS)
    want_cu = get_vision_cu_seqlens(grid)
    want_idx, want_cuw = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    want_rot = get_vision_position_ids(grid, 2)
    for fn in {_vision_metadata, vision_metadata}:  # the private fallback and whatever the model uses
        cu, idx, cuw, rot = fn(grid, merge_size=2, window_size=112, patch_size=14)
        assert torch.equal(cu.long(), want_cu.long())
        assert torch.equal(idx.long(), want_idx.long())
        assert torch.equal(cuw.long(), want_cuw.long())
        assert torch.equal(rot.long(), want_rot.long())
    with pytest.raises(ValueError, match="not divisible by the merge size"):
        _vision_metadata(torch.tensor([[1, 3, 4]]))


def _naive_segments(q, k, v, lengths, causal, scale):
    outs, off = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = q[off : off + n], k[off : off + n].repeat_interleave(rep, 1), v[off : off + n].repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs.double(), ks.double()) * scale
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vs.double()))
        off += n
    return torch.cat(outs).float()


@pytest.mark.parametrize("causal", [False, True])
def test_segment_attention_chunks_match_naive(monkeypatch, causal):
    from m2mega.models.qwen25vl import attention

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 17, 3, 9, 30, 2]
    T = sum(lengths)
    q = torch.randn(T, 6, 8, generator=g)
    k = torch.randn(T, 2, 8, generator=g)
    v = torch.randn(T, 2, 8, generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    want = _naive_segments(q, k, v, lengths, causal, 0.3)
    # Small chunks: several segments share a chunk (block mask), one exceeds the chunk, long ones run alone.
    assert attention._chunks(lengths, 20, 9) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert attention._chunks(lengths, 4096, 1024) == [(0, 7)]
    for chunk, solo in ((20, 9), (20, 1000), (4096, 1024)):
        monkeypatch.setattr(attention, "_SDPA_CHUNK_TOKENS", chunk)
        monkeypatch.setattr(attention, "_SDPA_SOLO_TOKENS", solo)
        got = attention.segment_attention(q, k, v, cu, None, causal=causal, scale=0.3, backend="sdpa")
        assert (got - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="cu_seqlens ends at"):
        attention.segment_attention(q[:-1], k[:-1], v[:-1], cu, None, causal=causal, scale=0.3)


def test_dense_attention_decode_alignment_and_padding():
    from m2mega.models.qwen25vl.attention import dense_attention

    g = torch.Generator().manual_seed(1)
    sk, sq, b = 7, 2, 2
    k = torch.randn(sk, b, 2, 4, generator=g)
    v = torch.randn(sk, b, 2, 4, generator=g)
    q_full = torch.randn(sk, b, 4, 4, generator=g)
    full = dense_attention(q_full, k, v, None, causal=True, scale=0.5)
    # The last sq queries against all keys (KV-cache decoding) equal the tail of the full causal pass.
    tail = dense_attention(q_full[-sq:], k, v, None, causal=True, scale=0.5)
    assert (tail - full[-sq:]).abs().max() < 1e-6
    # Left padding of 3 keys in batch row 1 (True = masked): real queries ignore them, no NaN anywhere.
    mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    mask[1, ..., :3] = True
    out = dense_attention(q_full, k, v, mask, causal=True, scale=0.5)
    assert torch.isfinite(out).all()
    ref_row1 = dense_attention(q_full[3:, 1:], k[3:, 1:], v[3:, 1:], None, causal=True, scale=0.5)
    assert (out[3:, 1:] - ref_row1).abs().max() < 1e-6
    assert (out[:, :1] - full[:, :1]).abs().max() < 1e-6


@contextlib.contextmanager
def _single_rank():
    import m2mega.runtime as rt

    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        rt.shutdown()


@needs_hf
def test_vision_tower_matches_hf():
    from m2mega.models.qwen25vl.hf_parity import build_hf_model
    from m2mega.models.qwen25vl.sharding import hf_to_mcore
    from m2mega.models.qwen25vl.vision import VisionTransformer

    cfg = preset("tiny")
    hf = build_hf_model(cfg, seed=4)
    grid = torch.tensor(GRIDS)
    g = torch.Generator().manual_seed(2)
    pv = torch.randn(int(grid.prod(-1).sum()), cfg.vision.patch_dim, generator=g)
    with torch.no_grad():
        want = hf.model.visual(pv, grid_thw=grid).pooler_output
    full = hf_to_mcore(hf.state_dict(), cfg)
    prefix = "vision_model."
    with _single_rank():
        vit = VisionTransformer(cfg.vision_transformer_config(1), cfg.merger_transformer_config(1), cfg.vision)
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        res = vit.load_state_dict(sd, strict=False)
        assert not [k for k in res.missing_keys if not k.endswith("_extra_state")] and not res.unexpected_keys
        with torch.no_grad():
            got = vit(pv, grid)
        assert got.shape == want.shape == (int(grid.prod(-1).sum()) // 4, cfg.text.hidden_size)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-5, f"fp32 vision output rel error {rel:.2e}"
        with pytest.raises(ValueError, match="do not match grid_thw"):
            vit(pv[:-1], grid)

        # bf16: both sides in bf16 on the same weights (different rounding orders): loose bound.
        vit_bf = VisionTransformer(
            cfg.vision_transformer_config(1, torch.bfloat16), cfg.merger_transformer_config(1, torch.bfloat16),
            cfg.vision,
        )
        vit_bf.load_state_dict({k: v.bfloat16() for k, v in sd.items()}, strict=False)
        hf_bf = hf.to(torch.bfloat16)
        with torch.no_grad():
            got_bf = vit_bf(pv.bfloat16(), grid).float()
            want_bf = hf_bf.model.visual(pv.bfloat16(), grid_thw=grid).pooler_output.float()
        rel_bf = ((got_bf - want_bf).abs().max() / want_bf.abs().max()).item()
        assert rel_bf < 3e-2, f"bf16 vision output rel error {rel_bf:.2e}"
