"""THD packing loader: batch contents, DP sharding, orders, determinism, resume; RL prompt access."""

import numpy as np
import pytest
import torch

from m2mega.data.indexed import IndexedSamples
from m2mega.data.loader import IGNORE_INDEX, PackedTHDDataset, PromptDataset, THDLoader
from m2mega.data.packing import PackPlan, PromptPlan, greedy_pack_starts
from m2mega.data.preprocess import PreprocessConfig, preprocess
from m2mega.testing.sample_files import write_sample_jsonl
from m2mega.data.tokenizer import build_tiny_qwen_tokenizer
from m2mega.models.qwen25vl.rope_index import get_rope_index
from m2mega.ops.vision_pack import pack_images

SEQ = 600


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    tok = build_tiny_qwen_tokenizer(str(d / "tok"), vocab_size=800)
    path = str(d / "train.jsonl")
    write_sample_jsonl(path, 60, seed=5, n_images=6, max_images_per_row=2, rl_fraction=0.4)
    out = {}
    for name, order, fmt in [("input", "input", "pixels"), ("curriculum", "curriculum", "pixels"),
                             ("patches", "input", "patches")]:
        cfg = PreprocessConfig(tokenizer_model=tok, order=order, image_format=fmt, patch_dtype="float32",
                               progress=False, seq_length=SEQ)
        res = preprocess([path], str(d / name), cfg)
        assert res.rejected == 0
        out[name] = str(d / name)
    return out


def _check_batch(ds: PackedTHDDataset, mb):
    data = ds.data
    idx = mb.sample_indices.tolist()
    assert idx, "empty micro-batch"
    toks = [data.tokens(i) for i in idx]
    lens = [len(t) for t in toks]
    assert sum(lens) <= ds.seq_length
    T = mb.tokens.numel()
    assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == T
    assert mb.cu_seqlens[: len(idx) + 1].tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
    assert mb.max_seqlen == int(torch.diff(mb.cu_seqlens).max())
    real = sum(lens)
    assert torch.equal(mb.tokens[:real], torch.from_numpy(np.concatenate(toks)).long())
    # labels: next token inside each sample, ignored at sample ends and on padding
    off = 0
    for i, t in zip(idx, toks):
        n = len(t)
        assert mb.labels[off : off + n - 1].tolist() == t[1:].tolist()
        assert mb.labels[off + n - 1] == IGNORE_INDEX
        m = data.loss_mask(i)
        assert mb.loss_mask[off : off + n - 1].tolist() == m[1:].astype(np.float32).tolist()
        assert mb.loss_mask[off + n - 1] == 0
        grid = torch.from_numpy(data.grid_thw(i).astype(np.int64))
        pos, _ = get_rope_index(torch.from_numpy(t).long(), grid if len(grid) else None,
                                image_token_id=ds.image_token_id, vision_start_token_id=ds.vision_start_token_id)
        assert torch.equal(mb.position_ids[:, off : off + n], pos)
        off += n
    assert (mb.labels[real:] == IGNORE_INDEX).all() and (mb.loss_mask[real:] == 0).all()
    assert mb.num_padding == T - real
    # images: all of the samples' images, in order, through the packing op
    grids = [data.grid_thw(i) for i in idx]
    assert mb.image_grid_thw.tolist() == np.concatenate(grids).tolist()
    imgs = [im for i in idx for im in data.images(i)]
    if data.image_format == "pixels" and imgs:
        ref = pack_images(imgs, min_pixels=ds._images.min_pixels, max_pixels=ds._images.max_pixels)
        assert torch.equal(mb.pixel_values, ref.pixel_values) and torch.equal(mb.window_index, ref.window_index)
    elif imgs:
        assert torch.equal(mb.pixel_values, torch.cat(imgs))
    else:
        assert mb.pixel_values is None
    return idx


@pytest.mark.parametrize("name", ["input", "patches"])
def test_micro_batch_contents(prefixes, name):
    ds = PackedTHDDataset(prefixes[name], SEQ)
    for step in range(len(ds)):
        _check_batch(ds, ds[step])


def test_patches_and_pixels_give_same_batches(prefixes):
    a, b = PackedTHDDataset(prefixes["input"], SEQ), PackedTHDDataset(prefixes["patches"], SEQ)
    for step in range(3):
        x, y = a[step], b[step]
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.pixel_values, y.pixel_values)
        assert torch.equal(x.rot_pos_ids, y.rot_pos_ids) and torch.equal(x.cu_window_seqlens, y.cu_window_seqlens)


def test_padding(prefixes):
    ds = PackedTHDDataset(prefixes["input"], SEQ, pad_to_multiple_of=64)
    mb = ds[1]
    assert mb.tokens.numel() % 64 == 0 and mb.num_padding > 0
    assert mb.cu_seqlens.numel() == mb.sample_indices.numel() + 2  # padding is its own segment
    _check_batch(ds, mb)


@pytest.mark.parametrize("order", ["sequential", "shuffle", "bucket_shuffle"])
@pytest.mark.parametrize("dp", [1, 3])
def test_each_epoch_covers_every_sample_once_across_ranks(prefixes, order, dp):
    ranks = [PackedTHDDataset(prefixes["curriculum"], SEQ, dp_rank=r, dp_size=dp, order=order, seed=11) for r in range(dp)]
    plan = ranks[0].plan
    n_packs = plan.packs_in_epoch(0)
    seen, step = [], 0
    while len(seen) < len(ranks[0].data) and step < 1000:
        for r, ds in enumerate(ranks):
            g = step * dp + r
            if g < n_packs:
                assert ds.plan.epoch_of(step) == 0
                seen += ds.plan.samples(step).tolist()
        step += 1
    assert sorted(seen) == list(range(len(ranks[0].data)))
    # ranks get disjoint micro-batches at the same step
    if dp > 1:
        s0, s1 = set(ranks[0].plan.samples(0).tolist()), set(ranks[1].plan.samples(0).tolist())
        assert not s0 & s1


def test_sequential_reader_sees_curriculum(prefixes):
    ds = PackedTHDDataset(prefixes["curriculum"], SEQ, order="sequential")
    diff = np.asarray(ds.data.samples["difficulty"])
    order = np.concatenate([ds.plan.samples(s) for s in range(len(ds))])
    assert np.all(np.diff(diff[order]) >= 0)
    # the next epoch starts again from the easiest
    e1 = ds.plan.packs_in_epoch(0)
    assert ds.plan.global_pack(e1)[0] == 1 and ds.plan.global_pack(e1)[1][0] == order[0]


def test_bucket_shuffle_reshuffles_within_buckets(prefixes):
    ds = PackedTHDDataset(prefixes["curriculum"], SEQ, order="bucket_shuffle", num_buckets=4, seed=3)
    diff = np.asarray(ds.data.samples["difficulty"])
    epochs = []
    for e in range(2):
        order, _ = ds.plan._stream.epoch(e)
        buckets = np.minimum(np.floor(diff[order] * 4), 3)
        assert np.all(np.diff(buckets) >= 0)  # easy to hard at bucket granularity
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])


def test_deterministic_given_seed_and_step(prefixes):
    a = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=5, dp_rank=1, dp_size=2)
    b = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=5, dp_rank=1, dp_size=2)
    c = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=6, dp_rank=1, dp_size=2)
    steps = [7, 0, 3, 25]  # any access order, past the first epoch too
    got = [a[s].sample_indices.tolist() for s in steps]
    assert got == [b[s].sample_indices.tolist() for s in reversed(steps)][::-1]
    assert got != [c[s].sample_indices.tolist() for s in steps]


def _fields(mb):
    return (mb.step, mb.tokens, mb.labels, mb.loss_mask, mb.position_ids, mb.cu_seqlens, mb.pixel_values,
            mb.image_grid_thw, mb.sample_indices)


def _same(x, y):
    for u, v in zip(_fields(x), _fields(y)):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        else:
            assert u == v


def test_resume_equality(prefixes):
    ds = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=9, dp_rank=0, dp_size=2)
    total = len(ds) + 4  # crosses the epoch boundary
    cut = len(ds) - 1
    ref = list(THDLoader(ds, num_steps=total))
    assert ref[0].epoch == 0 and ref[-1].epoch == 1
    first = THDLoader(ds, num_steps=total)
    it = iter(first)
    head = [next(it) for _ in range(cut)]
    state = first.state_dict()
    assert state["next_step"] == cut
    # a fresh loader (with prefetching worker processes) resumes exactly at the cut: no replay, no skip
    ds2 = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=9, dp_rank=0, dp_size=2)
    second = THDLoader(ds2, num_steps=total, num_workers=2, prefetch_factor=2)
    second.load_state_dict(state)
    tail = list(second)
    assert [m.step for m in head + tail] == list(range(total))
    for x, y in zip(ref, head + tail):
        _same(x, y)
    bad = PackedTHDDataset(prefixes["input"], SEQ, order="shuffle", seed=10, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="seed"):
        THDLoader(bad).load_state_dict(state)


def test_too_long_samples_are_an_error(prefixes):
    with pytest.raises(ValueError, match="longer than seq_length=50"):
        PackedTHDDataset(prefixes["input"], 50)


def test_greedy_packing_keeps_order_and_fills():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 100, 500)
    starts = greedy_pack_starts(lens, 256)
    assert starts[0] == 0 and starts[-1] == len(lens)
    for a, b in zip(starts[:-1], starts[1:]):
        assert lens[a:b].sum() <= 256
        if b < len(lens):
            assert lens[a : b + 1].sum() > 256  # greedy: the next sample would not have fitted
    plan = PackPlan(lens, 256, order="sequential")
    assert np.concatenate([plan.samples(s) for s in range(len(starts) - 1)]).tolist() == list(range(500))


def test_prompts_for_grpo(prefixes):
    data = IndexedSamples(prefixes["curriculum"])
    rl = np.flatnonzero(np.asarray(data.samples["is_rl"]) == 1)
    ranks = [PromptDataset(prefixes["curriculum"], 4, dp_rank=r, dp_size=2, order="sequential") for r in range(2)]
    got = []
    for step in range(3):
        a, b = ranks[0].prompts(step), ranks[1].prompts(step)
        assert len(a) == len(b) == 2
        got += [p.index for p in a + b]
    assert got == rl[:12].tolist()  # the curriculum order, split across ranks step by step
    p = ranks[0].prompt(int(rl[0]))
    info = data.info(int(rl[0]))
    assert p.info.answer == info.answer and p.info.task == info.task and p.info.is_rl
    assert torch.equal(p.prompt_tokens, torch.from_numpy(data.tokens(int(rl[0]))).long())
    assert p.prompt_tokens[-1].item() != data.special["im_end_id"]
    assert p.position_ids.shape == (3, p.prompt_tokens.numel())
    assert p.rope_delta == int(p.position_ids.max()) + 1 - p.prompt_tokens.numel()
    n_img = len(data.grid_thw(int(rl[0])))
    assert p.image_grid_thw.shape == (n_img, 3) and (p.pixel_values is None) == (n_img == 0)
    # SFT rows used as prompts end right after the assistant header
    sft = int(np.flatnonzero(np.asarray(data.samples["is_rl"]) == 0)[0])
    q = ranks[0].prompt(sft)
    assert q.prompt_tokens.numel() == data.info(sft).prompt_len < data.info(sft).n_tokens


def test_prompt_plan_resume_and_shuffle():
    idx = np.arange(10, 40)
    a = PromptPlan(idx, 6, dp_rank=1, dp_size=3, order="shuffle", seed=1)
    b = PromptPlan(idx, 6, dp_rank=1, dp_size=3, order="shuffle", seed=1)
    assert a.prompts(9).tolist() == b.prompts(9).tolist()  # any step directly, same answer
    all_ranks = [PromptPlan(idx, 6, dp_rank=r, dp_size=3, order="shuffle", seed=1) for r in range(3)]
    epoch0 = [i for s in range(5) for p in all_ranks for i in p.prompts(s).tolist()]
    assert sorted(epoch0) == idx.tolist()
    with pytest.raises(ValueError, match="divisible"):
        PromptPlan(idx, 5, dp_size=2)
