"""M-RoPE position ids: m2mega's get_rope_index vs HF transformers' Qwen2_5_VLModel.get_rope_index."""

from __future__ import annotations

import types

import pytest
import torch

from m2mega.models.qwen25vl.rope_index import get_rope_index, get_rope_index_batch, get_rope_index_packed

hf = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")

IMG, VID, VSTART, VEND = 151655, 151656, 151652, 151653
M = 2
TPS = 2


def _hf_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw=None, second_per_grid_ts=None):
    """Call HF's method without building a model: it only reads the config and a pure helper."""
    cfg = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=M, tokens_per_second=TPS))
    fake = types.SimpleNamespace(config=cfg)
    fake.get_vision_position_ids = lambda *a, **k: hf.Qwen2_5_VLModel.get_vision_position_ids(fake, *a, **k)
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == IMG] = 1
    mm[input_ids == VID] = 2
    return hf.Qwen2_5_VLModel.get_rope_index(
        fake, input_ids, mm, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
    )


def _sample(g, items, n_text=(1, 6)):
    """Random text with vision blocks (<start> pads <end>) for each (kind, grid) in items."""
    toks = []
    for kind, (t, h, w) in items:
        toks += torch.randint(0, 1000, (int(torch.randint(*n_text, (1,), generator=g)),), generator=g).tolist()
        toks += [VSTART] + [IMG if kind == "image" else VID] * (t * h * w // (M * M)) + [VEND]
    toks += torch.randint(0, 1000, (int(torch.randint(*n_text, (1,), generator=g)),), generator=g).tolist()
    return torch.tensor(toks)


def test_single_samples_match_hf():
    g = torch.Generator().manual_seed(0)
    cases = [
        [("image", (1, 6, 10))],
        [("image", (1, 4, 4)), ("image", (1, 8, 2)), ("image", (1, 2, 12))],
        [("image", (1, 10, 6)), ("video", (3, 4, 6)), ("image", (1, 2, 2))],
        [],
    ]
    for items in cases:
        ids = _sample(g, items)
        img = [gr for k, gr in items if k == "image"]
        vid = [gr for k, gr in items if k == "video"]
        img_t = torch.tensor(img) if img else None
        vid_t = torch.tensor(vid) if vid else None
        sec = torch.tensor([0.7] * len(vid)) if vid else None
        pos, delta = get_rope_index(
            ids, img_t, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
            spatial_merge_size=M, video_grid_thw=vid_t, second_per_grid_ts=sec, tokens_per_second=TPS,
        )
        ref, ref_delta = _hf_rope_index(ids[None], None, img_t, vid_t, sec)
        assert torch.equal(pos, ref[:, 0]), items
        assert delta == ref_delta.item()


def test_padded_batch_and_packed_match_hf():
    g = torch.Generator().manual_seed(1)
    samples = [
        [("image", (1, 4, 6)), ("image", (1, 6, 4))],
        [],
        [("image", (1, 2, 8))],
    ]
    ids = [_sample(g, s) for s in samples]
    grids = torch.tensor([gr for s in samples for _, gr in s])
    S = max(x.numel() for x in ids) + 2
    batch = torch.zeros(len(ids), S, dtype=torch.long)
    mask = torch.zeros(len(ids), S, dtype=torch.long)
    for b, x in enumerate(ids):  # left padding on even rows, right padding on odd rows
        sl = slice(S - x.numel(), S) if b % 2 == 0 else slice(0, x.numel())
        batch[b, sl] = x
        mask[b, sl] = 1
    ref, ref_delta = _hf_rope_index(batch, mask, grids)
    kw = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, spatial_merge_size=M)
    pos, delta = get_rope_index_batch(batch, mask, grids, **kw)
    assert torch.equal(pos, ref) and torch.equal(delta, ref_delta)

    packed, deltas = get_rope_index_packed(ids, grids, **kw)
    assert packed.shape == (3, sum(x.numel() for x in ids))
    off = 0
    for b, x in enumerate(ids):
        assert torch.equal(packed[:, off : off + x.numel()], ref[:, b, mask[b].bool()])
        off += x.numel()
    assert deltas == ref_delta.flatten().tolist()


def test_adjacent_images_without_text_are_split_by_grid():
    # Two images with only the start token between: HF's modality grouping needs text in between;
    # ours consumes the run grid by grid. The second image must start after the first's extent.
    ids = torch.tensor([5, VSTART] + [IMG] * 4 + [IMG] * 2 + [VEND, 7])
    pos, _ = get_rope_index(
        ids, torch.tensor([[1, 4, 4], [1, 2, 4]]), image_token_id=IMG, vision_start_token_id=VSTART
    )
    assert pos[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert pos[:, 6:8].tolist() == [[4, 4], [4, 4], [4, 5]]
    assert pos[:, 8].tolist() == [6, 6, 6]  # 4 + max(2, 4) // 2


def test_bad_inputs_raise_clear_errors():
    kw = dict(image_token_id=IMG, vision_start_token_id=VSTART)
    ids = torch.tensor([1, VSTART] + [IMG] * 4 + [VEND])
    with pytest.raises(ValueError, match="needs 6 placeholder"):
        get_rope_index(ids, torch.tensor([[1, 4, 6]]), **kw)
    with pytest.raises(ValueError, match="no grid left"):
        get_rope_index(ids, torch.tensor([[1, 2, 2]]), **kw)
    with pytest.raises(ValueError, match="only 1 image"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 2, 2]]), **kw)
    with pytest.raises(ValueError, match="vision-start"):
        get_rope_index(torch.tensor([1] + [IMG] * 4), torch.tensor([[1, 4, 4]]), **kw)
    with pytest.raises(ValueError, match="sample 1"):
        get_rope_index_packed([ids, ids], torch.tensor([[1, 4, 4], [1, 4, 6]]), **kw)
