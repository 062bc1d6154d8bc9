"""JSONL -> ``PREFIX.bin/.idx`` + sidecar: the engine behind ``tools/preprocess_data.py``.

Pipeline (memory stays bounded whatever the input size):

1. The main process scans each input for the byte offset of every ``chunk_size``-th line (one pass, only
   the offsets are kept) and hands chunks to ``--workers`` processes.
2. A worker validates each row (:mod:`.schema`), decodes and resizes its images (:mod:`.images`) and
   samples its videos (:mod:`.video`), renders the chat template (:mod:`.chat_template`), tokenises,
   expands every ``<|image_pad|>`` / ``<|video_pad|>`` to its vision-token count, builds the loss spans,
   and writes its chunk as a small shard dataset on disk (one row's frames in memory at a time). Bad
   rows become reject records (file, line, id, reason); they never stop the run.
3. The main process appends finished shards in chunk order (megatron-core ``add_index``) and streams the
   rejects, in input order, to the reject file. Chunks are fixed by line count, not by worker, so the
   result is byte-identical for any ``--workers``.
4. ``--order input`` renames that dataset into place; ``curriculum`` / ``shuffle`` re-write it in the
   final order (ascending difficulty with a seeded tie-break, or a seeded permutation).

Everything is written under temporary names and renamed at the very end.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator

import numpy as np

from .chat_template import DEFAULT_SYSTEM_PROMPT, render_segments, with_system_prompt
from .dataset_meta import tokenizer_record
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, IMAGE_FORMATS, grid_of, load_image, vision_tokens
from .interrupts import StopSignals
from .indexed import VIDEO_DTYPE, EncodedSample, IndexedSamples, SampleWriter, dataset_files
from .ordering import ORDERS, curriculum_order, shuffle_order
from .schema import RejectError, Row, parse_row, reason_code
from .tokenizer import M2Tokenizer, build_tokenizer
from .video import VIDEO_DEFAULTS, VideoOptions, load_video

__all__ = ["ConfigError", "PreprocessConfig", "PreprocessResult", "encode_row", "preprocess", "loss_spans_from_mask"]



class ConfigError(ValueError):
    """Unusable arguments (bad flag values, missing input, unloadable tokenizer): nothing was processed."""


@dataclass
class PreprocessConfig:
    """All knobs of a preprocessing run (the CLI flags, minus inputs/outputs)."""

    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: str = ""
    seq_length: int = 8192
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_format: str = "pixels"  # "pixels": resized uint8; "patches": pack_images pixel_values
    patch_dtype: str = "bfloat16"  # patches only: float32 | bfloat16
    # Defaults for video parts that do not set their own (see m2mega.data.video).
    video_fps: float = VIDEO_DEFAULTS.fps
    video_max_frames: int = VIDEO_DEFAULTS.max_frames
    video_min_pixels: int = VIDEO_DEFAULTS.min_pixels
    video_max_pixels: int = VIDEO_DEFAULTS.max_pixels
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: Qwen's default "You are a helpful assistant."
    order: str = "input"
    seed: int = 1234
    min_quality: float | None = None
    workers: int = 1
    chunk_size: int = 256
    max_reject_fraction: float = 0.05
    progress: bool = True

    def check(self) -> None:
        """Raise :class:`ConfigError` on an unusable setting."""
        if self.order not in ORDERS:
            raise ConfigError(f"--order must be one of {ORDERS}, got {self.order!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"--image-format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.patch_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--patch-dtype must be float32 or bfloat16, got {self.patch_dtype!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"need 0 < --min-pixels <= --max-pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.seq_length < 1 or self.workers < 1 or self.chunk_size < 1:
            raise ConfigError("--seq-length, --workers and --chunk-size must be >= 1")
        if not (0 < self.video_fps <= 1000) or self.video_max_frames < 2:
            raise ConfigError(f"need 0 < --video-fps <= 1000 and --video-max-frames >= 2, got {self.video_fps}, "
                              f"{self.video_max_frames}")
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ConfigError(f"need 0 < --video-min-pixels <= --video-max-pixels, got {self.video_min_pixels}, "
                              f"{self.video_max_pixels}")

    @classmethod
    def like(cls, stored: dict, **overrides) -> "PreprocessConfig":
        """Settings that render prompts as a dataset was rendered, from its ``meta.json["config"]``
        (sequence length, pixel bounds, video defaults, system prompt, storage), in input order with no
        progress bar; ``overrides`` (the tokenizer, ...) on top. A setting older datasets lack keeps its
        default."""
        kept = {f.name for f in fields(cls)} - {"order", "seed", "min_quality", "workers", "chunk_size",
                                                "max_reject_fraction", "progress"}
        kw = {k: v for k, v in stored.items() if k in kept}
        kw.update(order="input", progress=False, max_reject_fraction=1.0)
        kw.update(overrides)
        return cls(**kw)

    def video_options(self) -> VideoOptions:
        """Settings for video parts that do not set their own."""
        return VideoOptions(fps=self.video_fps, max_frames=self.video_max_frames,
                            min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels)

    def video_total_pixels(self) -> float:
        """qwen-vl-utils' frames x pixels cap, ``MODEL_SEQ_LEN * 28 * 28 * 0.9``, with --seq-length as
        ``MODEL_SEQ_LEN`` (qwen-vl-utils' default is 128000)."""
        return self.seq_length * 28 * 28 * 0.9


@dataclass
class PreprocessResult:
    """Summary of a run (also stored under ``"preprocess"`` in ``PREFIX.meta.json``)."""

    rows: int = 0
    accepted: int = 0
    rejected: int = 0
    tokens: int = 0
    images: int = 0
    videos: int = 0
    reject_reasons: dict = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1
    reject_fraction: float = 0.0
    exceeded: bool = False
    files: list = field(default_factory=list)
    reject_file: str = ""


def loss_spans_from_mask(mask: np.ndarray) -> np.ndarray:
    """Half-open ``[start, end)`` runs of True in a bool mask, as int32 ``[k, 2]``."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return edges.reshape(-1, 2).astype(np.int32)


def _quality_of(row: Row) -> float:
    """The row's quality: its own field, else :func:`m2mega.data.quality.score_trajectory` of its final
    assistant turn (NaN for an RL row without the field: there is no trajectory to judge)."""
    if not math.isnan(row.quality) or row.is_rl:
        return row.quality
    from m2mega.data.quality import score_trajectory

    score = score_trajectory(row.messages[-1]["content"], row.answer or None, row.answer_type, row.task)
    return float(score.total)


def _check_structure(ids: np.ndarray, is_img: np.ndarray, msgs: list[dict], row: Row, tok: M2Tokenizer) -> None:
    """Special-token strings typed into the text (a fake ``<|im_end|>``, a stray ``<|image_pad|>``) would
    be tokenised as the real tokens and corrupt the turn structure or the image alignment: reject them."""
    turns = len(msgs) + (msgs[0]["role"] != "system") + row.is_rl
    n_vis = len(row.image_paths) + len(row.videos)
    counts = {
        "<|im_start|>": (int((ids == tok.im_start_id).sum()), turns),
        "<|im_end|>": (int((ids == tok.im_end_id).sum()), turns - row.is_rl),
        "<|image_pad|>": (int(is_img.sum()), len(row.image_paths)),
        "<|vision_start|>": (int((ids == tok.vision_start_token_id).sum()), n_vis),
        "<|vision_end|>": (int((ids == tok.vision_end_token_id).sum()), n_vis),
        "<|video_pad|>": (int((ids == tok.video_token_id).sum()), len(row.videos)),
        "<|endoftext|>": (int((ids == tok.endoftext_id).sum()), 0),
    }
    bad = [f"{k} x{got} (expected {want})" for k, (got, want) in counts.items() if got != want]
    if bad:
        raise RejectError("special_token_in_text", "the text contains special-token strings: " + ", ".join(bad))


def _max_token_chars(tok: M2Tokenizer) -> int | None:
    """Longest vocabulary entry, in characters: no token covers more text than that (byte-level BPE entries
    are one character per byte, so this bounds bytes, hence characters, too). None when unknown."""
    cached = tok.__dict__.get("_m2_max_token_chars", 0)
    if cached != 0:
        return cached
    longest = None
    if getattr(tok, "backend", None) is not None:  # HF tokenizers (fast backend)
        longest = max(map(len, tok.backend.get_vocab(with_added_tokens=True)), default=None)
    elif getattr(tok, "sp", None) is not None:  # SentencePiece
        spm = tok.sp.tokenizer
        longest = max([len(spm.id_to_piece(i)) for i in range(spm.get_piece_size())]
                      + [len(t) for t in tok.sp.special_token_to_id], default=None)
    tok.__dict__["_m2_max_token_chars"] = longest
    return longest


def _reject_surely_too_long(segments, tok: M2Tokenizer, seq_length: int) -> None:
    """Reject a row whose text alone needs more than ``seq_length`` tokens, before tokenising it: BPE on a
    multi-megabyte line runs for minutes (one 50 MB line stalled a run for over 10). ``chars / longest
    token`` is a lower bound on the token count, so nothing that would fit is rejected."""
    longest = _max_token_chars(tok)
    if not longest:
        return
    chars = sum(len(s.text) for s in segments)
    at_least = -(-chars // longest)
    if at_least > seq_length:
        raise RejectError("too_long", f"at least {at_least} tokens ({chars} characters, at most {longest} per "
                                      f"token) > --seq-length {seq_length}")


def encode_row(row: Row, tok: M2Tokenizer, cfg: PreprocessConfig, file: int = 0, line: int = 0) -> EncodedSample:
    """Validated row -> stored sample (tokens, loss spans, images, videos); :class:`RejectError` when it
    cannot be."""
    if cfg.order == "curriculum" and math.isnan(row.difficulty):
        raise RejectError("missing_difficulty", "--order curriculum needs a 'difficulty' on every row")
    if cfg.min_quality is not None:
        q = _quality_of(row)
        if q < cfg.min_quality:  # NaN (RL row, no quality given) compares False: kept
            raise RejectError("low_quality", f"quality {q:.4g} < --min-quality {cfg.min_quality}")
        row.quality = q
    msgs = with_system_prompt(row.messages, cfg.system_prompt)
    segments = render_segments(msgs, add_generation_prompt=row.is_rl)
    _reject_surely_too_long(segments, tok, cfg.seq_length)
    ids, mask = tok.encode_segments(segments)
    is_img = ids == tok.image_token_id
    _check_structure(ids, is_img, msgs, row, tok)
    pixels = [load_image(p, cfg.min_pixels, cfg.max_pixels) for p in row.image_paths]
    grids = np.asarray([grid_of(a.shape[0], a.shape[1]) for a in pixels], dtype=np.int32).reshape(-1, 3)
    reps = np.ones(len(ids), dtype=np.int64)
    reps[is_img] = [vision_tokens(g) for g in grids]
    videos, video_info = _videos(row, cfg, budget=cfg.seq_length - int(reps.sum()) + len(row.videos))
    reps[ids == tok.video_token_id] = [vision_tokens(g) for g in video_info["grid"]]
    total = int(reps.sum())
    if total > cfg.seq_length:
        raise RejectError("too_long", f"{total} tokens > --seq-length {cfg.seq_length}")
    tokens = np.repeat(ids, reps).astype(np.int32)
    mask = np.repeat(mask, reps)
    if row.is_rl:
        mask[:] = False  # RL prompts carry no SFT targets
    if cfg.image_format == "patches":
        pixels = _patches(pixels, grids, cfg)
        videos = _patches(videos, video_info["grid"], cfg)
    return EncodedSample(
        tokens=tokens, loss_spans=loss_spans_from_mask(mask), images=pixels, grids=grids, id=row.id,
        answer=row.answer, task=row.task, answer_type=row.answer_type, difficulty=row.difficulty,
        quality=row.quality, is_rl=row.is_rl, file=file, line=line, videos=videos, video_info=video_info,
    )


def _videos(row: Row, cfg: PreprocessConfig, budget: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each video's frames (uint8 [T, H, W, 3]) and its VIDEO_DTYPE record. ``budget``: the tokens the
    videos may take (--seq-length minus all other tokens), so an over-long video is rejected before its
    frames are decoded."""
    info = np.zeros(len(row.videos), dtype=VIDEO_DTYPE)
    out = []
    for k, spec in enumerate(row.videos):
        v = load_video(spec, cfg.video_options(), total_pixels=cfg.video_total_pixels(), max_tokens=budget,
                       threads=_STATE.get("video_threads", 0))
        out.append(v.frames)
        info[k] = (v.grid, v.second_per_grid, v.source_fps)
        budget -= vision_tokens(v.grid)
    return out, info


def _patches(pixels: list[np.ndarray], grids: np.ndarray, cfg: PreprocessConfig) -> list[np.ndarray]:
    """pixel_values of each (already resized) image or frame stack via the vision packing op; bf16 kept
    as raw int16."""
    if not pixels:
        return []
    import torch

    from m2mega.ops.vision_pack import pack_images

    dtype = torch.bfloat16 if cfg.patch_dtype == "bfloat16" else torch.float32
    # Bounds that hold every (final, 28-multiple) size, so the op's smart resize is the identity.
    areas = [a.shape[-3] * a.shape[-2] for a in pixels]
    packed = pack_images([torch.from_numpy(p) for p in pixels], min_pixels=min(areas), max_pixels=max(areas),
                         dtype=dtype)
    pv = packed.pixel_values.view(torch.int16) if dtype == torch.bfloat16 else packed.pixel_values
    sizes = [int(t * h * w) for t, h, w in grids]
    return [c.numpy() for c in pv.split(sizes)]


# ------------------------------------------------------------------------------------------ workers

_STATE: dict = {}


def _init_worker(cfg: PreprocessConfig, single_thread: bool = True) -> None:
    if single_thread:  # in a pool process: one process per core is the parallelism
        # Ctrl-C reaches the whole process group: only the parent reacts (it terminates the pool and cleans
        # up); a forked worker must not inherit the parent's SIGTERM handler either.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):  # forked with both blocked (StopSignals.deferred): a pending
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))  # SIGTERM ends us now
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        import torch

        torch.set_num_threads(1)
        _STATE["video_threads"] = 1
    _STATE["cfg"] = cfg
    _STATE["tok"] = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)


@dataclass
class _Chunk:
    index: int
    file: int
    path: str
    offset: int
    n_lines: int
    first_line: int
    shard: str


@dataclass
class _ChunkResult:
    index: int
    shard: str
    rows: int
    accepted: int
    rejects: list  # [(file, line, id, reason)]


def _process_chunk(chunk: _Chunk) -> _ChunkResult:
    cfg, tok = _STATE["cfg"], _STATE["tok"]
    stop = _STATE.get("stop")  # set on the main process only (single-worker runs)
    base = os.path.dirname(os.path.abspath(chunk.path))
    writer = SampleWriter(chunk.shard)
    rejects, rows = [], 0
    try:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.offset)
            for k in range(chunk.n_lines):
                if stop is not None:
                    stop.check()
                raw = f.readline()
                lineno = chunk.first_line + k
                rows += 1
                rid = ""
                try:
                    if not raw.strip():
                        raise RejectError("malformed_json", "empty line")
                    row = parse_row(raw, base)
                    rid = row.id
                    writer.add(encode_row(row, tok, cfg, chunk.file, lineno))
                except RejectError as e:
                    rid = rid or e.row_id
                    rejects.append((chunk.file, lineno, rid, e.reason))
                except Exception as e:  # a bug or an unforeseen input must not kill the run: record it
                    rejects.append((chunk.file, lineno, rid, f"error: {type(e).__name__}: {e}"))
        writer.finalize({})
    except BaseException:
        writer.abort()
        raise
    return _ChunkResult(chunk.index, chunk.shard, rows, writer.num_samples, rejects)


def _chunks(inputs: list[str], chunk_size: int, shard_dir: str) -> Iterator[_Chunk]:
    """Fixed-size line chunks of every input (byte offsets found by one streaming pass)."""
    index = 0
    for fi, path in enumerate(inputs):
        with open(path, "rb") as f:
            offset, lineno, n = 0, 1, 0
            pos = 0
            for raw in f:
                n += 1
                pos += len(raw)
                if n == chunk_size:
                    yield _Chunk(index, fi, path, offset, n, lineno, os.path.join(shard_dir, f"c{index:08d}"))
                    index += 1
                    offset, lineno, n = pos, lineno + n, 0
            if n:
                yield _Chunk(index, fi, path, offset, n, lineno, os.path.join(shard_dir, f"c{index:08d}"))
                index += 1


# ------------------------------------------------------------------------------------------ driver


def preprocess(
    inputs: list[str], output_prefix: str, cfg: PreprocessConfig, reject_file: str | None = None
) -> PreprocessResult:
    """Run the whole pipeline; returns the summary. Raises only on unusable arguments or I/O failure:
    bad rows are rejects. ``result.exceeded`` tells whether ``max_reject_fraction`` was exceeded."""
    cfg.check()
    inputs = [os.path.abspath(p) for p in inputs]
    for p in inputs:
        if not os.path.isfile(p):
            raise ConfigError(f"--input {p} not found")
    try:
        tok = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)  # fail fast on a bad tokenizer
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"cannot load tokenizer: {e}") from e
    reject_file = reject_file or output_prefix + ".rejects.jsonl"
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = os.path.join(out_dir, f".{os.path.basename(output_prefix)}.tmp{os.getpid()}")
    res = PreprocessResult(workers=cfg.workers, reject_file=reject_file)
    reasons: Counter = Counter()
    t0 = time.time()
    reject_tmp = reject_file + f".tmp{os.getpid()}"
    stage = os.path.join(tmp_dir, "all")
    pool = merged = None
    stop = StopSignals()  # SIGINT/SIGTERM raise here, so the cleanup below runs (and a swallowed raise is redone)
    try:
        stop.__enter__()  # inside the try: a signal from now on (even mid-install) ends in the finally
        os.makedirs(tmp_dir, exist_ok=True)
        from tqdm import tqdm

        bar = tqdm(unit="row", desc="preprocess", disable=not cfg.progress, file=sys.stderr, mininterval=1.0)
        merged = SampleWriter(stage if cfg.order != "input" else output_prefix)
        chunks = _chunks(inputs, cfg.chunk_size, tmp_dir)
        if cfg.workers == 1:
            _init_worker(cfg, single_thread=False)
            _STATE["stop"] = stop
            results = map(_process_chunk, chunks)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # Each fork runs Python at-fork hooks, which swallow a KeyboardInterrupt raised in them.
            with stop.deferred():
                pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,))
            results = _poll(pool.imap(_process_chunk, chunks), stop)  # ordered: shards appended in chunk order
        with open(reject_tmp, "w", encoding="utf-8") as rf:
            for r in results:
                # Deferred: a stop raised inside megatron-core's IndexedDataset constructor leaves an object
                # whose __del__ fails ("Exception ignored ... no attribute 'index'"); a shard append is short.
                with stop.deferred():
                    merged.append_dataset(r.shard)
                for f in dataset_files(r.shard):
                    os.remove(f)
                for fi, line, rid, reason in r.rejects:
                    rf.write(json.dumps({"file": inputs[fi], "line": line, "id": rid, "reason": reason},
                                        ensure_ascii=False) + "\n")
                    reasons[reason_code(reason)] += 1
                res.rows += r.rows
                res.accepted += r.accepted
                res.rejected += len(r.rejects)
                bar.update(r.rows)
                bar.set_postfix(ok=res.accepted, rejects=res.rejected, refresh=False)
                stop.check()
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        res.tokens, res.images, res.videos = merged.num_tokens, merged._n_images, merged._n_videos
        res.reject_reasons = dict(sorted(reasons.items()))
        res.reject_fraction = res.rejected / max(res.rows, 1)
        res.exceeded = res.reject_fraction > cfg.max_reject_fraction
        res.seconds = time.time() - t0
        meta = {
            "inputs": inputs,
            "image_format": cfg.image_format,
            "patch_dtype": cfg.patch_dtype if cfg.image_format == "patches" else None,
            "order": cfg.order,
            "tokenizer": tok.special_token_ids(),
            "tokenizer_type": cfg.tokenizer_type,
            **tokenizer_record(cfg.tokenizer_model, output_prefix + ".meta.json"),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "workers")},
            "preprocess": {k: v for k, v in asdict(res).items() if k not in ("files", "seconds", "workers")},
        }
        stop.check()  # last point before the outputs are committed
        if cfg.order == "input" or merged.num_samples == 0:
            res.files = merged.finalize(meta, prefix=output_prefix)
        else:
            merged.finalize(meta)
            res.files = _reorder(stage, output_prefix, cfg, meta)
        os.replace(reject_tmp, reject_file)
        res.seconds = time.time() - t0
    except BaseException:
        if pool is not None:
            pool.terminate()
        if merged is not None:
            merged.abort()
        if os.path.exists(reject_tmp):
            os.remove(reject_tmp)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _STATE.pop("stop", None)
        stop.__exit__(None, None, None)
    return res


def _poll(results, stop: StopSignals, every: float = 0.25) -> Iterator:
    """``results`` (a pool's ``imap``) with ``stop.check()`` while waiting: a stop signal whose raise was
    swallowed (in a finalizer or GC callback) still ends the run within ``every`` seconds, not after the
    next chunk."""
    while True:
        try:
            yield results.next(timeout=every)
        except mp.TimeoutError:
            stop.check()
        except StopIteration:
            return


def _reorder(stage: str, output_prefix: str, cfg: PreprocessConfig, meta: dict) -> list[str]:
    """Write ``stage`` to ``output_prefix`` in the ``--order`` permutation."""
    src = IndexedSamples(stage)
    n = len(src)
    if cfg.order == "curriculum":
        perm = curriculum_order(np.asarray(src.samples["difficulty"]), cfg.seed)
    else:
        perm = shuffle_order(n, cfg.seed)
    out = SampleWriter(output_prefix, tasks=src.meta["tasks"])
    try:
        identity = np.arange(len(src.meta["tasks"]), dtype=np.int16)
        for i in perm:
            out.add_raw(src, int(i), identity)
        return out.finalize(meta)
    except BaseException:
        out.abort()
        raise
