"""One-feature (perception) families of the synthetic data: hue, corners, larger, quadrant, width, length.

Each asks about one visual feature of a 56 px image and names the neighbouring class as a weaker teacher's
miss (``Sample.miss``): with ``write_dataset(teacher_accuracy < 1)`` the cold-start policy samples the right
answer and the miss, which leaves GRPO room to sharpen (docs/grpo.md, "The diagnosis ladder behind the
redesign"; ``teacher_miss="answer"`` keeps the right reasoning and misses only the answer: the demo's data).
"""

from __future__ import annotations

import random

from .synthetic_shapes import COLORS, KINDS, Sample, draw_shape, pixel_area, shape_area

__all__ = ["PERCEPTION_GENERATORS", "HUES", "CYCLE", "QUADRANTS", "CORNERS"]


# Four far-apart hues (COLORS' blue/purple and red/orange are too close for a tiny vision tower to tell
# apart quickly); hue's miss is the next colour in this cycle.
HUES = {"red": (230, 0, 0), "yellow": (240, 220, 0), "green": (0, 160, 0), "blue": (0, 70, 230)}
CYCLE = list(HUES)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CORNERS = {"circle": 0, "triangle": 3, "square": 4}
NEXT_KIND = {"circle": "triangle", "triangle": "square", "square": "circle"}


def _one_shape(rng: random.Random, size: int = 56) -> tuple[tuple[int, int, int, int], int]:
    s = rng.randint(size // 3, size - 8)
    x, y = rng.randint(2, size - 2 - s), rng.randint(2, size - 2 - s)
    return (x, y, x + s - 1, y + s - 1), s


def _hue(rng: random.Random) -> Sample:
    kind, col = rng.choice(KINDS), rng.choice(CYCLE)
    box, s = _one_shape(rng)
    miss = CYCLE[(CYCLE.index(col) + 1) % len(CYCLE)]

    def draw(d):
        draw_shape(d, kind, box, HUES[col])

    return Sample("hue", "general", "text", "What colour is the shape?", col, f"The shape is {col}.",
                  1 - (s - 18) / 38, 56, {"kind": kind, "color": col, "box": box}, draw,
                  miss=(miss, f"The shape is {miss}."))


def _corners(rng: random.Random) -> Sample:
    kind, col = rng.choice(KINDS), rng.choice(CYCLE)
    box, s = _one_shape(rng)
    n, mk = CORNERS[kind], NEXT_KIND[kind]

    def draw(d):
        draw_shape(d, kind, box, HUES[col])

    return Sample("corners", "general", "number", "How many corners does the shape have?", str(n),
                  f"The shape is a {kind}, and a {kind} has {n} corners.", 1 - (s - 18) / 38, 56,
                  {"kind": kind, "color": col, "box": box}, draw,
                  miss=(str(CORNERS[mk]), f"The shape is a {mk}, and a {mk} has {CORNERS[mk]} corners."))


def _larger(rng: random.Random) -> Sample:
    (ca, cb), ka, kb = rng.sample(CYCLE, 2), rng.choice(KINDS), rng.choice(KINDS)
    while True:
        sa, sb = rng.randint(8, 26), rng.randint(8, 26)
        aa, ab = shape_area(ka, sa), shape_area(kb, sb)
        if max(aa, ab) / min(aa, ab) >= 1.5 and (pixel_area(ka, sa) > pixel_area(kb, sb)) == (aa > ab):
            break
    boxes = []
    for s, x_off in ((sa, 0), (sb, 28)):  # A in the left half, B in the right half
        x, y = x_off + rng.randint(1, 27 - s), rng.randint(1, 55 - s)
        boxes.append((x, y, x + s - 1, y + s - 1))
    ans, other = ("A", "B") if aa > ab else ("B", "A")
    name = {"A": f"{ca} {ka}", "B": f"{cb} {kb}"}
    q = f"Which shape is larger?\nA. the {ca} {ka}\nB. the {cb} {kb}\nAnswer with the option's letter."

    def draw(d):
        draw_shape(d, ka, boxes[0], HUES[ca])
        draw_shape(d, kb, boxes[1], HUES[cb])

    ratio = max(aa, ab) / min(aa, ab)
    return Sample("larger", "spatial", "choice", q, ans, f"The {name[ans]} is larger, so option {ans}.",
                  max(0.0, 1 - (ratio - 1.5) / 3), 56, {"kinds": [ka, kb], "sides": [sa, sb], "boxes": boxes},
                  draw, miss=(other, f"The {name[other]} is larger, so option {other}."))


def _quadrant(rng: random.Random) -> Sample:
    q = rng.randrange(4)
    kind, col, s = rng.choice(KINDS), rng.choice(CYCLE), rng.randint(10, 24)
    x = rng.randint(1, 27 - s) + 28 * (q % 2)
    y = rng.randint(1, 27 - s) + 28 * (q // 2)
    box = (x, y, x + s - 1, y + s - 1)
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {name}" for i, name in enumerate(QUADRANTS))
    question = f"In which part of the image is the shape?\n{options}\nAnswer with the option's letter."
    m = (q + 1) % 4

    def draw(d):
        draw_shape(d, kind, box, HUES[col])

    return Sample("quadrant", "spatial", "choice", question, letters[q],
                  f"The shape is in the {QUADRANTS[q]}, so option {letters[q]}.", 1 - (s - 10) / 14, 56,
                  {"kind": kind, "color": col, "box": box}, draw,
                  miss=(letters[m], f"The shape is in the {QUADRANTS[m]}, so option {letters[m]}."))


def _width(rng: random.Random) -> Sample:
    k = rng.randint(1, 9)
    length = round(k * 5.6)  # k tenths of the 56 px image
    x0, y0 = rng.randint(0, 56 - length), rng.randint(2, 46)

    def draw(d):
        d.rectangle((x0, y0, x0 + length - 1, y0 + 7), fill=COLORS["orange"])

    return Sample("width", "spatial", "number", "The image is 10 m wide. How long is the orange bar, in metres?",
                  str(k), f"The orange bar spans {k} tenths of the width: {k} m.", abs(k - 5) / 4, 56,
                  {"k": k, "x0": x0, "y0": y0}, draw,
                  miss=(str(k + 1), f"The orange bar spans {k + 1} tenths of the width: {k + 1} m."))


def _length(rng: random.Random) -> Sample:
    # width's question with four far-apart classes (quarters, like hue's four colours): nine classes with a
    # one-off miss were too fine for the tiny policy to sharpen (docs/grpo.md); the miss cycles like hue's
    # so every class keeps a sampled alternative, and EDNM scores it by its relative error.
    k, t = rng.randint(1, 4), rng.randint(4, 10)
    length, m = 14 * k, k % 4 + 1
    q = {n: f"{n} quarter{'s' if n > 1 else ''}" for n in (k, m)}
    x0, y0 = rng.randint(0, 56 - length), rng.randint(2, 54 - t)

    def draw(d):
        d.rectangle((x0, y0, x0 + length - 1, y0 + t - 1), fill=COLORS["orange"])

    return Sample("length", "spatial", "number", "The image is 4 m wide. How long is the orange bar, in metres?",
                  str(k), f"The orange bar spans {q[k]} of the width: {k} m.", 1 - (t - 4) / 6, 56,
                  {"k": k, "x0": x0, "y0": y0, "thickness": t}, draw,
                  miss=(str(m), f"The orange bar spans {q[m]} of the width: {m} m."))


PERCEPTION_GENERATORS = {"hue": _hue, "corners": _corners, "larger": _larger, "quadrant": _quadrant, "width": _width,
                         "length": _length}
