"""VSI-Bench (Yang et al., "Thinking in Space", 2024): spatial questions about indoor-scene videos.

Release: ``nyu-visionx/VSI-Bench`` ``test.jsonl``/``.parquet``; fields ``id``, ``dataset``, ``scene_name``,
``question_type``, ``question``, ``options`` (list, ``"A. chair"``; null for numeric types),
``ground_truth`` (a letter, or a number as text). Videos are ``<dataset>/<scene_name>.mp4``. With
``--video-dir VIDEOS`` each question gets ``VIDEOS/<dataset>/<scene_name>.mp4`` as a video (decoded and
sampled at preprocessing, m2mega.data.video: 2 fps, at most ``num_frames`` frames, uniformly spread, the
Qwen2.5-VL way); with ``--frames-dir FRAMES`` it gets ``num_frames`` of the frames extracted to
``FRAMES/<dataset>/<scene_name>/*.{jpg,png}`` as images, sampled uniformly, as lmms-eval's multi-image
setting does (32 by default).

Scoring (the authors' ``vsibench`` utils): multiple-choice types by exact match (case-insensitive) of the
prediction's first word, stripped of a trailing '.'; numeric types by MRA (``metrics.mean_relative_accuracy``)
of ``float(first word)`` (unreadable: 0). Overall = mean of the 8 categories, where relative direction is
the mean of its easy / medium / hard accuracies.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from ..metrics import mean_relative_accuracy
from .base import BenchDataError, BenchItem, BenchmarkSpec, final_answer, mean, rows

MCA_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
             "object_rel_distance", "route_planning", "obj_appearance_order")
NA_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
REL_DIRECTION = MCA_TYPES[:3]
CATEGORIES = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
              "object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order")
_FRAME_EXT = (".jpg", ".jpeg", ".png", ".webp")


def _frames(frames_dir: str, dataset: str, scene: str, num_frames: int, where: str) -> list[str]:
    d = os.path.join(frames_dir, dataset, scene)
    if not os.path.isdir(d):
        raise BenchDataError(f"{where}: no frame folder {d} (extract the video's frames there)")
    files = sorted(f for f in os.listdir(d) if f.lower().endswith(_FRAME_EXT))
    if not files:
        raise BenchDataError(f"{where}: frame folder {d} holds no images")
    idx = np.linspace(0, len(files) - 1, min(num_frames, len(files)), dtype=int)
    return [os.path.join(d, files[i]) for i in idx]


def prompt_text(row: Mapping[str, Any]) -> str:
    """lmms-eval's VSI-Bench prompt (pre-prompt, question, options, post-prompt)."""
    pre = "These are frames of a video."
    if row["question_type"] in NA_TYPES:
        return f"{pre}\n{row['question']}\nPlease answer the question using a single word or phrase."
    opts = "Options:\n" + "\n".join(row["options"])
    return "\n".join([pre, row["question"], opts, "Answer with the option's letter from the given choices directly."])


def _video(video_dir: str, dataset: str, scene: str, num_frames: int, where: str) -> dict[str, Any]:
    path = os.path.join(video_dir, dataset, f"{scene}.mp4")
    if not os.path.isfile(path):
        raise BenchDataError(f"{where}: no video {path}")
    return {"video": os.path.abspath(path), "max_frames": num_frames}


def load(path: str, frames_dir: str | None = None, num_frames: int = 32, video_dir: str | None = None,
         **_: Any) -> list[BenchItem]:
    if (frames_dir is None) == (video_dir is None):
        raise BenchDataError("VSI-Bench is a video benchmark: pass --video-dir (the release's "
                             "<dataset>/<scene_name>.mp4) or --frames-dir (frames extracted to "
                             "FRAMES/<dataset>/<scene_name>/*.jpg), not both")
    if num_frames < 2:
        raise BenchDataError(f"--num-frames must be >= 2, got {num_frames}")
    items = []
    for n, row, where in rows(path, ("question_type", "question", "ground_truth", "dataset", "scene_name")):
        qt = row["question_type"]
        if qt not in MCA_TYPES + NA_TYPES:
            raise BenchDataError(f"{where}: unknown question_type {qt!r}")
        if qt in MCA_TYPES and not row.get("options"):
            raise BenchDataError(f"{where}: multiple-choice question without options")
        scene = (row["dataset"], row["scene_name"], num_frames, where)
        items.append(BenchItem(
            id=str(row.get("id", n)), text=prompt_text(row),
            images=list(_frames(frames_dir, *scene)) if frames_dir else [],
            video=_video(video_dir, *scene) if video_dir else None,
            record={"question_type": qt, "ground_truth": str(row["ground_truth"])}))
    return items


def fuzzy_matching(pred: str) -> str:
    """The official answer reading: the first word, a trailing '.' removed."""
    return pred.split(" ")[0].rstrip(".").strip()


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def score(record: Mapping[str, Any], response: str) -> dict[str, Any]:
    pred = fuzzy_matching(final_answer(response))
    if record["question_type"] in MCA_TYPES:
        s = 1.0 if pred.lower() == record["ground_truth"].lower() else 0.0
    else:
        gt = _to_float(record["ground_truth"])
        if gt is None:
            raise BenchDataError(f"numeric ground truth {record['ground_truth']!r} is not a number")
        s = mean_relative_accuracy(_to_float(pred), gt)
    return {"pred": pred, "score": s}


def aggregate(scored: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, list[float]] = {}
    for r in scored:
        by_type.setdefault(r["question_type"], []).append(r["score"])
    per = {t: mean(v) for t, v in by_type.items()}
    cats: dict[str, float] = {t: per[t] for t in CATEGORIES if t in per}
    rd = [per[t] for t in REL_DIRECTION if t in per]
    if rd:
        cats["object_rel_direction"] = mean(rd)
    out: dict[str, Any] = {"overall": mean(cats.values()), "n": len(scored)}
    out.update({f"category/{k}": cats[k] for k in CATEGORIES if k in cats})
    out.update({f"type/{t}": per[t] for t in REL_DIRECTION if t in per})
    missing = [c for c in CATEGORIES if c not in cats]
    if missing:
        out["missing_categories"] = missing
    return out


SPEC = BenchmarkSpec(name="vsibench", headline="overall", load=load, score=score, aggregate=aggregate,
                     formats="test.jsonl / test.parquet (+ --video-dir with the videos, or --frames-dir with "
                             "their frames)")
