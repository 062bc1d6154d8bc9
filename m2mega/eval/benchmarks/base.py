"""What every benchmark module shares: the item a loader yields, the spec the CLI drives, reading the
released files (JSON / JSONL, parquet when pyarrow is installed) and the final-answer rule.

A benchmark is three functions (:class:`BenchmarkSpec`): ``load(path, **options) -> list[BenchItem]``
reads the published file(s); ``score(record, response) -> dict`` scores one generation (``"score"`` in
[0, 1] plus whatever the aggregation needs, e.g. the parsed prediction); ``aggregate(scored) -> dict``
turns the scored records into the authors' headline number and its sub-scores (fractions in [0, 1]).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from m2mega.rewards import extract_answer

__all__ = [
    "BenchItem",
    "accuracy_table",
    "rows",
    "BenchmarkSpec",
    "BenchDataError",
    "final_answer",
    "image_of",
    "levenshtein",
    "mean",
    "read_records",
    "row_image",
    "group_accuracy",
]


class BenchDataError(ValueError):
    """A benchmark file or record that cannot be read; the message names the file/record."""


@dataclass
class BenchItem:
    """One prompt: ``text`` after the images (paths, or encoded image bytes from parquet releases) and the
    ``record`` the scorer needs (ground truth, question type, grouping keys). ``video``: a video part's
    fields (``{"video": path or frame paths, "max_frames": ...}``, m2mega.data.video), before the images."""

    id: str
    text: str
    images: list[str | bytes] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    video: dict[str, Any] | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    headline: str  # the key of aggregate()'s output that the paper reports
    load: Callable[..., list[BenchItem]]
    score: Callable[[Mapping[str, Any], str], dict[str, Any]]
    aggregate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
    formats: str  # one line: the release files load() reads


def final_answer(response: str) -> str:
    """The answer part of a response: the last ``<answer>`` block (an unclosed one too) / ``\\boxed{}``
    via the training rewards' extractor, else the whole response (the benchmarks' own scorers read raw
    responses, which is what a model prompted to answer directly produces)."""
    ans = extract_answer(response, allow_unclosed=True)
    return (ans if ans is not None else response).strip()


def mean(values: Iterable[float]) -> float:
    v = [float(x) for x in values]
    return sum(v) / len(v) if v else float("nan")


def group_accuracy(scored: Sequence[Mapping[str, Any]], key: str, prefix: str) -> dict[str, float]:
    """``{prefix/value: mean score}`` over records grouped by ``record[key]`` (a list value counts the
    record in each of its groups, as MathVista's skills and LogicVista's skills do)."""
    groups: dict[str, list[float]] = {}
    for r in scored:
        vals = r.get(key)
        for v in vals if isinstance(vals, list) else [vals]:
            if v is not None and v != "":
                groups.setdefault(str(v), []).append(float(r["score"]))
    return {f"{prefix}/{g}": mean(s) for g, s in sorted(groups.items())}


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute, unit costs): what MathVista's scorer (python-Levenshtein's
    ``distance``) uses to map a free-text choice to the nearest option; two rows of DP, O(len a * len b)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # optional: most releases also ship JSON/JSONL, which need nothing
        raise BenchDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             "or pass the release's JSON/JSONL file") from e
    return pq.read_table(path).to_pylist()


def read_records(path: str, id_key: str | None = None) -> list[dict]:
    """Rows of a ``.jsonl`` (one object a line), ``.json`` (a list of objects, or an object of objects keyed
    by id: the key is stored under ``id_key`` when given) or ``.parquet`` file."""
    if not os.path.isfile(path):
        raise BenchDataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        return _read_parquet(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BenchDataError(f"{path}:{n}: not JSON ({e.msg})") from e
            data: Any = rows
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise BenchDataError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        if not all(isinstance(v, dict) for v in data.values()):
            raise BenchDataError(f"{path}: expected a list of records or an object of records keyed by id")
        data = [{**v, id_key: k} if id_key and id_key not in v else v for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchDataError(f"{path}: expected a list of JSON objects")
    return data


def rows(path: str, required: Sequence[str], id_key: str | None = None) -> Iterator[tuple[int, dict, str]]:
    """``(index, record, "PATH record N")`` for each record of ``path``, checked to have ``required``."""
    for n, row in enumerate(read_records(path, id_key)):
        where = f"{path} record {n}"
        require(row, required, where)
        yield n, row, where


def accuracy_table(scored: Sequence[Mapping[str, Any]], groups: Mapping[str, str]) -> dict[str, Any]:
    """``accuracy`` (mean score), ``n`` and :func:`group_accuracy` for each ``{record key: prefix}``."""
    out: dict[str, Any] = {"accuracy": mean(r["score"] for r in scored), "n": len(scored)}
    for key, prefix in groups.items():
        out.update(group_accuracy(scored, key, prefix))
    return out


def require(row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise BenchDataError(f"{where}: missing field(s) {missing}")


def image_of(value: Any, base_dir: str, where: str) -> list[str | bytes]:
    """A release's image field as a list of paths/bytes: a path relative to ``base_dir``, an HF image
    struct ``{"bytes": ..., "path": ...}`` (parquet), raw bytes, or empty/None (text-only question)."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        if value.get("bytes"):
            return [bytes(value["bytes"])]
        value = value.get("path")
        if not value:
            return []
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if not isinstance(value, str):
        raise BenchDataError(f"{where}: image field {value!r} is neither a path nor image bytes")
    p = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.isfile(p):
        raise BenchDataError(f"{where}: image {p} not found")
    return [p]


def row_image(row: Mapping[str, Any], base_dir: str, where: str) -> list[str | bytes]:
    """:func:`image_of` the record's ``decoded_image`` (HF parquet releases) or else its ``image`` field."""
    return image_of(row.get("decoded_image") or row.get("image"), base_dir, where)


def option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


