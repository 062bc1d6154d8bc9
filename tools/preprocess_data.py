#!/usr/bin/env python3
"""Preprocess M2-Reasoning JSONL (SFT and RL rows, with images and videos) into megatron-core indexed datasets.

    python tools/preprocess_data.py --input train.jsonl --output-prefix data/train \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/Qwen2.5-VL-7B-Instruct \\
        --workers 16 --order curriculum --seq-length 8192

Writes PREFIX.bin / PREFIX.idx (``IndexedDataset(PREFIX, multimodal=True)``), the sidecar
(PREFIX.samples.npy, .grid.npy, .video.npy, .strings.bin, .meta.json) and the reject file; see docs/data.md.
Exit code 0, or 1 when more than ``--max-reject-fraction`` of the rows were rejected (the dataset of the
accepted rows is still written), or 2 on unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

# Only light modules here (no torch/megatron): `--help` and argument errors answer at once. The engine
# (m2mega.data.preprocess, which loads megatron's IndexedDataset) is imported in main().
from m2mega.data.chat_template import DEFAULT_SYSTEM_PROMPT
from m2mega.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, IMAGE_FORMATS
from m2mega.data.ordering import ORDERS
from m2mega.data.tokenizer import TOKENIZER_TYPES
from m2mega.data.video import VIDEO_DEFAULTS


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSONL file(s); image paths relative to each file")
    g.add_argument("--min-quality", type=float, default=None,
                   help="reject SFT rows whose 'quality' (or m2mega.data.quality's score) is below this")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True, help="HF tokenizer directory or SentencePiece .model")
    g.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system turn added to rows without one (default: the think/answer/boxed instructions); "
                        "'none' leaves it to the template (Qwen's 'You are a helpful assistant.')")
    g.add_argument("--seq-length", type=int, default=8192,
                   help="rows longer than this (tokens, images expanded) are rejected")
    g = p.add_argument_group("images")
    g.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    g.add_argument("--image-format", choices=IMAGE_FORMATS, default="pixels",
                   help="store resized uint8 pixels (default; 8x smaller than bf16 patches) or packed patches")
    g.add_argument("--patch-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of stored patches with --image-format patches")
    g = p.add_argument_group("videos (defaults for video parts that set none; see docs/data.md)")
    g.add_argument("--video-fps", type=float, default=VIDEO_DEFAULTS.fps, help="frames sampled per second of a video file")
    g.add_argument("--video-max-frames", type=int, default=VIDEO_DEFAULTS.max_frames,
                   help="most frames sampled from a video file")
    g.add_argument("--video-min-pixels", type=int, default=VIDEO_DEFAULTS.min_pixels, help="per-frame lower bound")
    g.add_argument("--video-max-pixels", type=int, default=VIDEO_DEFAULTS.max_pixels, help="per-frame upper bound")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and the sidecar")
    g.add_argument("--order", choices=ORDERS, default="input",
                   help="curriculum: ascending difficulty (seeded tie-break); shuffle: seeded permutation")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--reject-file", default=None, help="JSONL of rejected rows (default PREFIX.rejects.jsonl)")
    g.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="exit with code 1 when a larger fraction of rows is rejected")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument("--chunk-size", type=int, default=256, help="rows per work unit (does not change the output)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    from m2mega.data.preprocess import ConfigError, PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        seq_length=args.seq_length,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        image_format=args.image_format,
        patch_dtype=args.patch_dtype,
        video_fps=args.video_fps,
        video_max_frames=args.video_max_frames,
        video_min_pixels=args.video_min_pixels,
        video_max_pixels=args.video_max_pixels,
        system_prompt=None if args.system_prompt.lower() == "none" else args.system_prompt,
        order=args.order,
        seed=args.seed,
        min_quality=args.min_quality,
        workers=args.workers,
        chunk_size=args.chunk_size,
        max_reject_fraction=args.max_reject_fraction,
        progress=not args.no_progress,
    )
    try:
        res = preprocess(args.input, args.output_prefix, cfg, reject_file=args.reject_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The engine turns SIGINT into KeyboardInterrupt and SIGTERM into SystemExit(143) at any moment of the
    # run, after removing its temporary files.
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); temporary files removed", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code != 143:
            raise
        print("error: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    rate = res.rows / max(res.seconds, 1e-9)
    print(
        f"rows {res.rows}  accepted {res.accepted}  rejected {res.rejected} ({100 * res.reject_fraction:.2f}%)  "
        f"tokens {res.tokens}  images {res.images}  videos {res.videos}  {res.seconds:.1f}s  {rate:.1f} rows/s "
        f"({rate / res.workers:.1f}/s/worker)",
        file=sys.stderr,
    )
    if res.reject_reasons:
        print("rejects by reason: " + json.dumps(res.reject_reasons), file=sys.stderr)
    print(f"rejects written to {res.reject_file}", file=sys.stderr)
    if res.exceeded:
        print(
            f"error: {100 * res.reject_fraction:.2f}% of rows rejected > --max-reject-fraction "
            f"{100 * args.max_reject_fraction:.2f}%",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
