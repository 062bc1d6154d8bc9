#!/usr/bin/env python3
"""Score RL-sample difficulty = 1 - accuracy of N sampled rollouts, and write it back into the JSONL.

    python tools/score_difficulty.py --input rl.jsonl --rollouts rollouts.jsonl --output rl.scored.jsonl \\
        [--keep-trivial] [--reward-config rewards.json] [--workers 8] [--report report.json]

``--input``: the RL JSONL (one sample per line with ``id``, ``answer``, ``task``, ``answer_type``; see
``m2mega/data/schema.py``). ``--rollouts``: one JSON object per line::

    {"id": "geo-0001", "responses": ["<think>…</think><answer>B</answer>", "…"]}

An id may appear on several lines (rollouts generated in shards): its responses are pooled. A rollout is
counted as right by the ``correct`` flag of :func:`m2mega.rewards.compute_reward` under the reward config
(``--reward-config``: a JSON or YAML file with the per-task dict of :mod:`m2mega.rewards.registry`), so
spatial numbers scored with EDNM count as right within ``ednm_correct_rel_tol``.

Output: every input row, in input order, with ``difficulty`` (in [0, 1]) and ``difficulty_rollouts``
(N) added, except

* rows whose rollouts were all right or all wrong (no learning signal for GRPO), dropped by default
  (``--keep-trivial`` keeps them);
* rows whose ground truth does not parse as their ``answer_type`` (``bad_ground_truth``), dropped;
* rows with fewer than ``--min-rollouts`` rollouts (default 1) are kept unchanged without a difficulty
  (``--drop-missing`` drops them).

Relative image / video paths are rewritten to name the same files from ``--output``'s directory when it
differs from ``--input``'s (``tools/preprocess_data.py`` resolves them against the JSONL's directory).

Every category is counted in the report (stderr, and ``--report`` as JSON) with example ids, and rollouts
whose id is not in the input are reported as ``orphan_rollouts``: nothing is lost silently.

Memory: the input is read twice; between the passes an index ``id -> (answer, task, answer_type,
counts)`` is held in a dict (a few hundred bytes per row: ~1 GB for 2M rows). Rollout texts are streamed
and never held. Exit code 0, or 2 on unusable input (malformed JSON, a row without id, a duplicate id;
the message names file and line).

``--checkpoint`` (generate the rollouts with a model instead of reading them) samples them with the
checkpoint's own model, sampling settings and preprocessing (``m2mega.train.rollout_files.write_rollouts``),
images and videos alike (a video row is decoded with the training data's video settings: fps, frame and
pixel bounds). A row the preprocessor rejects (e.g. a missing or truncated clip) gets no rollouts: it is
kept unscored and counted as ``missing_rollouts``, its reason in ``OUTPUT.rollouts.jsonl.rejects.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from m2mega.rewards import RewardConfig, compute_reward

EXAMPLES_PER_KIND = 5


class InputError(ValueError):
    """Unusable input: the message names the file and line."""


@dataclass
class _Entry:
    answer: str
    task: str
    answer_type: str
    n: int = 0
    correct: int = 0
    error: str | None = None


@dataclass
class Report:
    counts: dict[str, int] = field(
        default_factory=lambda: {
            "rows": 0,
            "written": 0,
            "scored": 0,
            "dropped_all_correct": 0,
            "dropped_all_wrong": 0,
            "bad_ground_truth": 0,
            "missing_rollouts": 0,
            "dropped_missing": 0,
            "rollout_lines": 0,
            "rollouts": 0,
            "orphan_rollouts": 0,
        }
    )
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, what: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES_PER_KIND:
            ex.append(what)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}


def _iter_jsonl(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _load(path: str, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise InputError(f"{path}:{lineno}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _row_id(path: str, lineno: int, obj: dict) -> str:
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        raise InputError(f"{path}:{lineno}: row has no usable 'id' (got {rid!r})")
    return str(rid)


def build_index(path: str, progress: bool = False) -> dict[str, _Entry]:
    """Pass 1: ``id -> _Entry`` for every input row. Raises InputError on duplicates / missing fields."""
    from tqdm import tqdm

    index: dict[str, _Entry] = {}
    first_line: dict[str, int] = {}
    for lineno, line in tqdm(_iter_jsonl(path), desc="index", unit="rows", disable=not progress):
        obj = _load(path, lineno, line)
        rid = _row_id(path, lineno, obj)
        if rid in index:
            raise InputError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {first_line[rid]})")
        vals = []
        for key in ("answer", "task", "answer_type"):
            v = obj.get(key)
            if not isinstance(v, str):
                raise InputError(f"{path}:{lineno} (id {rid!r}): '{key}' must be a string, got {v!r}")
            vals.append(v)
        index[rid] = _Entry(*vals)
        first_line[rid] = lineno
    return index


# Worker state: set in the parent before forking (inherited) or by the pool initializer.
_W_INDEX: dict[str, _Entry] = {}
_W_CONFIG: RewardConfig | None = None
_W_PATH = ""


def _init_worker(index: dict[str, _Entry], config: RewardConfig, path: str) -> None:
    global _W_INDEX, _W_CONFIG, _W_PATH
    _W_INDEX, _W_CONFIG, _W_PATH = index, config, path


def _score_line(item: tuple[int, str]) -> tuple[str, int, int, str | None, str | None]:
    """One rollouts line -> (id, n, n_correct, ground-truth error, input error)."""
    lineno, line = item
    try:
        obj = _load(_W_PATH, lineno, line)
        rid = _row_id(_W_PATH, lineno, obj)
        resps = obj.get("responses")
        if not isinstance(resps, list) or not all(isinstance(r, str) for r in resps):
            raise InputError(f"{_W_PATH}:{lineno} (id {rid!r}): 'responses' must be a list of strings")
    except InputError as e:
        return "", 0, 0, None, str(e)
    e = _W_INDEX.get(rid)
    if e is None:
        return rid, len(resps), -1, None, None  # orphan: counted, not scored
    ok = 0
    try:
        for r in resps:
            ok += compute_reward(r, e.answer, e.task, e.answer_type, _W_CONFIG).correct
    except ValueError as err:  # the ground truth or the config, never the response
        return rid, len(resps), 0, str(err), None
    return rid, len(resps), ok, None, None


def score_rollout_file(
    path: str, index: dict[str, _Entry], config: RewardConfig, report: Report, workers: int = 1, progress: bool = False
) -> None:
    """Pass 2: stream the rollouts, adding ``n``/``correct`` counts to the index entries."""
    from tqdm import tqdm

    _init_worker(index, config, path)
    items = _iter_jsonl(path)
    pool = None
    if workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        # With fork the initializer's arguments are inherited, not pickled.
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(index, config, path))
        results = pool.imap_unordered(_score_line, items, chunksize=64)
    else:
        results = map(_score_line, items)
    try:
        for rid, n, ok, gt_err, in_err in tqdm(results, desc="rollouts", unit="lines", disable=not progress):
            if in_err is not None:
                raise InputError(in_err)
            report.counts["rollout_lines"] += 1
            report.counts["rollouts"] += n
            if ok < 0:
                report.note("orphan_rollouts", rid, n)
                continue
            e = index[rid]
            if gt_err is not None:
                e.error = gt_err
            e.n += n
            e.correct += ok
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _rebase_media(obj: dict, from_dir: str, to_dir: str) -> None:
    """Rewrite the row's relative image / video paths (resolved against the input JSONL's directory by
    ``tools/preprocess_data.py``) so they name the same files from the output's directory: without this, an
    ``--output`` in another directory would leave every media path of the scored file dangling."""
    def fix(path):
        if not isinstance(path, str) or not path or os.path.isabs(path):
            return path
        return os.path.relpath(os.path.join(from_dir, path), to_dir)

    for m in obj.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image" and "image" in part:
                part["image"] = fix(part["image"])
            elif part.get("type") == "video" and "video" in part:
                v = part["video"]
                part["video"] = [fix(f) for f in v] if isinstance(v, list) else fix(v)


def write_output(
    in_path: str,
    out_path: str,
    index: dict[str, _Entry],
    report: Report,
    drop_trivial: bool = True,
    drop_missing: bool = False,
    min_rollouts: int = 1,
    progress: bool = False,
) -> None:
    """Pass 3: copy the input rows in order, adding the difficulty or dropping them (all counted)."""
    from tqdm import tqdm

    in_dir, out_dir = (os.path.dirname(os.path.abspath(p)) for p in (in_path, out_path))
    with open(out_path, "w", encoding="utf-8") as out:
        for lineno, line in tqdm(_iter_jsonl(in_path), desc="write", unit="rows", disable=not progress):
            obj = _load(in_path, lineno, line)
            rid = _row_id(in_path, lineno, obj)
            if in_dir != out_dir:
                _rebase_media(obj, in_dir, out_dir)
            e = index[rid]
            report.counts["rows"] += 1
            if e.error is not None:
                report.note("bad_ground_truth", f"{rid}: {e.error}")
                continue
            if e.n < min_rollouts:
                report.note("missing_rollouts", f"{rid} ({e.n} rollouts)")
                if drop_missing:
                    report.counts["dropped_missing"] += 1
                    continue
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                report.counts["written"] += 1
                continue
            report.counts["scored"] += 1
            if e.correct == e.n:
                report.note("dropped_all_correct" if drop_trivial else "all_correct", rid)
                if drop_trivial:
                    continue
            elif e.correct == 0:
                report.note("dropped_all_wrong" if drop_trivial else "all_wrong", rid)
                if drop_trivial:
                    continue
            obj["difficulty"] = round(1.0 - e.correct / e.n, 6)
            obj["difficulty_rollouts"] = e.n
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            report.counts["written"] += 1


def load_reward_config(path: str | None) -> RewardConfig:
    if not path:
        return RewardConfig()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if cfg is not None and not isinstance(cfg, dict):
        raise InputError(f"{path}: reward config must be a mapping of task -> settings")
    try:
        return RewardConfig.from_dict(cfg)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def _generate_with_checkpoint(args: argparse.Namespace) -> str:
    """``--checkpoint``: roll out with the GRPO trainer's driver, write a rollouts JSONL, return its path."""
    from m2mega.train.rollout_files import write_rollouts

    out = args.output + ".rollouts.jsonl"
    write_rollouts(checkpoint=args.checkpoint, input_path=args.input, output_path=out, num_rollouts=args.num_rollouts)
    return out


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="RL JSONL with id, answer, task, answer_type")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rollouts", help='JSONL of {"id": ..., "responses": [str, ...]}')
    src.add_argument("--checkpoint", help="generate rollouts with this training checkpoint (or save root): its "
                     "model, sampling settings and preprocessing; TP1, or TP = world size under torchrun")
    p.add_argument("--num-rollouts", type=int, default=8, help="rollouts per prompt in --checkpoint mode")
    p.add_argument("--output", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--drop-trivial", dest="drop_trivial", action="store_true", default=True,
                   help="drop rows whose rollouts were all right or all wrong (default)")
    g.add_argument("--keep-trivial", dest="drop_trivial", action="store_false", help="keep them (difficulty 0 or 1)")
    p.add_argument("--drop-missing", action="store_true", help="drop rows without rollouts (default: keep, unscored)")
    p.add_argument("--min-rollouts", type=int, default=1, help="fewer rollouts than this counts as missing")
    p.add_argument("--reward-config", help="JSON/YAML per-task reward config (m2mega.rewards.registry)")
    p.add_argument("--workers", type=int, default=1, help="processes scoring rollouts")
    p.add_argument("--report", help="also write the report (counts, example ids) here as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.min_rollouts < 1 or args.workers < 1:
        p.error("--min-rollouts and --workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    progress = not args.no_progress
    report = Report()
    try:
        config = load_reward_config(args.reward_config)
        rollouts = args.rollouts if args.rollouts else _generate_with_checkpoint(args)
        index = build_index(args.input, progress)
        score_rollout_file(rollouts, index, config, report, args.workers, progress)
        write_output(args.input, args.output, index, report, args.drop_trivial, args.drop_missing,
                     args.min_rollouts, progress)  # fmt: skip
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = report.as_dict()
    print(json.dumps(rep, indent=1), file=sys.stderr)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
