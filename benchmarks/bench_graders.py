"""Benchmark: verdict agreement and latency of answer graders on ``tests/data/grader_corpus.jsonl``.

    python benchmarks/bench_graders.py                    # ~3 min on 2 cores (3 timed passes)
    python benchmarks/bench_graders.py --json benchmarks/results/bench_graders_cpu.json --show-wrong
    python benchmarks/bench_graders.py --graders m2mega-now --passes 1   # ~15 s: this checkout only

The corpus holds (model response, ground truth, answer_type, expected verdict) rows: math-verify's own
test cases (its ``tests/``, verdicts re-checked by hand, a few corrected; see the ``note`` fields) and
m2mega's hard cases (numbers read as their first number, several option letters, tolerance, intervals,
named left-hand sides, several boxes, lists, sets, matrices, units, equations, hostile input).

Graders, each given the whole response and the ground truth:

* **m2mega-now**: ``m2mega.rewards.compute_reward(...).correct`` (this checkout), after
  ``sandbox.warm_up()`` as the GRPO trainer and ``m2mega.eval.bench`` call it;
* **m2mega-before**: the same function at git revision ``--before-rev`` (default HEAD), extracted with
  ``git archive`` and run in a child process whose ``PYTHONPATH`` puts it first, so that its grader
  worker is that revision's too: old verdicts and latencies are measured rather than remembered;
* **math-verify**: HF ``math_verify.parse`` + ``verify`` on the ``<answer>`` block (the whole response when
  there is none) and the ground truth, each wrapped in ``$...$`` when it has no math delimiter, default
  extraction (LaTeX + expression), as TRL/open-r1 call it; its own 1 s signal timeouts (main thread).

Each grader grades the corpus ``--passes`` times (m2mega with fresh worker processes each pass, so no
verdict is served from a cache). Printed: agreement with the expected verdicts per category and overall
(first pass), false positives of the kinds the reward rules exclude (``*first-number``, ``choice``), and
per-call latency p50/p95/p99/max over the rows that are not hostile, each the median over the passes
(with the range), plus the slowest hostile row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
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


# Runs in the child process of "m2mega-before": whatever m2mega its PYTHONPATH finds first.
_CHILD = """
import json, sys, time
from m2mega.rewards import RewardConfig, compute_reward
try:
    from m2mega.rewards.sandbox import warm_up
except ImportError:  # revisions before the grader worker
    warm_up = lambda: None
rows = json.load(open(sys.argv[1], encoding="utf-8"))
cfg = RewardConfig()
warm_up()
def grade(r):
    try:
        return bool(compute_reward(r["response"], r["answer"], "general", r["answer_type"], cfg).correct)
    except ValueError:  # an older reader refuses some ground truths (e.g. "1 000" as a number)
        return False
grade(rows[0])
verdicts, times = [], []
for r in rows:
    t0 = time.perf_counter()
    verdicts.append(grade(r))
    times.append(time.perf_counter() - t0)
print(json.dumps({"verdicts": verdicts, "times": times}))
"""


def _before_rewards(rev: str, rows: list[dict]) -> Callable[[], tuple[list[bool], list[float]]]:
    """One timed pass of ``compute_reward`` at git revision ``rev``, in a fresh child process."""
    tmp = Path(tempfile.mkdtemp(prefix="m2mega_before_"))
    archive = subprocess.run(["git", "archive", rev, "m2mega"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(tmp) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def one_pass() -> tuple[list[bool], list[float]]:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "rows.json")], cwd=tmp, env=env,
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        d = json.loads(out.strip().splitlines()[-1])
        return d["verdicts"], d["times"]

    return one_pass


def _timed(grade: Callable[[dict], bool], rows: list[dict]) -> tuple[list[bool], list[float]]:
    grade(rows[0])  # warm-up (imports, worker start-up)
    verdicts, times = [], []
    for r in rows:
        t0 = time.perf_counter()
        verdicts.append(grade(r))
        times.append(time.perf_counter() - t0)
    return verdicts, times


def _now_rewards(rows: list[dict]) -> Callable[[], tuple[list[bool], list[float]]]:
    from m2mega.rewards import RewardConfig, compute_reward
    from m2mega.rewards import sandbox

    cfg = RewardConfig()

    def grade(r: dict) -> bool:
        try:
            return bool(compute_reward(r["response"], r["answer"], "general", r["answer_type"], cfg).correct)
        except ValueError:
            return False

    def one_pass() -> tuple[list[bool], list[float]]:
        sandbox.shutdown()  # fresh workers: nothing cached from the previous pass
        sandbox.warm_up()  # start-up (~1 s) and deep warm-up (~3 s) paid once per process, not per call
        return _timed(grade, rows)

    return one_pass


def _math_verify(rows: list[dict]) -> Callable[[], tuple[list[bool], list[float]]]:
    def one_pass() -> tuple[list[bool], list[float]]:
        # Imported here, not at start-up: sympy's heap in this process would add its garbage-collector
        # pauses to the calls of the graders timed before this one.
        from math_verify import parse, verify

        from m2mega.rewards.extract import extract_tag_block

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)

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

        return _timed(grade, rows)

    return one_pass


def run(graders: dict[str, Callable[[], tuple[list[bool], list[float]]]], passes: int) -> dict:
    res: dict = {}
    for name, one_pass in graders.items():
        runs = [one_pass() for _ in range(passes)]
        res[name] = {"verdicts": runs[0][0], "times": [t for _, t in runs],
                     "stable": all(v == runs[0][0] for v, _ in runs)}
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
        hostile = [r["category"].endswith("hostile") for r in rows]
        per_pass = []
        for times in d["times"]:
            benign = [t for t, h in zip(times, hostile) if not h]
            per_pass.append({"p50": _pct(benign, 0.5), "p95": _pct(benign, 0.95), "p99": _pct(benign, 0.99),
                             "max": max(benign), "hostile_max": max((t for t, h in zip(times, hostile) if h),
                                                                    default=0.0)})  # fmt: skip
        out["graders"][name] = {
            "agreement": per,
            "listed_false_positives": fp,
            "verdicts_stable_across_passes": d["stable"],
            "latency_ms": {k: 1e3 * statistics.median(p[k] for p in per_pass) for k in per_pass[0]},
            "latency_ms_range": {k: [1e3 * min(p[k] for p in per_pass), 1e3 * max(p[k] for p in per_pass)]
                                 for k in per_pass[0]},  # fmt: skip
            "passes": len(per_pass),
            "slowest_ms": [sorted(((round(1e3 * t, 1), r["id"]) for t, r in zip(times, rows)), reverse=True)[:8]
                           for times in d["times"]],  # fmt: skip
            "wrong": [rows[i]["id"] for i, k in enumerate(ok) if not k],
        }
    out["groups"] = {g: len(idx) for g, idx in groups.items()}
    return out


def print_table(summary: dict) -> None:
    names = list(summary["graders"])
    groups = sorted(summary["groups"], key=lambda g: (g == "ALL", g.startswith("type="), g))
    print("| category | n | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for g in groups:
        cells = [f"{100 * summary['graders'][n]['agreement'][g]:.1f}%" for n in names]
        print(f"| {g} | {summary['groups'][g]} | " + " | ".join(cells) + " |")
    print("| listed false positives | | " + " | ".join(str(len(summary["graders"][n]["listed_false_positives"]))
                                                  for n in names) + " |")  # fmt: skip
    passes = summary["graders"][names[0]]["passes"]
    for key in ("p50", "p95", "p99", "max", "hostile_max"):
        cells = []
        for n in names:
            g = summary["graders"][n]
            lo, hi = g["latency_ms_range"][key]
            cells.append(f"{g['latency_ms'][key]:.1f}" + (f" ({lo:.1f}-{hi:.1f})" if passes > 1 else ""))
        print(f"| latency {key} (ms{', median of %d passes (range)' % passes if passes > 1 else ''}) | | "
              + " | ".join(cells) + " |")
    print("| verdicts the same in every pass | | " + " | ".join(
        str(summary["graders"][n]["verdicts_stable_across_passes"]) for n in names) + " |")
    for n in names:
        print(f"slowest rows of {n} (ms, first pass): "
              + ", ".join(f"{i} {t:.0f}" for t, i in summary["graders"][n]["slowest_ms"][0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--before-rev", default="HEAD", help="git revision of the 'm2mega-before' rewards")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--show-wrong", action="store_true", help="list the rows each grader gets wrong")
    ap.add_argument("--passes", type=int, default=3, help="timed passes per grader (latency: median of passes)")
    ap.add_argument("--graders", nargs="+", default=["m2mega-before", "m2mega-now", "math-verify"],
                    help="which graders to run (default: all three)")
    args = ap.parse_args()
    if args.passes < 1:
        raise SystemExit(f"error: --passes must be >= 1, got {args.passes}")
    rows = load_corpus(args.corpus)
    makers = {"m2mega-before": lambda: _before_rewards(args.before_rev, rows), "m2mega-now": lambda: _now_rewards(rows),
              "math-verify": lambda: _math_verify(rows)}  # fmt: skip
    unknown = sorted(set(args.graders) - set(makers))
    if unknown:
        raise SystemExit(f"error: unknown --graders {unknown}; choose from {sorted(makers)}")
    graders = {name: make() for name, make in makers.items() if name in args.graders}
    summary = summarize(run(graders, args.passes), rows)
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
