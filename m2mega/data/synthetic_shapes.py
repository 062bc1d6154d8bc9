"""Drawing primitives of the synthetic data (``m2mega.data.synthetic``): the sample record, the palette, the
shapes as drawn (without anti-aliasing, in pure colours, so answers can be re-derived from the pixels) and
their areas."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLORS", "KINDS", "WHITE", "BLACK", "Sample", "font", "draw_shape", "fmt_number", "shape_area",
           "pixel_area"]

COLORS = {"red": (230, 0, 0), "blue": (0, 70, 230), "green": (0, 160, 0), "orange": (255, 140, 0),
          "purple": (140, 0, 200)}
KINDS = ("circle", "square", "triangle")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@dataclass
class Sample:
    family: str
    task: str
    answer_type: str
    question: str
    answer: str
    reasoning: str
    difficulty: float
    size: int
    params: dict = field(default_factory=dict)
    draw: Callable[[ImageDraw.ImageDraw], None] | None = None
    frames: int = 0  # > 0: a video family; draw_frame(d, k) draws frame k
    draw_frame: Callable[[ImageDraw.ImageDraw, int], None] | None = None
    # A weaker teacher's plausible wrong (answer, reasoning) -- the neighbouring class: write_dataset's
    # teacher_accuracy puts it in SFT rows. None: the family has no modelled miss.
    miss: tuple[str, str] | None = None

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.size, self.size), WHITE)
        self.draw(ImageDraw.Draw(img))
        return img

    def render_frames(self) -> list[Image.Image]:
        """The video's frames (video families)."""
        out = []
        for k in range(self.frames):
            img = Image.new("RGB", (self.size, self.size), WHITE)
            self.draw_frame(ImageDraw.Draw(img), k)
            out.append(img)
        return out

    def signature(self) -> str:
        """What makes two samples the same question (used to keep eval samples out of training)."""
        return json.dumps([self.family, self.question, self.params], sort_keys=True)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_shape(d: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        d.ellipse(box, fill=color)
    elif kind == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def fmt_number(x: float) -> str:
    """Numbers as answers: integers without a decimal point, others with one decimal."""
    r = round(x, 1)
    return str(int(r)) if r == int(r) else f"{r:.1f}"


def shape_area(kind: str, s: int) -> float:
    # Areas of the shapes as drawn in an s x s box (PIL boxes are inclusive: s pixels across).
    return {"circle": math.pi * (s / 2) ** 2, "square": float(s * s), "triangle": s * s / 2}[kind]


def pixel_area(kind: str, s: int) -> int:
    img = Image.new("L", (s + 2, s + 2), 0)
    draw_shape(ImageDraw.Draw(img), kind, (1, 1, s, s), 255)
    return sum(1 for v in img.getdata() if v)
