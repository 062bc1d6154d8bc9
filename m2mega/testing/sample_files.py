"""Test fixture: small JSONL datasets with PNG images in the input schema (tests and benchmarks).

The rows are not meaningful tasks (see ``m2mega.data.synthetic`` for those); they exercise every shape of
input the preprocessor accepts: SFT and RL rows, 0-3 images of random odd sizes (RGB, RGBA, grey),
optional system turns, multi-turn conversations, difficulty and quality fields.
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["write_images", "write_sample_jsonl"]

_WORDS = ("count the red squares", "which object is closer", "estimate the distance in meters",
          "what is the area of the triangle", "how many circles", "is the cup left of the plate",
          "solve for x", "compare the two lengths", "ünïcödé text ✓", "numbers 3.14 and 42")


def write_images(img_dir: str, n: int, rng: np.random.Generator, min_side: int = 20, max_side: int = 160,
                 fmt: str = "png") -> list[str]:
    """``n`` random images (random size; PNGs cycle through RGB, RGBA and grey; JPEGs are RGB with smooth
    content, like photos) under ``img_dir``; returns their file names."""
    from PIL import Image

    os.makedirs(img_dir, exist_ok=True)
    names = []
    for k in range(n):
        h, w = (int(x) for x in rng.integers(min_side, max_side, 2))
        if fmt == "jpg":
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), ((xx + yy) * 127 // max(h + w, 1))], -1)
            arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            name = f"img{k:04d}.jpg"
            Image.fromarray(arr, "RGB").save(os.path.join(img_dir, name), quality=90)
        else:
            mode = ("RGB", "RGBA", "L")[k % 3]
            ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
            name = f"img{k:04d}.png"
            Image.fromarray(arr[..., 0] if ch == 1 else arr, mode).save(os.path.join(img_dir, name))
        names.append(name)
    return names


def write_sample_jsonl(path: str, n_rows: int, *, seed: int = 0, n_images: int = 8, max_images_per_row: int = 2,
                       rl_fraction: float = 0.5, text_words: int = 12, image_sides: tuple[int, int] = (20, 160),
                       difficulty: bool = True, image_format: str = "png") -> list[dict]:
    """Write ``n_rows`` valid rows to ``path`` (images in ``<dir>/imgs``, referenced relatively); returns them."""
    rng = np.random.default_rng(seed)
    base = os.path.dirname(os.path.abspath(path))
    names = write_images(os.path.join(base, "imgs"), n_images, rng, *image_sides, fmt=image_format) if n_images else []
    rows = []
    for i in range(n_rows):
        k = int(rng.integers(0, max_images_per_row + 1)) if names else 0
        text = " ".join(_WORDS[int(j)] for j in rng.integers(0, len(_WORDS), text_words))
        content = [{"type": "image", "image": f"imgs/{names[int(j)]}"} for j in rng.integers(0, len(names), k)]
        content.append({"type": "text", "text": f"Q{i}: {text}?"})
        msgs = []
        if i % 5 == 1:
            msgs.append({"role": "system", "content": "You are a careful visual reasoner."})
        if i % 7 == 3:  # an earlier exchange: multi-turn
            msgs += [{"role": "user", "content": "Warm-up: what is 1 + 1?"},
                     {"role": "assistant", "content": "<think> 1 + 1 = 2 </think><answer> 2 </answer>"}]
        msgs.append({"role": "user", "content": content})
        answer_type = ("number", "choice", "text", "math")[i % 4]
        answer = "ABCD"[int(rng.integers(0, 4))] if answer_type == "choice" else str(int(rng.integers(0, 100)))
        if rng.random() >= rl_fraction:
            msgs.append({"role": "assistant", "content": f"<think> {text}. So the answer is {answer}. </think>"
                                                         f"<answer> \\boxed{{{answer}}} </answer>"})
        row = {"id": f"row-{i:06d}", "messages": msgs, "answer": answer, "task": ("math", "spatial", "logic")[i % 3],
               "answer_type": answer_type}
        if difficulty:
            row["difficulty"] = float(rng.integers(0, 9)) / 8  # coarse, so ties occur
        if i % 2 == 0:
            row["quality"] = round(float(rng.random()), 3)
        rows.append(row)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows
