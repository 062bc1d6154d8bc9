"""The synthetic demo dataset: valid rows, answers that the *pixels* support, reasoning that derives them,
difficulty that tracks the generating parameters, a held-out split that stays held out, determinism."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from m2mega.data.synthetic import COLORS, FAMILIES, generate, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40  # samples per family checked against their pixels


def _mask(img: np.ndarray, color) -> np.ndarray:
    return np.all(img == np.asarray(color, dtype=np.uint8), axis=-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components as arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        q, pts = deque([(y, x)]), []
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            pts.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        out.append(np.asarray(pts))
    return out


def _kind(pts: np.ndarray) -> str:
    """circle / square / triangle from how much of its bounding box a shape fills."""
    h = pts[:, 0].max() - pts[:, 0].min() + 1
    w = pts[:, 1].max() - pts[:, 1].min() + 1
    fill = len(pts) / (h * w)
    return "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"


def test_count_answers_match_the_pixels():
    for i in range(N):
        s = generate("count", 7, "sft", i)
        img = np.asarray(s.render())
        comps = _components(_mask(img, COLORS[s.params["color"]]))
        n = sum(_kind(c) == s.params["kind"] for c in comps)
        assert str(n) == s.answer, f"sample {i}: image shows {n} {s.params['color']} {s.params['kind']}s, answer {s.answer}"
        assert s.reasoning.count(" at (") == n and s.reasoning.endswith(f"That makes {n} {s.params['color']} "
                                                                         f"{s.params['kind']}{'s' if n != 1 else ''}.")


def test_measure_answers_match_the_pixels():
    for i in range(N):
        s = generate("measure", 7, "sft", i)
        img = np.asarray(s.render())
        cols = np.nonzero(_mask(img, COLORS["green"]).any(axis=0))[0]
        bar_px = cols.max() - cols.min()
        assert bar_px == s.params["bar_px"]
        if s.params["variant"] == "distance":
            (ry, rx), (by, bx) = (np.argwhere(_mask(img, COLORS[c])).mean(axis=0) for c in ("red", "blue"))
            px = math.hypot(rx - bx, ry - by)
        else:
            xs = np.nonzero(_mask(img, COLORS["orange"]).any(axis=0))[0]
            px = xs.max() - xs.min()
        want = px * s.params["value"] / bar_px
        assert abs(float(s.answer) - want) <= 0.05 + 1e-9, f"sample {i}: pixels give {want:.3f}, answer {s.answer}"
        assert f"about {s.answer} {s.params['unit']}" in s.reasoning


def test_compare_answers_match_the_pixels():
    for i in range(N):
        s = generate("compare", 7, "sft", i)
        img = np.asarray(s.render())
        half = img.shape[1] // 2
        colored = ~np.all(img == img[..., :1], axis=-1)  # not white/black/grey: the two shapes only
        left, right = colored[:, :half].sum(), colored[:, half:].sum()
        assert ("A" if left > right else "B") == s.answer, f"sample {i}: pixel areas {left} vs {right}"
        assert s.reasoning.endswith(f"so shape {s.answer} has the larger area.")


def test_arith_reasoning_derives_the_answer():
    for i in range(N):
        s = generate("arith", 7, "sft", i)
        op, nums = s.params["op"], s.params["nums"]
        want = {"sum": lambda: sum(nums), "difference": lambda: nums[0] - nums[1],
                "product": lambda: nums[0] * nums[1], "quotient": lambda: Fraction(nums[0], nums[1])}[op]()
        if op == "quotient":
            assert s.answer_type == "math" and Fraction(s.answer) == want and want.denominator > 1
        else:
            assert s.answer_type == "number" and int(s.answer) == want
        assert s.reasoning.startswith(f"The image shows the numbers {', '.join(map(str, nums))}.")
        # The numbers are drawn: every box holds dark text pixels.
        img = np.asarray(s.render().convert("L"))
        assert (img < 128).sum() > 40 * len(nums)


def test_difficulty_tracks_the_generating_parameters():
    count = [generate("count", 3, "rl", i) for i in range(200)]
    few = [s.difficulty for s in count if len(s.params["shapes"]) <= 3]
    many = [s.difficulty for s in count if len(s.params["shapes"]) >= 8]
    assert few and many and np.mean(many) > np.mean(few) + 0.3
    comp = [generate("compare", 3, "rl", i) for i in range(200)]

    def ratio(s):
        from m2mega.data.synthetic_shapes import shape_area as _area

        a, b = (_area(k, x) for k, x in zip(s.params["kinds"], s.params["sides"]))
        return max(a, b) / min(a, b)

    close = [s.difficulty for s in comp if ratio(s) < 1.5]
    far = [s.difficulty for s in comp if ratio(s) > 3]
    assert close and far and np.mean(close) > np.mean(far) + 0.3
    for s in count + comp:
        assert 0.0 <= s.difficulty <= 1.0


def _digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_dataset_rows_valid_held_out_and_deterministic(tmp_path):
    from m2mega.data.schema import parse_row

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    man = write_dataset(str(a), n_sft=24, n_rl=16, n_eval=12, seed=5)
    write_dataset(str(b), n_sft=24, n_rl=16, n_eval=12, seed=5)
    write_dataset(str(c), n_sft=24, n_rl=16, n_eval=12, seed=6)
    assert _digest(str(a)) == _digest(str(b)), "same seed must give byte-identical output"
    assert _digest(str(a)) != _digest(str(c))
    assert man["splits"]["sft"]["per_family"] == {f: 6 for f in FAMILIES}
    images = {}
    for split, n in (("sft", 24), ("rl", 16), ("eval", 12)):
        lines = (a / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            row = parse_row(line, str(a))  # the preprocessor's own validation
            raw = json.loads(line)
            assert row.is_rl == (split != "sft") and raw["task"] in ("general", "spatial")
            assert row.answer_type in ("choice", "number", "math")
            img = Image.open(row.image_paths[0])
            assert img.size[0] == img.size[1] and img.size[0] in (56, 84, 112)  # multiples of 28
            images.setdefault(split, set()).add(hashlib.sha256(img.tobytes()).hexdigest())
            if split == "sft":
                text = row.messages[-1]["content"]
                assert text.startswith("<think>") and text.endswith(f"</think><answer>{row.answer}</answer>")
    assert not images["eval"] & (images["sft"] | images["rl"]), "an eval image reappears in training data"


def test_sft_targets_earn_full_reward():
    """The reward module reads every answer we write as correct and well formatted."""
    pytest.importorskip("m2mega.rewards")
    from m2mega.rewards import compute_reward

    from m2mega.data.synthetic import PERCEPTION_FAMILIES

    for fam in FAMILIES + PERCEPTION_FAMILIES:
        for i in range(10):
            s = generate(fam, 11, "sft", i)
            r = compute_reward(f"<think>{s.reasoning}</think><answer>{s.answer}</answer>", answer=s.answer,
                               task=s.task, answer_type=s.answer_type)
            assert r.correct and r.format == 1.0, (fam, i, s.answer, r)


def test_cli_writes_the_splits(tmp_path):
    out = tmp_path / "synth"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--out", str(out),
                        "--sft", "8", "--rl", "4", "--eval", "4", "--families", "count", "arith"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "16 samples" in p.stdout
    rows = [json.loads(l) for l in (out / "sft.jsonl").read_text().splitlines()]
    assert {r["family"] for r in rows} == {"count", "arith"} and len(rows) == 8
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--out",
                          str(out), "--sft", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--sft must be >= 0" in bad.stderr


def test_brief_reasoning_keeps_the_conclusion(tmp_path):
    import json

    from m2mega.data.synthetic import brief_reasoning, write_dataset

    assert brief_reasoning("Scale is 20/24 = 0.8333 km. The bar is 59 px. 59 px x 0.8333 = 49.17 km, about 49.2 km.") \
        == "59 px x 0.8333 = 49.17 km, about 49.2 km."
    write_dataset(str(tmp_path), n_sft=8, n_rl=0, n_eval=0, seed=3, reasoning="brief")
    full = tmp_path / "full"
    write_dataset(str(full), n_sft=8, n_rl=0, n_eval=0, seed=3)
    for b, f in zip(open(tmp_path / "sft.jsonl"), open(full / "sft.jsonl")):
        b, f = json.loads(b), json.loads(f)
        tb, tf = b["messages"][-1]["content"], f["messages"][-1]["content"]
        assert tb.endswith(f"<answer>{b['answer']}</answer>") and len(tb) < len(tf)
        assert tb.split("</think>")[0].removeprefix("<think>") in tf
    with pytest.raises(ValueError, match="reasoning must be"):
        write_dataset(str(tmp_path / "x"), n_sft=1, n_rl=0, n_eval=0, reasoning="long")


def test_perception_answers_match_the_pixels():
    """hue / corners / larger / quadrant / width / length: the answer is what the pixels show; the miss is the
    neighbouring class."""
    from m2mega.data.synthetic import PERCEPTION_FAMILIES
    from m2mega.data.synthetic_perception import CORNERS, CYCLE, HUES

    assert set(PERCEPTION_FAMILIES) == {"hue", "corners", "larger", "quadrant", "width", "length"}
    for i in range(N):
        s = generate("hue", 7, "sft", i)
        img = np.asarray(s.render())
        shown = [c for c, rgb in HUES.items() if _mask(img, rgb).sum() > 50]
        assert shown == [s.answer], (i, shown, s.answer)
        assert s.miss[0] == CYCLE[(CYCLE.index(s.answer) + 1) % len(CYCLE)] != s.answer

        s = generate("corners", 7, "sft", i)
        (comp,) = _components(_mask(np.asarray(s.render()), HUES[s.params["color"]]))
        assert str(CORNERS[_kind(comp)]) == s.answer and s.miss[0] != s.answer, i

        s = generate("larger", 7, "sft", i)
        img = np.asarray(s.render())
        colored = ~np.all(img == img[..., :1], axis=-1)
        left, right = colored[:, :28].sum(), colored[:, 28:].sum()
        assert ("A" if left > right else "B") == s.answer and s.miss[0] == ("B" if s.answer == "A" else "A"), i

        s = generate("quadrant", 7, "sft", i)
        ys, xs = np.nonzero(~np.all(np.asarray(s.render()) == 255, axis=-1))
        q = "ABCD"[int(ys.mean() >= 28) * 2 + int(xs.mean() >= 28)]
        assert q == s.answer and s.miss[0] == "ABCD"[("ABCD".index(q) + 1) % 4], i

        s = generate("width", 7, "sft", i)
        xs = np.nonzero(_mask(np.asarray(s.render()), COLORS["orange"]).any(axis=0))[0]
        assert round((xs.max() - xs.min() + 1) / 5.6) == int(s.answer) and s.miss[0] == str(int(s.answer) + 1), i

        s = generate("length", 7, "sft", i)
        xs = np.nonzero(_mask(np.asarray(s.render()), COLORS["orange"]).any(axis=0))[0]
        assert (xs.max() - xs.min() + 1) / 14 == int(s.answer) and s.miss[0] == str(int(s.answer) % 4 + 1), i


def test_teacher_accuracy_puts_the_miss_in_sft_rows_only(tmp_path):
    """A weaker teacher: about 1 - p of the SFT rows carry the family's miss (answer and reasoning), the row's
    ``answer`` stays the truth, the manifest counts the misses, and the RL / eval splits are untouched."""
    from m2mega.data.synthetic import PERCEPTION_FAMILIES
    from m2mega.rewards import compute_reward

    m = write_dataset(str(tmp_path / "t"), n_sft=400, n_rl=8, n_eval=8, seed=5, families=PERCEPTION_FAMILIES,
                      reasoning="brief", teacher_accuracy=0.5)
    clean = write_dataset(str(tmp_path / "c"), n_sft=400, n_rl=8, n_eval=8, seed=5, families=PERCEPTION_FAMILIES,
                          reasoning="brief")
    rows = [json.loads(l) for l in open(tmp_path / "t/sft.jsonl")]
    wrong = [r for r in rows if not compute_reward(r["messages"][-1]["content"], answer=r["answer"], task=r["task"],
                                                   answer_type=r["answer_type"]).correct]
    assert 150 <= len(wrong) <= 250 and sum(m["splits"]["sft"]["teacher_misses"].values()) == len(wrong)
    assert {r["family"] for r in wrong} == set(PERCEPTION_FAMILIES)
    for r, c in zip(rows, open(tmp_path / "c/sft.jsonl")):
        assert r["answer"] == json.loads(c)["answer"]  # same samples, the truth kept
    for split in ("rl", "eval"):
        assert (tmp_path / f"t/{split}.jsonl").read_text() == (tmp_path / f"c/{split}.jsonl").read_text()
    assert clean["splits"]["sft"]["teacher_misses"] == {}
    with pytest.raises(ValueError, match="teacher_accuracy must be in"):
        write_dataset(str(tmp_path / "x"), n_sft=1, n_rl=0, n_eval=0, teacher_accuracy=1.5)


def test_teacher_miss_answer_keeps_the_right_reasoning(tmp_path):
    """``teacher_miss="answer"``: a missed row keeps its own (right) reasoning and ends in the miss's answer,
    the same rows miss as with ``"both"``, and the make_synthetic_data flag reaches it."""
    from m2mega.data.synthetic import brief_reasoning

    kw = dict(n_sft=200, n_rl=4, n_eval=4, seed=9, families=("hue", "corners"), reasoning="brief",
              teacher_accuracy=0.5)
    write_dataset(str(tmp_path / "both"), **kw)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/make_synthetic_data.py"), "--out", str(tmp_path / "ans"),
                    "--sft", "200", "--rl", "4", "--eval", "4", "--seed", "9", "--families", "hue", "corners",
                    "--reasoning", "brief", "--teacher-accuracy", "0.5", "--teacher-miss", "answer"], check=True,
                   capture_output=True)
    split = lambda c: (c.split("<think>")[1].split("</think>")[0], c.split("<answer>")[1].split("</answer>")[0])
    n_missed = 0
    for lb, la in zip(open(tmp_path / "both/sft.jsonl"), open(tmp_path / "ans/sft.jsonl")):
        b, a = json.loads(lb), json.loads(la)
        (tb, ab), (ta, aa) = split(b["messages"][-1]["content"]), split(a["messages"][-1]["content"])
        assert aa == ab  # the same rows miss, with the same answer
        assert ta == brief_reasoning(generate(b["family"], 9, "sft", int(b["id"][-6:])).reasoning)
        if ab != b["answer"]:
            n_missed += 1
            assert a["answer"] in ta and tb != ta  # right reasoning kept; "both" rewrote it
    assert 60 <= n_missed <= 140
    assert json.load(open(tmp_path / "ans/manifest.json"))["teacher_miss"] == "answer"
    with pytest.raises(ValueError, match="teacher_miss must be"):
        write_dataset(str(tmp_path / "x"), n_sft=1, n_rl=0, n_eval=0, teacher_miss="reasoning")
