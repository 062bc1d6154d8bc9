#!/usr/bin/env python3
"""Generate the demo's synthetic general + spatial reasoning dataset (see m2mega/data/synthetic.py).

    python tools/make_synthetic_data.py --out data/synth --sft 512 --rl 256 --eval 128 --seed 1234

Writes OUT/sft.jsonl (rows with the assistant turn), OUT/rl.jsonl and OUT/eval.jsonl (rows ending at the
user turn, with the answer), OUT/images/*.png (OUT/videos/*.mp4 for the video family ``order``) and
OUT/manifest.json; then preprocess, e.g.
``tools/preprocess_data.py --input OUT/sft.jsonl --order curriculum ...``.
"""

from __future__ import annotations

import argparse
import sys
import time

from m2mega.data.synthetic import ALL_FAMILIES, FAMILIES, write_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--sft", type=int, default=512, help="SFT rows (with reasoning)")
    p.add_argument("--rl", type=int, default=256, help="RL rows (prompt + answer)")
    p.add_argument("--eval", type=int, default=128, help="held-out evaluation rows")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=ALL_FAMILIES,
                   help="task families to include (rotated evenly); 'order' is the video family (not a default)")
    p.add_argument("--reasoning", choices=("full", "brief"), default="full",
                   help="SFT <think> content: the worked reasoning, or only its concluding sentence")
    p.add_argument("--teacher-accuracy", type=float, default=1.0,
                   help="share of SFT rows with the right answer; the rest get the family's plausible miss (a "
                        "weaker teacher's cold-start data, which leaves GRPO room to sharpen; the perception"
                        " families model a miss)")
    p.add_argument("--teacher-miss", choices=("both", "answer"), default="both",
                   help="what a teacher miss changes: 'both' the reasoning and the answer (misperception), "
                        "'answer' only the final answer after right reasoning (an inconsistent conclusion)")
    a = p.parse_args(argv)
    if not 0.0 <= a.teacher_accuracy <= 1.0:
        p.error(f"--teacher-accuracy must be in [0, 1], got {a.teacher_accuracy}")
    for name in ("sft", "rl", "eval"):
        if getattr(a, name) < 0:
            p.error(f"--{name} must be >= 0")
    t0 = time.perf_counter()
    manifest = write_dataset(a.out, n_sft=a.sft, n_rl=a.rl, n_eval=a.eval, seed=a.seed, families=a.families,
                             reasoning=a.reasoning, teacher_accuracy=a.teacher_accuracy,
                             teacher_miss=a.teacher_miss)
    n = sum(s["rows"] for s in manifest["splits"].values())
    dt = time.perf_counter() - t0
    for split, info in manifest["splits"].items():
        misses = f"  teacher misses {info['teacher_misses']}" if info.get("teacher_misses") else ""
        print(f"{split:5s} {info['rows']:6d} rows -> {a.out}/{info['file']}  {info['per_family']}{misses}")
    print(f"{n} samples in {dt:.2f}s ({n / max(dt, 1e-9):.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
