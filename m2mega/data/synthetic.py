"""The demo's synthetic general + spatial reasoning data: rendered images with verifiable answers.

Four task families, each drawn from a few generating parameters that also write the reasoning:

=========  =========  ===========  ==========================================================================
family     task       answer_type  question
=========  =========  ===========  ==========================================================================
count      general    number       how many <colour> <shape>s are there (distractors differ in colour/shape)
measure    spatial    number       distance between two dots, or width of a bar, read against a scale bar
                                   (a metric estimate: the RL reward is EDNM)
compare    spatial    choice       which of two shapes (A left, B right) has the larger area
arith      general    number/math  sum, difference, product or quotient (a fraction) of numbers drawn in boxes
order      spatial    choice       (video) in which order do the shapes appear; 2-4 shapes, one per 2-frame
                                   step, in a 2 fps H.264 clip (opt in: not in the default ``FAMILIES``)
=========  =========  ===========  ==========================================================================

The six one-feature families of ``PERCEPTION_FAMILIES`` (hue, corners, larger, quadrant, width, length; each with a
modelled teacher's miss) live in ``synthetic_perception``; the shapes, palette and ``Sample`` record in
``synthetic_shapes``.

Difficulty in [0, 1] comes from the parameters (more shapes and look-alike distractors; diagonal distances
far beyond the scale bar; areas closer together; more and larger operands, fractions). The assistant turn
(``<think>…</think><answer>…</answer>``) derives the answer from the parameters the image was drawn
from: positions, pixel lengths, areas, the numbers. Images are 56..112 px squares (multiples of 28, so
Qwen2.5-VL's resize leaves them as drawn). Shapes are drawn without anti-aliasing in pure colours, so the
answer can be re-derived from the pixels (``tests/test_synthetic.py`` does).

Everything is deterministic given the seed: sample ``i`` of split ``s`` draws from
``random.Random(f"{seed}:{s}:{i}:{attempt}")``; the eval split is generated first and training samples
whose question and parameters repeat an eval sample are redrawn, so the held-out split stays held out.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from fractions import Fraction
from typing import Sequence

import numpy as np

from .synthetic_perception import PERCEPTION_GENERATORS
from .synthetic_shapes import BLACK, COLORS, KINDS, Sample, draw_shape, fmt_number, font, pixel_area, shape_area

__all__ = ["FAMILIES", "PERCEPTION_FAMILIES", "VIDEO_FAMILIES", "ALL_FAMILIES", "SPLITS", "Sample", "generate", "to_row",
           "write_dataset", "COLORS"]

FAMILIES = ("count", "measure", "compare", "arith")  # the default (image) families
PERCEPTION_FAMILIES = ("hue", "corners", "larger", "quadrant", "width", "length")  # one visual feature each
VIDEO_FAMILIES = ("order",)
ALL_FAMILIES = FAMILIES + PERCEPTION_FAMILIES + VIDEO_FAMILIES
VIDEO_FPS = 2.0  # the clips' frame rate, which is also the sampling rate: every frame is used
SPLITS = ("sft", "rl", "eval")
CELL = 14  # count: one shape per 14 px cell, so shapes never touch
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------------------- families


def _count(rng: random.Random) -> Sample:
    size = rng.choice((56, 84, 112))
    grid = size // CELL
    color = rng.choice(sorted(COLORS))
    kind = rng.choice(KINDS)
    n_target = rng.randint(1, min(6, grid * grid // 3))
    n_distract = rng.randint(0, min(6, grid * grid - n_target))
    cells = rng.sample(range(grid * grid), n_target + n_distract)
    shapes = []
    lookalike = 0
    for j, c in enumerate(cells):
        if j < n_target:
            sc, sk = color, kind
        else:  # a distractor shares the colour or the shape, never both
            if rng.random() < 0.5:
                sc, sk = color, rng.choice([k for k in KINDS if k != kind])
            else:
                sc, sk = rng.choice([k for k in COLORS if k != color]), kind
            lookalike += 1
        s = rng.randint(8, CELL - 2)
        cx, cy = (c % grid) * CELL, (c // grid) * CELL
        ox, oy = rng.randint(1, CELL - 1 - s), rng.randint(1, CELL - 1 - s)
        shapes.append((sk, sc, (cx + ox, cy + oy, cx + ox + s - 1, cy + oy + s - 1)))
    targets = [s for s in shapes if s[0] == kind and s[1] == color]
    where = [f"({(b[0] + b[2]) // 2}, {(b[1] + b[3]) // 2})" for _, _, b in targets]
    others: dict[str, int] = {}
    for k, c, _ in shapes:
        if not (k == kind and c == color):
            others[f"{c} {k}"] = others.get(f"{c} {k}", 0) + 1
    steps = f"I look for {color} {kind}s. I find one at " + ", one at ".join(where) + "."
    if others:
        listed = [f"{n} {name}{'s' if n > 1 else ''}" for name, n in sorted(others.items())]
        steps += f" The other shapes ({', '.join(listed)}) do not count."
    n = len(targets)
    steps += f" That makes {n} {color} {kind}{'s' if n != 1 else ''}."
    difficulty = min(1.0, 0.55 * (len(shapes) - 1) / 11 + 0.45 * lookalike / 6)

    def draw(d):
        for sk, sc, box in shapes:
            draw_shape(d, sk, box, COLORS[sc])

    return Sample("count", "general", "number", f"How many {color} {kind}s are in the image?", str(n), steps,
                  difficulty, size, {"shapes": shapes, "color": color, "kind": kind}, draw)


def _measure(rng: random.Random) -> Sample:
    size = rng.choice((84, 112))
    unit, unit_word = rng.choice((("m", "metres"), ("cm", "centimetres"), ("km", "kilometres")))
    value = rng.choice((1, 2, 5, 10, 20, 50))
    bar_px = rng.randrange(14, size // 2, 2)
    bar_y = size - 8
    bar = (4, bar_y, 4 + bar_px, bar_y)  # green scale bar along the bottom, label above it
    top = size - 24  # everything else stays above the bar's label
    if rng.random() < 0.5:
        variant = "distance"
        while True:
            p = (rng.randint(4, size - 5), rng.randint(4, top))
            q = (rng.randint(4, size - 5), rng.randint(4, top))
            if rng.random() < 0.3:  # some axis-aligned pairs: the easy case
                q = (q[0], p[1])
            if math.dist(p, q) >= 10:
                break
        dx, dy = abs(q[0] - p[0]), abs(q[1] - p[1])
        px = math.hypot(dx, dy)
        question = (f"The green scale bar at the bottom is {value} {unit} long. How far apart are the centres "
                    f"of the red dot and the blue dot, in {unit_word}?")
        where = (f"The red dot is at ({p[0]}, {p[1]}) and the blue dot at ({q[0]}, {q[1]}): dx = {dx} px, "
                 f"dy = {dy} px, so they are sqrt({dx}^2 + {dy}^2) = {px:.1f} px apart.")
        diag = 1.0 if dx and dy else 0.0
        params = {"variant": variant, "p": p, "q": q}
    else:
        variant = "size"
        w = rng.randint(6, size - 12)
        x0, y0 = rng.randint(4, size - 5 - w), rng.randint(4, top - 6)
        rect = (x0, y0, x0 + w, y0 + 5)
        px, diag = float(w), 0.0
        question = (f"The green scale bar at the bottom is {value} {unit} long. How long is the orange bar, in "
                    f"{unit_word}?")
        where = f"The orange bar runs from x = {x0} to x = {x0 + w}, so it is {w} px long."
        params = {"variant": variant, "rect": rect}
    per_px = value / bar_px
    answer = px * per_px
    steps = (f"The scale bar is {bar_px} px long and stands for {value} {unit}, so 1 px is {value}/{bar_px} = "
             f"{per_px:.4g} {unit}. {where} {px:.1f} px x {per_px:.4g} {unit}/px = {answer:.2f} {unit}, "
             f"about {fmt_number(answer)} {unit}.")
    ratio = px / bar_px  # reading far beyond the bar (or a small fraction of it) is harder
    difficulty = min(1.0, 0.35 * diag + 0.45 * min(1.0, abs(math.log(ratio)) / math.log(6)) + 0.2 * (bar_px % 10 != 0))
    params.update(value=value, unit=unit, bar_px=bar_px)

    def draw(d):
        d.line(bar[:2] + bar[2:], fill=COLORS["green"], width=3)
        d.text((4, bar_y - 14), f"{value} {unit}", fill=BLACK, font=font(10))
        if variant == "distance":
            for (x, y), c in ((p, "red"), (q, "blue")):
                d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLORS[c])
        else:
            d.rectangle(rect, fill=COLORS["orange"])

    return Sample("measure", "spatial", "number", question, fmt_number(answer), steps, difficulty, size, params, draw)


def _compare(rng: random.Random) -> Sample:
    size = rng.choice((56, 84, 112))
    half = size // 2
    smax = half - 6
    while True:
        ka, kb = rng.choice(KINDS), rng.choice(KINDS)
        sa, sb = rng.randint(8, smax), rng.randint(8, smax)
        aa, ab = shape_area(ka, sa), shape_area(kb, sb)
        pa, pb = pixel_area(ka, sa), pixel_area(kb, sb)
        # At least 15% apart, and the drawn pixels must agree with the geometry by a clear margin
        # (small triangles rasterise noticeably larger than s^2 / 2).
        if max(aa, ab) / min(aa, ab) >= 1.15 and (pa > pb) == (aa > ab) and max(pa, pb) / min(pa, pb) >= 1.1:
            break
    ca, cb = rng.sample(sorted(COLORS), 2)
    boxes = []
    for s, x_off in ((sa, 0), (sb, half)):
        x = x_off + rng.randint(2, half - s - 2)
        y = rng.randint(14, size - s - 2)
        boxes.append((x, y, x + s - 1, y + s - 1))
    ans = "A" if aa > ab else "B"
    desc = {"circle": "a circle of diameter {s} px: area = pi x {r}^2 = {a:.0f} px^2",
            "square": "a square of side {s} px: area = {s}^2 = {a:.0f} px^2",
            "triangle": "a triangle of base and height {s} px: area = {s} x {s} / 2 = {a:.0f} px^2"}
    da = desc[ka].format(s=sa, r=f"{sa / 2:g}", a=aa)
    db = desc[kb].format(s=sb, r=f"{sb / 2:g}", a=ab)
    big, small = (aa, ab) if aa > ab else (ab, aa)
    steps = (f"Shape A (left) is {da}. Shape B (right) is {db}. {big:.0f} > {small:.0f}, so shape {ans} has the "
             f"larger area.")
    ratio = big / small
    difficulty = min(1.0, 0.75 * max(0.0, 1 - (ratio - 1.15) / 2.0) + 0.25 * (ka != kb))
    question = ("Which shape has the larger area?\nA. shape A (left)\nB. shape B (right)\n"
                "Answer with the option's letter.")

    def draw(d):
        d.text((half // 2 - 3, 1), "A", fill=BLACK, font=font(10))
        d.text((half + half // 2 - 3, 1), "B", fill=BLACK, font=font(10))
        draw_shape(d, ka, boxes[0], COLORS[ca])
        draw_shape(d, kb, boxes[1], COLORS[cb])

    return Sample("compare", "spatial", "choice", question, ans, steps, difficulty, size,
                  {"kinds": [ka, kb], "sides": [sa, sb], "boxes": boxes}, draw)


def _arith(rng: random.Random) -> Sample:
    op = rng.choices(("sum", "difference", "product", "quotient"), weights=(3, 3, 2, 2))[0]
    k = rng.randint(2, 3) if op == "sum" else 2
    hi = rng.choice((9, 20, 99))
    nums = [rng.randint(1, hi) for _ in range(k)]
    if op == "quotient":
        while Fraction(nums[0], nums[1]).denominator == 1:  # a real fraction, not an integer
            nums = [rng.randint(1, hi), rng.randint(2, hi)]
    size = 56 if k == 2 and hi <= 20 else 84
    shown = ", ".join(map(str, nums))
    if op == "sum":
        total, parts = nums[0], []
        for x in nums[1:]:
            parts.append(f"{total} + {x} = {total + x}")
            total += x
        answer, atype, how = str(total), "number", "; ".join(parts)
        q = "What is the sum of the numbers in the image?"
    elif op == "difference":
        answer, atype = str(nums[0] - nums[1]), "number"
        how = f"{nums[0]} - {nums[1]} = {answer}"
        q = "What is the left number minus the right number?"
    elif op == "product":
        answer, atype = str(nums[0] * nums[1]), "number"
        how = f"{nums[0]} x {nums[1]} = {answer}"
        q = "What is the product of the two numbers in the image?"
    else:
        f = Fraction(nums[0], nums[1])
        g = math.gcd(nums[0], nums[1])
        answer, atype = f"{f.numerator}/{f.denominator}", "math"
        how = f"{nums[0]}/{nums[1]}" + (f" = {answer} (dividing both by {g})" if g > 1 else " is already in lowest terms")
        q = "Divide the left number by the right number. Give the result as a fraction in lowest terms."
    steps = f"The image shows the numbers {shown}. {how}. The answer is {answer}."
    difficulty = min(1.0, {"sum": 0.05, "difference": 0.2, "product": 0.4, "quotient": 0.55}[op]
                     + 0.15 * (k - 2) + {9: 0.0, 20: 0.15, 99: 0.3}[hi])
    label_font = font(12)

    def draw(d):
        w = size // k
        for j, x in enumerate(nums):
            x0 = j * w + 3
            d.rectangle((x0, size // 2 - 12, x0 + w - 6, size // 2 + 12), outline=BLACK, width=1)
            d.text((x0 + 4, size // 2 - 8), str(x), fill=BLACK, font=label_font)

    return Sample("arith", "general", atype, q, answer, steps, difficulty, size, {"op": op, "nums": nums}, draw)


def _order(rng: random.Random) -> Sample:
    size = 56
    n = rng.randint(2, 4)
    kinds = [(c, rng.choice(KINDS)) for c in rng.sample(sorted(COLORS), n)]  # one colour per shape
    steps = n + rng.randint(0, 2)  # one step = 2 frames = one temporal patch of the vision tower
    appear = sorted(rng.sample(range(steps), n))
    cells = rng.sample(range(4), n)  # one shape per 28 px quadrant: shapes never overlap
    boxes = []
    for c in cells:
        s = rng.randint(14, 22)
        x, y = (c % 2) * 28 + rng.randint(2, 26 - s), (c // 2) * 28 + rng.randint(2, 26 - s)
        boxes.append((x, y, x + s - 1, y + s - 1))
    names = [f"{c} {k}" for c, k in kinds]
    perms = list(itertools.permutations(range(n)))
    rng.shuffle(perms)
    options = [list(range(n))] + [list(p) for p in perms if list(p) != list(range(n))][:3]
    rng.shuffle(options)
    letter = "ABCD"[options.index(list(range(n)))]
    lines = [f"{'ABCD'[j]}. " + ", ".join(names[i] for i in opt) for j, opt in enumerate(options)]
    question = ("The video shows shapes appearing one after another. In which order do they appear?\n"
                + "\n".join(lines) + "\nAnswer with the option's letter.")
    sec = 2 / VIDEO_FPS
    seen = "; ".join(f"at {t * sec:.1f} s the {name} appears" for t, name in zip(appear, names))
    steps_text = f"{seen[0].upper()}{seen[1:]}. So the order is {', '.join(names)}: option {letter}."
    gaps = min((b - a for a, b in zip(appear, appear[1:])), default=1)
    difficulty = min(1.0, 0.35 * (n - 2) + 0.3 * (gaps == 1) + 0.05 * (steps - n))

    def draw_frame(d, k):
        for (color, kind), box, t in zip(kinds, boxes, appear):
            if k // 2 >= t:
                draw_shape(d, kind, box, COLORS[color])

    return Sample("order", "spatial", "choice", question, letter, steps_text, difficulty, size,
                  {"shapes": names, "appear": appear, "boxes": boxes, "steps": steps}, None, 2 * steps, draw_frame)




_GENERATORS = {"count": _count, "measure": _measure, "compare": _compare, "arith": _arith, "order": _order,
               **PERCEPTION_GENERATORS}


# ----------------------------------------------------------------------------------------- rows


def generate(family: str, seed: int, split: str, index: int, attempt: int = 0) -> Sample:
    """One sample; the same arguments always give the same sample."""
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    s = _GENERATORS[family](random.Random(f"{seed}:{split}:{index}:{attempt}"))
    s.difficulty = round(float(s.difficulty), 3)
    return s


def brief_reasoning(reasoning: str) -> str:
    """The conclusion alone: the last sentence of the worked reasoning (it states the answer's derivation's
    final step). Tiny CPU models learn the format and finish their answers far sooner with it."""
    return reasoning.rsplit(". ", 1)[-1].strip()


def to_row(sample: Sample, sample_id: str, image_path: str, with_assistant: bool, reasoning: str = "full") -> dict:
    """The JSONL row (schema of ``m2mega.data.schema``); SFT rows end with the assistant turn, whose
    ``<think>`` holds the worked reasoning (``reasoning="full"``) or its conclusion only (``"brief"``).
    ``image_path`` is the clip's path for a video family (frames kept at their drawn size)."""
    if reasoning not in ("full", "brief"):
        raise ValueError(f"reasoning must be 'full' or 'brief', got {reasoning!r}")
    think = sample.reasoning if reasoning == "full" else brief_reasoning(sample.reasoning)
    px = sample.size * sample.size
    visual = ({"type": "video", "video": image_path, "min_pixels": px, "max_pixels": px} if sample.frames
              else {"type": "image", "image": image_path})
    messages = [{"role": "user", "content": [visual, {"type": "text", "text": sample.question}]}]
    if with_assistant:
        messages.append({"role": "assistant",
                         "content": f"<think>{think}</think><answer>{sample.answer}</answer>"})
    return {"id": sample_id, "messages": messages, "answer": sample.answer, "task": sample.task,
            "answer_type": sample.answer_type, "difficulty": sample.difficulty, "family": sample.family}


def write_dataset(out_dir: str, *, n_sft: int, n_rl: int, n_eval: int, seed: int = 1234,
                  families: Sequence[str] = FAMILIES, reasoning: str = "full", teacher_accuracy: float = 1.0,
                  teacher_miss: str = "both") -> dict:
    """Write ``sft.jsonl``, ``rl.jsonl``, ``eval.jsonl``, ``images/`` (``videos/`` for video families) and
    ``manifest.json`` under ``out_dir``.

    Families rotate by sample index, so every split holds them in equal shares. ``teacher_accuracy`` < 1
    models cold-start data distilled from a weaker teacher: each SFT row of a family with a modelled miss
    (``Sample.miss``) gets the miss's answer and reasoning with probability ``1 - teacher_accuracy`` (the
    row's ``answer`` field stays the truth; the manifest counts the misses per family). ``teacher_miss``:
    ``"both"`` -- the miss's reasoning and answer (a teacher that misperceives); ``"answer"`` -- the row's own
    (right) reasoning followed by the miss's answer (a teacher whose conclusion does not follow from its
    reasoning: the cold-start policy perceives right and answers inconsistently). Returns the manifest.
    """
    if teacher_miss not in ("both", "answer"):
        raise ValueError(f"teacher_miss must be 'both' or 'answer', got {teacher_miss!r}")
    if not 0.0 <= teacher_accuracy <= 1.0:
        raise ValueError(f"teacher_accuracy must be in [0, 1], got {teacher_accuracy}")
    unknown = [f for f in families if f not in _GENERATORS]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; expected a non-empty subset of {ALL_FAMILIES}")
    for name, n in (("n_sft", n_sft), ("n_rl", n_rl), ("n_eval", n_eval)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    held_out: set[str] = set()
    manifest: dict = {"generator_version": GENERATOR_VERSION, "seed": seed, "families": list(families),
                      "teacher_accuracy": teacher_accuracy, "teacher_miss": teacher_miss, "splits": {}}
    teacher = random.Random(f"{seed}:teacher")
    for split, n in (("eval", n_eval), ("sft", n_sft), ("rl", n_rl)):
        counts: dict[str, int] = {}
        misses: dict[str, int] = {}
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            for i in range(n):
                fam = families[i % len(families)]
                attempt = 0
                s = generate(fam, seed, split, i, attempt)
                while split != "eval" and s.signature() in held_out:
                    attempt += 1
                    s = generate(fam, seed, split, i, attempt)
                if split == "eval":
                    held_out.add(s.signature())
                sid = f"{split}-{i:06d}"
                if s.frames:
                    from .video import encode_video

                    rel = f"videos/{sid}.mp4"
                    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
                    encode_video(os.path.join(out_dir, rel), np.stack([np.asarray(f) for f in s.render_frames()]),
                                 VIDEO_FPS)
                else:
                    rel = f"images/{sid}.png"
                    s.render().save(os.path.join(out_dir, rel), format="PNG")
                row = to_row(s, sid, rel, with_assistant=split == "sft", reasoning=reasoning)
                if split == "sft" and s.miss is not None and teacher.random() >= teacher_accuracy:
                    answer, why = s.miss
                    if teacher_miss == "answer":
                        why = row["messages"][-1]["content"].split("<think>", 1)[1].split("</think>", 1)[0]
                    row["messages"][-1]["content"] = f"<think>{why}</think><answer>{answer}</answer>"
                    misses[fam] = misses.get(fam, 0) + 1
                f.write(json.dumps(row, sort_keys=True) + "\n")
                counts[fam] = counts.get(fam, 0) + 1
        os.replace(path + ".tmp", path)
        manifest["splits"][split] = {"file": f"{split}.jsonl", "rows": n, "per_family": counts}
        if split == "sft":
            manifest["splits"][split]["teacher_misses"] = misses
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest
