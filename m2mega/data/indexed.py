"""The on-disk sample format: a megatron-core multimodal IndexedDataset plus a memory-mappable sidecar.

``PREFIX.bin`` / ``PREFIX.idx`` are written with megatron-core's ``IndexedDatasetBuilder`` (dtype int32,
``multimodal=True``) and read with ``IndexedDataset(PREFIX, multimodal=True)``. Each sample is one
*document* of items, told apart by the item's mode:

=====  ==========  =========================================================================================
mode   item        payload (int32 words)
=====  ==========  =========================================================================================
0      tokens      token ids after the chat template, each image expanded to its vision-token count
2      loss spans  ``[start0, end0, start1, end1, ...]`` half-open token ranges that carry the SFT loss
1      image       one per image, in order: ``pixels`` = resized uint8 RGB ``[14*gh, 14*gw, 3]`` bytes, or
                   ``patches`` = ``pixel_values [gh*gw, 1176]`` float32/bfloat16 bytes (viewed as int32)
3      video       one per video, after the images: ``pixels`` = sampled, resized uint8 frames
                   ``[2*gt, 14*gh, 14*gw, 3]``, or ``patches`` = ``pixel_values_videos [gt*gh*gw, 1176]``
=====  ==========  =========================================================================================

Sidecar (all memory-mappable, no pickle):

* ``PREFIX.samples.npy``: structured array, one row per sample (:data:`SAMPLE_DTYPE`): token count,
  image count, first row in the grid table, difficulty/quality (NaN when absent), task and answer-type
  codes, RL flag, prompt length, source file/line and offsets of the id and answer strings.
* ``PREFIX.grid.npy``: int32 ``[num_images, 3]`` patch grids (t, h, w) of all images, sample-major.
* ``PREFIX.video.npy``: structured ``[num_videos]`` (:data:`VIDEO_DTYPE`), sample-major: each video's patch
  grid, its ``second_per_grid`` (seconds per temporal grid step, HF's ``second_per_grid_ts``) and the
  source frame rate. (Format ``m2mega-mm-1`` datasets, written before videos, have none and still open.)
* ``PREFIX.strings.bin``: UTF-8 ids and answers, addressed by the offsets above.
* ``PREFIX.meta.json``: format version, image storage, task and answer-type names, the tokenizer's special
  ids, preprocessing arguments and reject counts.

Writers write to temporary names and :meth:`SampleWriter.finalize` renames them into place, so a killed
run never leaves a half-written dataset under ``PREFIX``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from .schema import ANSWER_TYPES

__all__ = [
    "FORMAT_VERSION", "MODE_TOKENS", "MODE_IMAGE", "MODE_LOSS_SPANS", "MODE_VIDEO", "SAMPLE_DTYPE",
    "VIDEO_DTYPE", "SIDECAR_SUFFIXES",
    "EncodedSample", "SampleInfo", "SampleWriter", "IndexedSamples", "dataset_files",
]

FORMAT_VERSION = "m2mega-mm-2"
_FORMATS = ("m2mega-mm-1", FORMAT_VERSION)  # readable; -1 is -2 without videos
MODE_TOKENS, MODE_IMAGE, MODE_LOSS_SPANS, MODE_VIDEO = 0, 1, 2, 3
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
SIDECAR_SUFFIXES = (".samples.npy", ".grid.npy", ".strings.bin", ".meta.json", ".video.npy")
_V1_SUFFIXES = SIDECAR_SUFFIXES[:-1]

VIDEO_DTYPE = np.dtype([("grid", "<i4", (3,)), ("second_per_grid", "<f8"), ("source_fps", "<f8")])

SAMPLE_DTYPE = np.dtype(
    [
        ("n_tokens", "<i4"),
        ("n_images", "<i4"),
        ("image_start", "<i8"),  # first row of this sample in PREFIX.grid.npy
        ("prompt_len", "<i4"),  # tokens before the first loss token (all tokens for RL rows)
        ("n_loss", "<i4"),  # number of loss tokens
        ("difficulty", "<f4"),  # NaN = not given
        ("quality", "<f4"),  # NaN = not given
        ("task", "<i2"),  # index into meta["tasks"]
        ("answer_type", "<i1"),  # index into meta["answer_types"]
        ("is_rl", "<i1"),
        ("file", "<i4"),  # index into meta["inputs"]
        ("line", "<i8"),  # 1-based line number in that file
        ("id_off", "<i8"),
        ("id_len", "<i4"),
        ("answer_off", "<i8"),
        ("answer_len", "<i4"),
        ("n_videos", "<i4"),
        ("video_start", "<i8"),  # first row of this sample in PREFIX.video.npy
    ]
)


def dataset_files(prefix: str) -> list[str]:
    """Every file that makes up the dataset at ``prefix``."""
    return [prefix + ".bin", prefix + ".idx"] + [prefix + s for s in SIDECAR_SUFFIXES]


@dataclass
class EncodedSample:
    """One preprocessed sample, as a worker hands it to the writer."""

    tokens: np.ndarray  # int32 [L]
    loss_spans: np.ndarray  # int32 [k, 2]
    images: list[np.ndarray]  # uint8 [H, W, 3] (pixels) or float32/bf16-as-uint16 [P, 1176] (patches)
    grids: np.ndarray  # int32 [n_images, 3]
    id: str
    answer: str
    task: str
    answer_type: str
    difficulty: float
    quality: float
    is_rl: bool
    file: int
    line: int
    videos: list[np.ndarray] = field(default_factory=list)  # uint8 [T, H, W, 3] or [P, 1176] patches
    video_info: np.ndarray = field(default_factory=lambda: np.zeros(0, VIDEO_DTYPE))  # VIDEO_DTYPE [n_videos]


@dataclass
class SampleInfo:
    """A sample's metadata (what the GRPO trainer and the reward functions need)."""

    index: int
    id: str
    answer: str
    task: str
    answer_type: str
    difficulty: float
    quality: float
    is_rl: bool
    n_tokens: int
    prompt_len: int
    file: str
    line: int


def _as_words(arr: np.ndarray) -> torch.Tensor:
    """Any array whose byte size is a multiple of 4 as int32 words (the dataset's single dtype)."""
    b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    if not b.flags.writeable:  # torch.from_numpy refuses read-only memory without a warning
        b = b.copy()
    if b.size % 4:
        raise ValueError(f"payload of {b.size} bytes is not a multiple of 4")
    return torch.from_numpy(b.view(np.int32))


class SampleWriter:
    """Writes samples in the order given; nothing appears under ``prefix`` before :meth:`finalize`."""

    def __init__(self, prefix: str, tasks: Sequence[str] | None = None) -> None:
        self.prefix = prefix
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=np.int32, multimodal=True)
        self._strings = open(self._tmp + ".strings.bin", "wb")
        self._str_pos = 0
        self._rows: list[np.ndarray] = []
        self._block = np.zeros(4096, dtype=SAMPLE_DTYPE)
        self._nblock = 0
        self._grids: list[np.ndarray] = []
        self._n_images = 0
        self._videos: list[np.ndarray] = []  # VIDEO_DTYPE rows
        self._n_videos = 0
        self.tasks: list[str] = list(tasks) if tasks is not None else []
        self._task_index = {t: i for i, t in enumerate(self.tasks)}
        self.num_samples = 0
        self.num_tokens = 0

    def _put_string(self, s: str) -> tuple[int, int]:
        b = s.encode("utf-8")
        off = self._str_pos
        self._strings.write(b)
        self._str_pos += len(b)
        return off, len(b)

    def _push_row(self) -> None:
        """Commit the row at ``self._block[self._nblock]`` (rows are filled in place, in blocks)."""
        self._nblock += 1
        if self._nblock == len(self._block):
            self._rows.append(self._block)
            self._block = np.zeros(len(self._block), dtype=SAMPLE_DTYPE)
            self._nblock = 0

    def _task_code(self, task: str) -> int:
        if task not in self._task_index:
            self._task_index[task] = len(self.tasks)
            self.tasks.append(task)
        return self._task_index[task]

    def add(self, s: EncodedSample) -> None:
        """Append one sample (tokens, loss spans, images, videos) as one document."""
        grids = np.asarray(s.grids, dtype=np.int32).reshape(-1, 3)
        if grids.shape[0] != len(s.images):
            raise ValueError(f"sample {s.id!r}: {len(s.images)} images but {grids.shape[0]} grids")
        vinfo = np.asarray(s.video_info, dtype=VIDEO_DTYPE).reshape(-1)
        if len(vinfo) != len(s.videos):
            raise ValueError(f"sample {s.id!r}: {len(s.videos)} videos but {len(vinfo)} video records")
        b = self._builder
        b.add_item(torch.from_numpy(np.ascontiguousarray(s.tokens, dtype=np.int32)), MODE_TOKENS)
        spans = np.ascontiguousarray(s.loss_spans, dtype=np.int32).reshape(-1)
        b.add_item(torch.from_numpy(spans), MODE_LOSS_SPANS)
        for img in s.images:
            b.add_item(_as_words(img), MODE_IMAGE)
        for vid in s.videos:
            b.add_item(_as_words(vid), MODE_VIDEO)
        b.end_document()
        if grids.shape[0]:
            self._grids.append(grids)
        if len(vinfo):
            self._videos.append(vinfo)
        spans2 = spans.reshape(-1, 2)
        row = self._block[self._nblock]
        row["n_tokens"] = len(s.tokens)
        row["n_images"] = grids.shape[0]
        row["image_start"] = self._n_images
        row["prompt_len"] = int(spans2[0, 0]) if len(spans2) else len(s.tokens)
        row["n_loss"] = int((spans2[:, 1] - spans2[:, 0]).sum()) if len(spans2) else 0
        row["difficulty"] = s.difficulty
        row["quality"] = s.quality
        row["task"] = self._task_code(s.task)
        row["answer_type"] = ANSWER_TYPES.index(s.answer_type)
        row["is_rl"] = int(s.is_rl)
        row["file"] = s.file
        row["line"] = s.line
        row["id_off"], row["id_len"] = self._put_string(s.id)
        row["answer_off"], row["answer_len"] = self._put_string(s.answer)
        row["n_videos"] = len(vinfo)
        row["video_start"] = self._n_videos
        self._push_row()
        self._n_images += grids.shape[0]
        self._n_videos += len(vinfo)
        self.num_samples += 1
        self.num_tokens += len(s.tokens)

    def add_raw(self, src: "IndexedSamples", i: int, task_map: np.ndarray, file_offset: int = 0) -> None:
        """Copy sample ``i`` of ``src`` byte for byte (merging shards): no decoding, no re-encoding."""
        items = src.doc_items(i)
        for k in range(items.start, items.stop):
            arr, mode = src.ds[k]
            self._builder.add_item(torch.from_numpy(np.array(arr)), int(mode))
        self._builder.end_document()
        r = src.samples[i]
        if r["n_images"]:
            self._grids.append(np.asarray(src.grids[r["image_start"] : r["image_start"] + r["n_images"]]))
        vids = src.video_records(i)
        if len(vids):
            self._videos.append(vids)
        self._block[self._nblock] = r
        row = self._block[self._nblock]
        row["image_start"] = self._n_images
        row["video_start"] = self._n_videos
        row["task"] = task_map[r["task"]]
        row["file"] = r["file"] + file_offset
        row["id_off"], row["id_len"] = self._put_string(src.string(r["id_off"], r["id_len"]))
        row["answer_off"], row["answer_len"] = self._put_string(src.string(r["answer_off"], r["answer_len"]))
        self._push_row()
        self._n_images += int(r["n_images"])
        self._n_videos += len(vids)
        self.num_samples += 1
        self.num_tokens += int(r["n_tokens"])

    def append_dataset(self, src_prefix: str) -> None:
        """Append a whole dataset (a worker's shard) after the samples written so far: ``.bin`` bytes are
        copied, index and sidecar rows re-based. (What megatron-core's ``add_index`` does, minus its
        ``gc.collect()`` per call, which costs ~0.8 s with torch loaded: one per shard adds up.)"""
        if len(np.load(src_prefix + ".samples.npy", mmap_mode="r")) == 0:
            return  # every row of the shard was rejected (megatron cannot mmap its empty .bin)
        src = IndexedSamples(src_prefix)
        task_map = np.asarray([self._task_code(t) for t in src.meta["tasks"]], dtype=np.int16)
        rows = np.array(src.samples)
        grids = np.array(src.grids)
        videos = np.array(src.video_table)
        strings = np.array(src._strings)
        index = src.ds.index
        b = self._builder
        offset = len(b.sequence_lengths)
        b.sequence_lengths.extend(index.sequence_lengths.tolist())
        b.document_indices.extend((offset + index.document_indices[1:]).tolist())
        b.sequence_modes.extend(index.sequence_modes.tolist())
        del src, index
        with open(src_prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, b.data_file, 1 << 22)
        rows["image_start"] += self._n_images
        rows["video_start"] += self._n_videos
        rows["id_off"] += self._str_pos
        rows["answer_off"] += self._str_pos
        rows["task"] = task_map[rows["task"]]
        self._rows.append(self._block[: self._nblock].copy())
        self._rows.append(rows)
        self._nblock = 0
        if len(grids):
            self._grids.append(grids)
        if len(videos):
            self._videos.append(videos)
        self._strings.write(strings.tobytes())
        self._str_pos += len(strings)
        self._n_images += len(grids)
        self._n_videos += len(videos)
        self.num_samples += len(rows)
        self.num_tokens += int(rows["n_tokens"].sum())

    def finalize(self, meta: dict[str, Any], prefix: str | None = None) -> list[str]:
        """Write index and sidecar, then rename everything to ``prefix.*`` (default: the constructor's
        prefix; the same filesystem); returns the final paths."""
        prefix = prefix or self.prefix
        self._builder.finalize(self._tmp + ".idx")
        self._strings.close()
        rows = np.concatenate(self._rows + [self._block[: self._nblock]])
        grids = np.concatenate(self._grids) if self._grids else np.zeros((0, 3), dtype=np.int32)
        np.save(self._tmp + ".samples.npy", rows)
        np.save(self._tmp + ".grid.npy", grids)
        videos = np.concatenate(self._videos) if self._videos else np.zeros(0, dtype=VIDEO_DTYPE)
        np.save(self._tmp + ".video.npy", videos)
        meta = dict(meta)
        meta.update(format=FORMAT_VERSION, num_samples=self.num_samples, num_images=int(grids.shape[0]),
                    num_videos=len(videos), num_tokens=self.num_tokens, tasks=self.tasks,
                    answer_types=list(ANSWER_TYPES))
        with open(self._tmp + ".meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        # The .idx goes last: IndexedDataset.exists() checks for it, so a partial set never looks complete.
        finals = []
        for suffix in (".bin",) + SIDECAR_SUFFIXES + (".idx",):
            os.replace(self._tmp + suffix, prefix + suffix)
            finals.append(prefix + suffix)
        return finals

    def abort(self) -> None:
        """Remove the temporary files (after an error)."""
        try:
            self._builder.data_file.close()
            self._strings.close()
        finally:
            for suffix in (".bin", ".idx") + SIDECAR_SUFFIXES:
                if os.path.exists(self._tmp + suffix):
                    os.remove(self._tmp + suffix)


class IndexedSamples:
    """Read access to a dataset written by :class:`SampleWriter` (everything memory-mapped)."""

    def __init__(self, prefix: str) -> None:
        def _missing(suffixes) -> None:
            missing = [prefix + s for s in (".bin", ".idx") + suffixes if not os.path.exists(prefix + s)]
            if missing:
                raise FileNotFoundError(f"dataset '{prefix}' is incomplete: missing {', '.join(missing)}")

        _missing(_V1_SUFFIXES)
        self.prefix = prefix
        with open(prefix + ".meta.json", encoding="utf-8") as f:
            self.meta: dict[str, Any] = json.load(f)
        if self.meta.get("format") not in _FORMATS:
            raise ValueError(f"{prefix}.meta.json: format {self.meta.get('format')!r}, expected {FORMAT_VERSION!r}")
        self.samples = np.load(prefix + ".samples.npy", mmap_mode="r")
        if self.meta["format"] == FORMAT_VERSION:
            _missing(SIDECAR_SUFFIXES)
            self.video_table = np.load(prefix + ".video.npy", mmap_mode="r")
            self._vid_count, self._vid_start = self.samples["n_videos"], self.samples["video_start"]
        else:  # written before videos existed
            self.video_table = np.zeros(0, dtype=VIDEO_DTYPE)
            self._vid_count = self._vid_start = np.zeros(len(self.samples), dtype=np.int64)
        if len(self.samples) == 0:
            raise ValueError(f"dataset '{prefix}' has no samples (every row rejected? see its rejects file)")
        self.ds = IndexedDataset(prefix, multimodal=True)
        self.grids = np.load(prefix + ".grid.npy", mmap_mode="r")
        size = os.path.getsize(prefix + ".strings.bin")
        self._strings = np.memmap(prefix + ".strings.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._doc = np.asarray(self.ds.document_indices)
        if len(self.samples) != len(self._doc) - 1:
            raise ValueError(f"{prefix}: sidecar has {len(self.samples)} samples, index has {len(self._doc) - 1}")
        self._check_sizes()
        self.image_format: str = self.meta.get("image_format", "pixels")
        self.patch_dtype: str = self.meta.get("patch_dtype", "float32")
        self.special: dict[str, int] = self.meta.get("tokenizer", {})

    def _check_sizes(self) -> None:
        """A truncated or mismatched file fails here, naming it, not steps later as "buffer is smaller than
        requested size" or as answers read back as ''. One vectorised pass over the index and sidecar."""
        p, idx = self.prefix, self.ds.index
        if len(idx.sequence_lengths):
            ends = np.asarray(idx.sequence_pointers, np.int64) + np.asarray(idx.sequence_lengths, np.int64) * idx.dtype_size
            need, have = int(ends.max()), os.path.getsize(p + ".bin")
            if have < need:
                raise ValueError(f"{p}.bin is truncated or damaged: {have} bytes, its index {p}.idx needs {need}")
        s = self.samples
        need = int(max((s["id_off"] + s["id_len"]).max(), (s["answer_off"] + s["answer_len"]).max()))
        if len(self._strings) < need:
            raise ValueError(f"{p}.strings.bin is truncated or damaged: {len(self._strings)} bytes, the sample "
                             f"table {p}.samples.npy needs {need}")
        need = int((s["image_start"].astype(np.int64) + s["n_images"]).max())
        if len(self.grids) < need:
            raise ValueError(f"{p}.grid.npy is truncated or damaged: {len(self.grids)} image grids, the sample "
                             f"table {p}.samples.npy needs {need}")
        need = int((np.asarray(self._vid_start, np.int64) + self._vid_count).max())
        if len(self.video_table) < need:
            raise ValueError(f"{p}.video.npy is truncated or damaged: {len(self.video_table)} videos, the sample "
                             f"table {p}.samples.npy needs {need}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> np.ndarray:
        """Token count per sample (int32 [N])."""
        return self.samples["n_tokens"]

    def doc_items(self, i: int) -> range:
        """Item indices of sample ``i`` in the IndexedDataset."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for dataset '{self.prefix}' of {len(self)} samples")
        return range(int(self._doc[i]), int(self._doc[i + 1]))

    def string(self, off: int, n: int) -> str:
        return bytes(self._strings[int(off) : int(off) + int(n)]).decode("utf-8")

    def tokens(self, i: int) -> np.ndarray:
        """Token ids (int32 [L])."""
        return np.array(self.ds.get(self.doc_items(i).start)[0])

    def loss_spans(self, i: int) -> np.ndarray:
        return np.asarray(self.ds.get(self.doc_items(i).start + 1)[0]).reshape(-1, 2)

    def loss_mask(self, i: int) -> np.ndarray:
        """bool [L]: True on tokens the SFT loss is computed on (assistant content and its <|im_end|>)."""
        m = np.zeros(int(self.samples[i]["n_tokens"]), dtype=bool)
        for a, b in self.loss_spans(i):
            m[a:b] = True
        return m

    def grid_thw(self, i: int) -> np.ndarray:
        r = self.samples[i]
        return np.asarray(self.grids[r["image_start"] : r["image_start"] + r["n_images"]])

    def video_records(self, i: int) -> np.ndarray:
        """:data:`VIDEO_DTYPE` rows of sample ``i``'s videos (grid, second_per_grid, source_fps)."""
        a = int(self._vid_start[i])
        return np.asarray(self.video_table[a : a + int(self._vid_count[i])])

    def video_grid_thw(self, i: int) -> np.ndarray:
        """int32 ``[n_videos, 3]`` patch grids of sample ``i``'s videos."""
        return self.video_records(i)["grid"].reshape(-1, 3)

    def second_per_grid(self, i: int) -> np.ndarray:
        """float64 ``[n_videos]``: seconds per temporal grid step of each video (``second_per_grid_ts``)."""
        return self.video_records(i)["second_per_grid"]

    def videos(self, i: int) -> list[torch.Tensor]:
        """The stored videos of sample ``i``: uint8 ``[2t, H, W, 3]`` frame stacks (pixels) or
        ``[t*h*w, 1176]`` patch tensors (patches), copied out of the mmap."""
        items = self.doc_items(i)
        first = items.start + 2 + int(self.samples[i]["n_images"])
        out = []
        for k, (t, h, w) in zip(range(first, items.stop), self.video_grid_thw(i)):
            words, mode = self.ds[k]
            if mode != MODE_VIDEO:
                raise ValueError(f"{self.prefix}: item {k} of sample {i} has mode {mode}, expected a video")
            out.append(self._decode_item(words, t, h, w, frames=2 * t))
        return out

    def _decode_item(self, words: np.ndarray, t: int, h: int, w: int, frames: int | None) -> torch.Tensor:
        if self.image_format == "pixels":
            shape = (h * 14, w * 14, 3) if frames is None else (frames, h * 14, w * 14, 3)
            return torch.from_numpy(words.view(np.uint8).reshape(shape).copy())
        if self.patch_dtype == "bfloat16":
            return torch.from_numpy(words.view(np.int16).reshape(t * h * w, PATCH_DIM).copy()).view(torch.bfloat16)
        return torch.from_numpy(words.view(np.float32).reshape(t * h * w, PATCH_DIM).copy())

    def images(self, i: int) -> list[torch.Tensor]:
        """The stored images of sample ``i``: uint8 ``[H, W, 3]`` tensors (pixels) or ``[P, 1176]`` patch
        tensors (patches, in the stored dtype), copied out of the mmap."""
        items = self.doc_items(i)
        out = []
        for k, (t, h, w) in zip(range(items.start + 2, items.stop), self.grid_thw(i)):
            words, mode = self.ds[k]
            if mode != MODE_IMAGE:
                raise ValueError(f"{self.prefix}: item {k} of sample {i} has mode {mode}, expected an image")
            out.append(self._decode_item(words, t, h, w, frames=None))
        return out

    def info(self, i: int) -> SampleInfo:
        r = self.samples[i]
        return SampleInfo(
            index=i,
            id=self.string(r["id_off"], r["id_len"]),
            answer=self.string(r["answer_off"], r["answer_len"]),
            task=self.meta["tasks"][r["task"]],
            answer_type=self.meta["answer_types"][r["answer_type"]],
            difficulty=float(r["difficulty"]),
            quality=float(r["quality"]),
            is_rl=bool(r["is_rl"]),
            n_tokens=int(r["n_tokens"]),
            prompt_len=int(r["prompt_len"]),
            file=self.meta["inputs"][r["file"]] if r["file"] < len(self.meta.get("inputs", [])) else "",
            line=int(r["line"]),
        )
