"""Videos in the data path: the sampling rule (qwen-vl-utils, side by side when it is installed), the reject
codes of bad videos, and the user's command: JSONL with video rows -> tools/preprocess_data.py -> loader
batches with ``video_grid_thw`` / ``second_per_grid_ts`` -> the synthetic video family."""

from __future__ import annotations

import filecmp
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m2mega.data.video import (VIDEO_DEFAULTS, VideoOptions, VideoSpec, encode_video, frame_pixel_bounds,
                               load_video, sample_indices, smart_nframes, video_smart_resize)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
SMALL = {"min_pixels": 56 * 56, "max_pixels": 84 * 84}  # tiny frames: few tokens per temporal step


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A red square moving right over a gradient, so neighbouring frames differ."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    out = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        f = base.copy() + rng.integers(0, 30, (h, w, 3))
        x = (k * 7) % max(1, w - 12)
        f[h // 4 : h // 4 + 12, x : x + 12] = (230, 0, 0)
        out[k] = f.clip(0, 255).astype(np.uint8)
    return out


def _clip(path, n, fps=4.0, h=56, w=84, codec="libx264", **container_options) -> str:
    encode_video(str(path), _frames(n, h, w), fps, codec, container_options)
    return str(path)


# --------------------------------------------------------------------------------- the sampling rule


def _qwen_rule(total, video_fps, ele, h, w, total_pixels=128000 * 28 * 28 * 0.9):
    """qwen-vl-utils 0.0.14, vision_process.py (smart_nframes, the decord/torchcodec index line and
    fetch_video's pixel bounds and smart_resize), transcribed literally: (indices, sample_fps, (rh, rw))."""
    f = 28
    fps = ele.get("fps", 2.0)
    min_frames = math.ceil(ele.get("min_frames", 4) / 2) * 2
    max_frames = math.floor(ele.get("max_frames", min(768, total)) / 2) * 2
    nframes = total / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total)
    nframes = math.floor(nframes / 2) * 2
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()
    sample_fps = nframes / max(total, 1e-6) * video_fps
    min_pixels = ele.get("min_pixels", 128 * f * f)
    max_pixels = max(min(768 * f * f, total_pixels / nframes * 2), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    h_bar, w_bar = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar, w_bar = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return idx, sample_fps, (h_bar, w_bar)


def test_sampling_rule_matches_qwen_vl_utils():
    cases = [
        (8, 4.0, {}, 56, 84), (40, 4.0, {"fps": 1.0}, 90, 160), (301, 29.97, {}, 480, 640),
        (3001, 30.0, {}, 1080, 1920), (3001, 30.0, {"max_frames": 64}, 720, 1280),
        (17, 24.0, {"min_pixels": 3136, "max_pixels": 7056}, 100, 75), (5, 2.0, {"min_frames": 2}, 64, 64),
        (90000, 25.0, {}, 360, 640),  # long: the frames x pixels cap lowers max_pixels
        (100, 10.0, {"max_pixels": 50000}, 300, 500),
    ]
    for total, src_fps, ele, h, w in cases:
        opts = VideoOptions(**{**VIDEO_DEFAULTS.__dict__, **ele})
        want_idx, want_fps, want_size = _qwen_rule(total, src_fps, ele, h, w)
        n = smart_nframes(total, src_fps, opts)
        assert sample_indices(total, n) == want_idx, (total, ele)
        assert n / total * src_fps == pytest.approx(want_fps, rel=1e-12)
        lo, hi = frame_pixel_bounds(n, opts, 128000 * 28 * 28 * 0.9)
        assert video_smart_resize(h, w, lo, hi) == want_size, (total, ele, h, w)


def test_side_by_side_with_qwen_vl_utils(tmp_path):
    """Same frame indices, sampled fps and resized frames as qwen-vl-utils' fetch_video on the same files
    (an H.264 clip whose frames are really resized, a lossless FFV1 clip) and on a frame list."""
    vp = pytest.importorskip("qwen_vl_utils.vision_process")
    files = [_clip(tmp_path / "a.mp4", 21, 6.0, h=90, w=160), _clip(tmp_path / "b.mkv", 9, 4.0, codec="ffv1")]
    for path in files:
        for ele in ({}, {"fps": 1.0}, SMALL, {"max_frames": 4, "min_pixels": 3136, "max_pixels": 28 * 28 * 9}):
            (ref, meta), ref_fps = vp.fetch_video({"type": "video", "video": path, **ele},
                                                  return_video_sample_fps=True, return_video_metadata=True)
            v = load_video(VideoSpec(path, tuple(sorted(ele.items()))), total_pixels=128000 * 28 * 28 * 0.9)
            assert v.indices == list(meta["frames_indices"]), (path, ele)
            assert v.fps == pytest.approx(ref_fps, rel=1e-12)
            assert np.array_equal(v.frames, ref.permute(0, 2, 3, 1).to(torch.uint8).numpy()), (path, ele)
    # qwen-vl-utils 0.0.14 first resizes each listed frame to multiples of 56 (it passes the 28-pixel
    # factor as the patch size) within image bounds; frames already at such a size are left alone by both.
    paths = []
    for k, f in enumerate(_frames(5, 56, 112)):
        paths.append(str(tmp_path / f"f{k}.png"))
        Image.fromarray(f).save(paths[-1])
    ref, ref_fps = vp.fetch_video({"type": "video", "video": paths, "sample_fps": 3.0, **SMALL},
                                  return_video_sample_fps=True)
    v = load_video(VideoSpec(tuple(paths), (("fps", 3.0),) + tuple(SMALL.items())), total_pixels=1e9)
    assert v.fps == ref_fps and len(v.frames) == 6  # 5 frames + the last repeated
    assert np.array_equal(v.frames, ref.permute(0, 2, 3, 1).to(torch.uint8).numpy())


# --------------------------------------------------------------------------------- rejects


def _row(rid, video, **kw):
    part = {"type": "video", "video": video, **SMALL, **kw}
    return {"id": rid, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What moves?"}]}],
            "answer": "3", "task": "spatial", "answer_type": "number"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer

    return build_tiny_qwen_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=600)


def _cfg(tok_dir, **kw):
    from m2mega.data.preprocess import PreprocessConfig

    return PreprocessConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tok_dir, progress=False,
                            max_reject_fraction=1.0, **kw)


def test_bad_videos_are_rejected_with_their_reason(tmp_path, tok_dir):
    from m2mega.data.preprocess import preprocess

    good = _clip(tmp_path / "good.mp4", 8)
    whole = open(good, "rb").read()
    data = open(_clip(tmp_path / "fast.mp4", 40, movflags="faststart"), "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) * 2 // 3])  # index intact, frames cut off
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # index (at the end) cut off
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 20)
    i = whole.find(b"avc1", whole.find(b"stsd"))
    (tmp_path / "codec.mp4").write_bytes(whole[:i] + b"zzzz" + whole[i + 4:])  # a codec tag FFmpeg lacks
    _clip(tmp_path / "one.mp4", 1)
    _clip(tmp_path / "slow.mp4", 8, 1 / 20000)  # 8 frames over 44 hours
    Image.new("RGB", (56, 84)).save(tmp_path / "f0.png")
    Image.new("RGB", (84, 56)).save(tmp_path / "f1.png")
    rows = [
        (_row("ok", "good.mp4"), None),
        (_row("missing", "nope.mp4"), "video_missing"),
        (_row("trunc", "trunc.mp4"), "video_truncated"),
        (_row("cut", "cut.mp4"), "video_corrupt"),
        (_row("junk", "junk.mp4"), "video_corrupt"),
        (_row("codec", "codec.mp4"), "video_codec"),
        (_row("one", "one.mp4"), "video_empty"),
        (_row("slow", "slow.mp4"), "video_duration"),
        (_row("frame_gone", ["f0.png", "gone.png"]), "video_missing"),
        (_row("frame_size", ["f0.png", "f1.png"]), "video_frame_size"),
        (_row("too_long", "good.mp4", min_pixels=448 * 448, max_pixels=448 * 448), "too_long"),
        (_row("bad_fps", "good.mp4", fps=0), "bad_message"),
        (_row("list_max", ["f0.png", "f0.png"], max_frames=2), "bad_message"),
        (_row("bad_key", "good.mp4", speed=2), "bad_message"),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    res = preprocess([str(src)], str(tmp_path / "ds"), _cfg(tok_dir, seq_length=400))
    rejects = [json.loads(line) for line in open(res.reject_file)]
    assert res.rows == len(rows) and res.accepted == 1 and res.rejected == len(rows) - 1 and res.videos == 1
    got = {r["id"]: r["reason"] for r in rejects}
    for (row, code), line in zip(rows, range(1, len(rows) + 1)):
        if code is None:
            assert row["id"] not in got
            continue
        assert got[row["id"]].split(":")[0] == code, (row["id"], got[row["id"]])
        assert next(r["line"] for r in rejects if r["id"] == row["id"]) == line
    assert "decoded" in got["trunc"] or "present" in got["trunc"]
    assert "400" in got["too_long"] or "left" in got["too_long"]


# --------------------------------------------------------------------------------- the user's command


def test_preprocess_command_to_loader_batches(tmp_path, tok_dir):
    """JSONL (an SFT row with an H.264 clip; an RL row with an image and a 3-frame list at 1 fps) ->
    tools/preprocess_data.py (1 and 2 workers: same bytes) -> SFT micro-batch and RL prompt carrying
    the videos' patches, grids, second_per_grid_ts and the M-RoPE time axis."""
    from m2mega.data.indexed import IndexedSamples, dataset_files
    from m2mega.data.loader import PackedTHDDataset, PromptDataset
    from m2mega.models.qwen25vl.rope_index import get_rope_index
    from m2mega.ops.vision_pack import pack_images

    clip = _clip(tmp_path / "clip.mp4", 12, 4.0)  # 3 s at 4 fps -> 6 frames at 2 fps -> 3 grid steps of 1 s
    for k, f in enumerate(_frames(3, 56, 56, seed=1)):
        Image.fromarray(f).save(tmp_path / f"f{k}.png")
    Image.fromarray(_frames(1, 56, 84, seed=2)[0]).save(tmp_path / "img.png")
    sft = {"id": "sft-video", "messages": [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4", **SMALL},
                                     {"type": "text", "text": "Where does the square go?"}]},
        {"role": "assistant", "content": "<think>It moves right.</think><answer>right</answer>"}],
        "answer": "right", "task": "spatial", "answer_type": "text"}
    rl = {"id": "rl-mixed", "messages": [{"role": "user", "content": [
        {"type": "image", "image": "img.png"},
        {"type": "video", "video": ["f0.png", "f1.png", "f2.png"], "fps": 1, **SMALL},
        {"type": "text", "text": "How many frames?"}]}], "answer": "3", "task": "spatial", "answer_type": "number"}
    (tmp_path / "in.jsonl").write_text(json.dumps(sft) + "\n" + json.dumps(rl) + "\n")
    from m2mega.data.preprocess import preprocess

    # The documented command, with 2 workers; the same settings in-process with 1 must give the same bytes.
    p = subprocess.run([sys.executable, TOOL, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                        str(tmp_path / "w2"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                        "--workers", "2", "--chunk-size", "1", "--seq-length", "1024", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "accepted 2" in p.stderr and "videos 2" in p.stderr
    preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "w1"), _cfg(tok_dir, seq_length=1024, chunk_size=1))
    for a, b in zip(dataset_files(str(tmp_path / "w1")), dataset_files(str(tmp_path / "w2"))):
        if not a.endswith(".meta.json"):
            assert filecmp.cmp(a, b, shallow=False), f"{os.path.basename(a)} differs between 1 and 2 workers"
    prefix = str(tmp_path / "w1")
    data = IndexedSamples(prefix)
    assert data.meta["config"]["video_fps"] == 2.0 and data.meta["num_videos"] == 2
    assert data.video_grid_thw(0).tolist() == [[3, 4, 6]] and data.second_per_grid(0).tolist() == [1.0]
    assert data.video_grid_thw(1).tolist() == [[2, 4, 4]] and data.second_per_grid(1).tolist() == [2.0]
    assert data.grid_thw(1).tolist() == [[1, 4, 6]]

    mb = PackedTHDDataset(prefix, seq_length=1024).build([0, 1])
    assert mb.video_grid_thw.tolist() == [[3, 4, 6], [2, 4, 4]]
    assert mb.second_per_grid_ts.tolist() == [1.0, 2.0] and mb.image_grid_thw.tolist() == [[1, 4, 6]]
    frames = [load_video(VideoSpec(clip, tuple(SMALL.items())), total_pixels=1e9).frames,
              load_video(VideoSpec(tuple(str(tmp_path / f"f{k}.png") for k in range(3)), (("fps", 1.0),)
                                   + tuple(SMALL.items())), total_pixels=1e9).frames]
    want = pack_images([torch.from_numpy(f) for f in frames], min_pixels=1, max_pixels=10**7)
    assert torch.equal(mb.pixel_values_videos, want.pixel_values)
    vid_tok = data.special["video_token_id"]
    assert int((mb.tokens == vid_tok).sum()) == 3 * 6 * 4 // 4 * 1 + 2 * 4 * 4 // 4

    prompt = PromptDataset(prefix, 1).prompt(1)
    assert prompt.video_grid_thw.tolist() == [[2, 4, 4]] and prompt.second_per_grid_ts.tolist() == [2.0]
    t = prompt.position_ids[0][prompt.prompt_tokens == vid_tok]
    assert (t.unique() - t.min()).tolist() == [0, 4]  # 2 s per grid step x 2 tokens/s
    ref, delta = get_rope_index(prompt.prompt_tokens, prompt.image_grid_thw, image_token_id=data.special["image_token_id"],
                                video_token_id=vid_tok, vision_start_token_id=data.special["vision_start_token_id"],
                                video_grid_thw=prompt.video_grid_thw, second_per_grid_ts=[2.0])
    assert torch.equal(prompt.position_ids, ref) and prompt.rope_delta == delta

    preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "patches"),
               _cfg(tok_dir, seq_length=1024, image_format="patches", patch_dtype="float32"))
    mb2 = PackedTHDDataset(str(tmp_path / "patches"), seq_length=1024).build([0, 1])
    assert torch.equal(mb2.pixel_values_videos, mb.pixel_values_videos)
    assert torch.equal(mb2.position_ids, mb.position_ids) and torch.equal(mb2.rot_pos_ids, mb.rot_pos_ids)


# --------------------------------------------------------------------------------- synthetic family


def test_synthetic_order_family_answers_match_the_decoded_video(tmp_path):
    from m2mega.data.schema import parse_row
    from m2mega.data.synthetic import COLORS, write_dataset
    from m2mega.rewards import compute_reward

    man = write_dataset(str(tmp_path), n_sft=4, n_rl=2, n_eval=2, seed=3, families=["order", "count"])
    assert man["splits"]["sft"]["per_family"] == {"order": 2, "count": 2}
    n_checked = 0
    for split in ("sft", "rl", "eval"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            raw = json.loads(line)
            if raw["family"] != "order":
                continue
            row = parse_row(line, str(tmp_path))
            assert len(row.videos) == 1 and not row.image_paths and row.answer_type == "choice"
            v = load_video(row.videos[0], total_pixels=1e9)
            assert v.fps == 2.0 and v.frames.shape[1:] == (56, 56, 3)
            # Re-derive the order from the pixels: the first grid step where each shape's colour shows up.
            question = raw["messages"][0]["content"][1]["text"]
            first = {}
            for step in range(len(v.frames) // 2):
                f = v.frames[2 * step].astype(int)
                for name, rgb in COLORS.items():
                    if name not in first and (np.abs(f - rgb).sum(-1) < 60).sum() > 20:
                        first[name] = step
            options = {ln[0]: ln[3:] for ln in question.splitlines() if ln[1:3] == ". "}
            colours = [s.split()[0] for s in options[raw["answer"]].split(", ")]
            assert sorted(colours, key=first.get) == colours and set(colours) == set(first)
            if split == "sft":
                r = compute_reward(raw["messages"][-1]["content"], answer=raw["answer"], task=raw["task"],
                                   answer_type=raw["answer_type"])
                assert r.correct and r.format == 1.0
            n_checked += 1
    assert n_checked == 4


# --------------------------------------------------------------------------------- evaluation harness


@pytest.mark.slow  # ~14 s: a model replica in a subprocess (as test_bench_cli's CV-Bench run)
def test_vsibench_video_rows_through_the_bench_cli(tmp_path, tok_dir):
    """`python -m m2mega.eval.bench --benchmark vsibench --video-dir V`: questions become video rows
    (VIDEOS/<dataset>/<scene>.mp4, at most --num-frames frames), preprocessed, generated and scored."""
    from m2mega.data.indexed import IndexedSamples
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.eval import bench
    from m2mega.eval.benchmarks import get
    from test_bench_cli import _model

    data = os.path.join(ROOT, "tests", "data", "bench", "vsibench", "test.jsonl")
    for ds, scene in (("scannet", "scene0001_00"), ("arkitscenes", "41069025")):
        os.makedirs(tmp_path / "videos" / ds, exist_ok=True)
        _clip(tmp_path / "videos" / ds / f"{scene}.mp4", 24, 4.0)  # 6 s: 12 frames at 2 fps, capped at 4
    items = get("vsibench").load(data, video_dir=str(tmp_path / "videos"), num_frames=4)
    assert items[0].video["max_frames"] == 4 and not items[0].images
    rows = bench._write_rows(items[:2], str(tmp_path / "w"))
    preprocess([rows], str(tmp_path / "w" / "p"), PreprocessConfig(tokenizer_model=tok_dir,
                                                                  seq_length=1024, progress=False))
    assert IndexedSamples(str(tmp_path / "w" / "p")).video_grid_thw(0).tolist() == [[2, 20, 28]]

    cfg = _model(tmp_path)
    out = tmp_path / "gens.jsonl"
    p = subprocess.run([sys.executable, "-m", "m2mega.eval.bench", "--benchmark", "vsibench", "--data", data,
                        "--video-dir", str(tmp_path / "videos"), "--num-frames", "4", "--checkpoint", "none",
                        "--model-config", str(cfg), "--out", str(out), "--limit", "3", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and not any(r["rejected"] for r in recs) and "vsibench overall:" in p.stdout


def test_prompts_are_preprocessed_like_the_training_data(tmp_path):
    """Evaluation / score_difficulty rebuild the training data's settings (video ones included) from its
    meta.json; a dataset written before videos existed still opens, with no videos."""
    from m2mega.data.indexed import IndexedSamples
    from m2mega.data.preprocess import PreprocessConfig, preprocess
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer

    stored = {**PreprocessConfig(video_fps=1.0, video_max_pixels=200704, seq_length=2048).__dict__, "workers": 4}
    c = PreprocessConfig.like(stored, tokenizer_model="/tok")
    assert (c.video_fps, c.video_max_pixels, c.seq_length, c.tokenizer_model, c.order) == (1.0, 200704, 2048, "/tok",
                                                                                          "input")
    old = {k: v for k, v in stored.items() if not k.startswith("video_")}
    assert PreprocessConfig.like(old).video_fps == VIDEO_DEFAULTS.fps

    tok = build_tiny_qwen_tokenizer(str(tmp_path / "tok"), vocab_size=400)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "t", "messages": [{"role": "user", "content": "hi"}],
                                                   "answer": "1", "task": "t", "answer_type": "number"}) + "\n")
    prefix = str(tmp_path / "ds")
    preprocess([str(tmp_path / "in.jsonl")], prefix, PreprocessConfig(tokenizer_model=tok, progress=False))
    rows = np.load(prefix + ".samples.npy")
    old_dtype = np.dtype([d for d in rows.dtype.descr if d[0] not in ("n_videos", "video_start")])
    np.save(prefix + ".samples.npy", np.array([tuple(r[n] for n in old_dtype.names) for r in rows], dtype=old_dtype))
    os.remove(prefix + ".video.npy")
    meta = json.loads(open(prefix + ".meta.json").read())
    open(prefix + ".meta.json", "w").write(json.dumps({**meta, "format": "m2mega-mm-1"}))
    ds = IndexedSamples(prefix)
    assert ds.videos(0) == [] and ds.video_grid_thw(0).shape == (0, 3) and ds.tokens(0).size > 0
