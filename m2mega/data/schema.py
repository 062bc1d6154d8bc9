"""The JSONL input schema and row validation with clear reject reasons.

One sample per line::

    {"id": "geo-0001",
     "messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image", "image": "imgs/a.png"}, {"type": "text", "text": "..."}]}],
                   # a user turn may also hold {"type": "video", "video": "clip.mp4" | ["f0.jpg", ...], "fps": 2, ...}
     "answer": "12", "task": "math", "answer_type": "choice" | "number" | "text" | "math",
     "difficulty": 0.4,   # optional, in [0, 1]
     "quality": 0.9}      # optional

SFT rows end with an assistant turn (``<think>…</think><answer>…</answer>``); RL rows end with a user
turn and must carry ``answer``. Image and video paths are absolute or relative to the JSONL file; video
parts are validated by :func:`m2mega.data.video.parse_video_part`.

:func:`parse_row` raises :class:`RejectError` whose ``reason`` is a short machine-readable code
(``malformed_json``, ``bad_unicode``, ``missing_field``, ``bad_field``, ``unknown_answer_type``,
``bad_answer``, ``bad_message``, ...)
followed by a human-readable detail; the preprocessing summary counts rejects by code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ANSWER_TYPES", "ROLES", "RejectError", "Row", "parse_row", "reason_code"]

ANSWER_TYPES = ("choice", "number", "text", "math")
ROLES = ("system", "user", "assistant")


class RejectError(Exception):
    """A row that cannot become a sample. ``reason`` = ``"<code>: <detail>"``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = f"{code}: {detail}"
        self.row_id = ""


def reason_code(reason: str) -> str:
    """The code part of a reject reason (``"image_missing: ..."`` -> ``"image_missing"``)."""
    return reason.split(":", 1)[0]


@dataclass
class Row:
    """A validated input row. ``messages`` keep the input structure with image paths resolved to absolute
    paths; ``image_paths`` lists them in order of appearance, ``videos`` the video parts
    (:class:`~m2mega.data.video.VideoSpec`). ``is_rl``: the row ends at a user turn."""

    id: str
    messages: list[dict]
    answer: str
    task: str
    answer_type: str
    difficulty: float = math.nan
    quality: float = math.nan
    image_paths: list[str] = field(default_factory=list)
    is_rl: bool = False
    videos: list = field(default_factory=list)


def _number(obj: dict, key: str, lo: float | None, hi: float | None) -> float:
    if key not in obj or obj[key] is None:
        return math.nan
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RejectError("bad_field", f"'{key}' must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RejectError("bad_field", f"'{key}'={v} outside [{lo}, {hi}]")
    return float(v)


def _string(obj: dict, key: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RejectError("missing_field", f"'{key}'")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise RejectError("bad_field", f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _messages(raw: Any, base_dir: str) -> tuple[list[dict], list[str], list]:
    from .video import parse_video_part  # here: video.py imports this module

    if not isinstance(raw, list) or not raw:
        raise RejectError("bad_field", "'messages' must be a non-empty list")
    out, paths, videos = [], [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RejectError("bad_message", f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RejectError("bad_message", f"messages[{i}].role={role!r} not in {ROLES}")
        if role == "system" and i != 0:
            raise RejectError("bad_message", f"messages[{i}]: a system turn must come first")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RejectError("bad_message", f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, p in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(p, dict):
                raise RejectError("bad_message", f"{where} is not an object")
            kind = p.get("type")
            if kind == "image":
                if role != "user":
                    raise RejectError("bad_message", f"{where}: images are only supported in user turns")
                path = p.get("image")
                if not isinstance(path, str) or not path:
                    raise RejectError("bad_message", f"{where}: image part needs a non-empty 'image' path")
                path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
                paths.append(path)
                parts.append({"type": "image", "image": path})
            elif kind == "video":
                if role != "user":
                    raise RejectError("bad_message", f"{where}: videos are only supported in user turns")
                videos.append(parse_video_part(p, base_dir, where))
                parts.append({"type": "video", "video": videos[-1].source})
            elif kind == "text":
                if not isinstance(p.get("text"), str):
                    raise RejectError("bad_message", f"{where}: text part needs a string 'text'")
                parts.append({"type": "text", "text": p["text"]})
            else:
                raise RejectError("bad_message", f"{where}: unknown part type {kind!r} (image|video|text)")
        if role == "assistant":
            # Assistant turns are training targets: flatten to text (images there are rejected above).
            out.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    last = out[-1]["role"]
    if last == "system":
        raise RejectError("bad_message", "conversation has no user turn")
    if not any(m["role"] == "user" for m in out):
        raise RejectError("bad_message", "conversation has no user turn")
    return out, paths, videos


def _check_answer(answer: str, answer_type: str) -> None:
    """The ground truth must be one the reward functions can score (else every rollout would fail)."""
    from m2mega.rewards import parse_choice, parse_number

    if answer_type == "choice" and parse_choice(answer) is None:
        raise RejectError("bad_answer", f"answer {answer!r} is not an option letter (answer_type='choice')")
    if answer_type == "number" and parse_number(answer) is None:
        raise RejectError("bad_answer", f"answer {answer!r} is not a number (answer_type='number')")


def _lone_surrogate(obj: Any, path: str) -> str | None:
    """JSON path of the first string holding a lone surrogate (None: all strings are valid Unicode)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{path} (character {e.start})"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        sub = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
        found = (_lone_surrogate(k, path + ".<key>") if isinstance(k, str) else None) or _lone_surrogate(v, sub)
        if found:
            return found
    return None


def parse_row(line: str | bytes, base_dir: str) -> Row:
    """Validate one JSONL line; raise :class:`RejectError` with the first problem found."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise RejectError("malformed_json", str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise RejectError("malformed_json", f"line is a JSON {type(obj).__name__}, not an object")
    where = _lone_surrogate(obj, "$")
    if where is not None:
        # JSON allows "\ud800" escapes that decode to no character; UTF-8 cannot hold them, so the row
        # would fail later (tokenizer, string table) as a bug instead of a reject.
        raise RejectError("bad_unicode", f"lone UTF-16 surrogate at {where} (not valid Unicode)")
    try:
        return _validate(obj, base_dir)
    except RejectError as e:
        rid = obj.get("id")
        e.row_id = rid if isinstance(rid, str) else ""  # so the reject record can name the row
        raise


def _validate(obj: dict, base_dir: str) -> Row:
    rid = obj.get("id")
    if rid is None:
        raise RejectError("missing_field", "'id'")
    if not isinstance(rid, str) or not rid:
        raise RejectError("bad_field", f"'id' must be a non-empty string, got {rid!r}")
    if "messages" not in obj:
        raise RejectError("missing_field", "'messages'")
    messages, paths, videos = _messages(obj["messages"], base_dir)
    task = _string(obj, "task")
    if not task:
        raise RejectError("bad_field", "'task' is empty")
    answer_type = _string(obj, "answer_type")
    if answer_type not in ANSWER_TYPES:
        raise RejectError("unknown_answer_type", f"{answer_type!r} not in {ANSWER_TYPES}")
    is_rl = messages[-1]["role"] == "user"
    answer = _string(obj, "answer", required=is_rl)
    if is_rl and not answer.strip():
        raise RejectError("bad_field", "RL row (ends at a user turn) has an empty 'answer'")
    if answer.strip():
        _check_answer(answer, answer_type)
    return Row(
        id=rid,
        messages=messages,
        answer=answer,
        task=task,
        answer_type=answer_type,
        difficulty=_number(obj, "difficulty", 0.0, 1.0),
        quality=_number(obj, "quality", None, None),
        image_paths=paths,
        is_rl=is_rl,
        videos=videos,
    )
