"""Benchmark: verdict agreement and latency of answer graders on ``tests/data/grader_corpus.jsonl``.

    python benchmarks/bench_graders.py                    # ~1-2 min on 2 cores
    python benchmarks/bench_graders.py --json benchmarks/results/bench_graders_cpu.json --show-wrong

The corpus holds (model response, ground truth, answer_type, expected verdict) rows: math-verify's own
test cases (its ``tests/``, verdicts re-checked by hand, a few corrected; see the ``note`` fields) and
m2mega's hard cases (numbers read as their first number, several option letters, tolerance, intervals,
named left-hand sides, several boxes, lists, sets, matrices, units, equations, hostile input).

Graders, each given the whole response and the ground truth:

* **m2mega-now**: ``m2mega.rewards.compute_reward(...).correct`` (this checkout);
* **m2mega-before**: the same function from ``git show <--before-rev>:m2mega/rewards/*`` (default HEAD),
  loaded as a separate package, so the old verdicts are measured rather than remembered;
* **math-verify**: HF ``math_verify.parse`` + ``verify`` on the ``<answer>`` block (the whole response when
  there is none) and the ground truth, each wrapped in ``$...$`` when it has no math delimiter, default
  extraction (LaTeX + expression), as TRL/open-r1 call it; its own 1 s signal timeouts (main thread).

Printed: agreement with the expected verdicts per category and overall, false positives of the kinds
issue 13 lists (``*first-number``, ``choice``), and per-call latency p50/p99/max (hostile rows apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "tests" / "data" / "grader_corpus.jsonl"
LISTED_FP = ("number:first-number", "math:first-number", "choice")  # issue 13's false-positive kinds


def load_corpus(path: Path = CORPUS) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            r = json.loads(line)
            missing = {"id", "category", "response", "answer", "answer_type", "expected"} - set(r)
            if missing:
                raise SystemExit(f"error: {path}:{n}: missing field(s) {sorted(missing)}")
            rows.append(r)
    return rows


def _group(cat: str) -> str:
    return "math-verify suite" if cat.startswith("mv:") else cat


def _head_rewards(rev: str) -> Callable[[dict], bool]:
    """``compute_reward`` of m2mega/rewards at git revision ``rev``, imported as its own package."""
    tmp = Path(tempfile.mkdtemp(prefix="m2mega_rewards_"))
    pkg = tmp / "m2mega_rewards_before"
    pkg.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:m2mega/rewards"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in names:
        if name.endswith(".py"):
            src = subprocess.run(["git", "show", f"{rev}:m2mega/rewards/{name}"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            (pkg / name).write_text(src)
    spec = importlib.util.spec_from_file_location(pkg.name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg.name] = mod
    spec.loader.exec_module(mod)
    cfg = mod.RewardConfig()

    def grade(r: dict) -> bool:
        try:
            return bool(mod.compute_reward(r["response"], r["answer"], "general", r["answer_type"], cfg).correct)
        except ValueError:  # the old reader refuses some ground truths (e.g. "1 000" as a number)
            return False

    return grade


def _now_rewards() -> Callable[[dict], bool]:
    from m2mega.rewards import RewardConfig, compute_reward
    from m2mega.rewards.sandbox import warm_up

    cfg = RewardConfig()
    warm_up()  # the grader worker's start-up (~1 s) is paid once per process, not per call

    def grade(r: dict) -> bool:
        try:
            return bool(compute_reward(r["response"], r["answer"], "general", r["answer_type"], cfg).correct)
        except ValueError:
            return False

    return grade


def _math_verify() -> Callable[[dict], bool]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    from m2mega.rewards.extract import extract_tag_block

    def delimit(s: str) -> str:  # math-verify looks for LaTeX inside delimiters: give bare answers some
        return s if any(d in s for d in ("$", "\\(", "\\[", "\\boxed")) else f"${s}$"

    def grade(r: dict) -> bool:
        try:
            gold = parse(delimit(r["answer"]), parsing_timeout=1)
            # The answer block when there is one: math-verify is not made to look past <answer> tags.
            text = extract_tag_block(r["response"], "answer")
            pred = parse(r["response"] if text is None else delimit(text), parsing_timeout=1)
            return bool(verify(gold, pred, timeout_seconds=1))
        except Exception:  # noqa: BLE001 - a grader error is a wrong verdict here
            return False

    return grade


def run(graders: dict[str, Callable[[dict], bool]], rows: list[dict]) -> dict:
    res: dict = {}
    for name, grade in graders.items():
        grade(rows[0])  # warm-up (imports, worker start-up)
        verdicts, times = [], []
        for r in rows:
            t0 = time.perf_counter()
            verdicts.append(grade(r))
            times.append(time.perf_counter() - t0)
        res[name] = {"verdicts": verdicts, "times": times}
    return res


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def summarize(res: dict, rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[_group(r["category"])].append(i)
        groups["type=" + r["answer_type"]].append(i)
        groups["ALL"].append(i)
    out: dict = {"n": len(rows), "graders": {}}
    for name, d in res.items():
        ok = [v == r["expected"] for v, r in zip(d["verdicts"], rows)]
        per = {g: sum(ok[i] for i in idx) / len(idx) for g, idx in groups.items()}
        fp = [rows[i]["id"] for i, r in enumerate(rows) if r["category"].startswith(LISTED_FP)
              and not r["expected"] and d["verdicts"][i]]  # fmt: skip
        benign = [t for t, r in zip(d["times"], rows) if not r["category"].endswith("hostile")]
        hostile = [t for t, r in zip(d["times"], rows) if r["category"].endswith("hostile")]
        out["graders"][name] = {
            "agreement": per,
            "listed_false_positives": fp,
            "latency_ms": {"p50": 1e3 * _pct(benign, 0.5), "p99": 1e3 * _pct(benign, 0.99),
                           "max": 1e3 * max(benign), "hostile_max": 1e3 * max(hostile, default=0.0)},  # fmt: skip
            "wrong": [rows[i]["id"] for i, k in enumerate(ok) if not k],
        }
    out["groups"] = {g: len(idx) for g, idx in groups.items()}
    return out


def print_table(summary: dict) -> None:
    names = list(summary["graders"])
    groups = sorted(summary["groups"], key=lambda g: (g == "ALL", g.startswith("type="), g))
    print(f"| category | n | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for g in groups:
        cells = [f"{100 * summary['graders'][n]['agreement'][g]:.1f}%" for n in names]
        print(f"| {g} | {summary['groups'][g]} | " + " | ".join(cells) + " |")
    print("| listed false positives | | " + " | ".join(str(len(summary["graders"][n]["listed_false_positives"]))
                                                  for n in names) + " |")  # fmt: skip
    for key in ("p50", "p99", "max", "hostile_max"):
        print(f"| latency {key} (ms) | | " + " | ".join(f"{summary['graders'][n]['latency_ms'][key]:.1f}"
                                                       for n in names) + " |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--before-rev", default="HEAD", help="git revision of the 'm2mega-before' rewards")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--show-wrong", action="store_true", help="list the rows each grader gets wrong")
    args = ap.parse_args()
    rows = load_corpus(args.corpus)
    graders = {"m2mega-before": _head_rewards(args.before_rev), "m2mega-now": _now_rewards(),
               "math-verify": _math_verify()}  # fmt: skip
    summary = summarize(run(graders, rows), rows)
    print_table(summary)
    if args.show_wrong:
        by_id = {r["id"]: r for r in rows}
        for name, g in summary["graders"].items():
            print(f"\n{name} wrong ({len(g['wrong'])}):")
            for i in g["wrong"]:
                r = by_id[i]
                print(f"  {i} {r['category']} exp={r['expected']} gt={r['answer'][:40]!r} resp={r['response'][-70:]!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
