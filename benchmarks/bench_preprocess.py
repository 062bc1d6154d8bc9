"""Benchmark: JSONL preprocessing (rows/s/worker) and the THD loader (micro-batches/s), each against the
plain HF path in the same run, plus the image storage choice (pixels vs patches) by size and speed.

    python benchmarks/bench_preprocess.py                      # text-heavy rows, ~1 min on 2 cores
    python benchmarks/bench_preprocess.py --rows 160 --text-words 6 --image-sides 448,896 \
        --json benchmarks/results/bench_preprocess_cpu_image_heavy.json   # image-heavy rows
    python benchmarks/bench_preprocess.py --rows 32 --quick    # seconds (smoke run)

Workload: synthetic SFT rows (``m2mega.testing.sample_files``): 0-2 JPEG images per row with sides uniform in
``--image-sides`` (default 224-640 px, i.e. 64-520 vision tokens each), ``--text-words`` of question text
and a think/answer trajectory. Tokenizer: the tiny offline Qwen2-style BPE unless ``--tokenizer-model``
names a real one (BPE speed depends little on vocabulary size).

Measured:

* **preprocess**: ``tools/preprocess_data.py``'s engine with 1 and ``--workers`` processes, for
  ``--image-format pixels`` and ``patches`` (bf16): rows/s and rows/s/worker; bytes per image in ``.bin``.
  Peer: HF per row in one process (``apply_chat_template``, the slow ``Qwen2VLImageProcessorPil``, pad
  expansion, tokenisation): what a pipeline without a preprocessing pass pays every epoch.
* **loader**: :class:`~m2mega.data.loader.PackedTHDDataset` building ``--seq-length`` micro-batches in the
  main process (one core), pixels and patches storage, bf16 ``pixel_values`` (what an H100 trains on)
  and fp32; then :class:`~m2mega.data.loader.THDLoader` with ``--workers`` prefetching processes. Peer:
  the same packs built on the fly from the JSONL with HF (decode, image processor, tokenizer, rope index).
* **consumption**: micro-batches/s one H100 trains on this workload. From
  ``benchmarks/results/bench_model_cuda.json`` when present (its ``lm_tokens_per_s`` at its LM depth,
  scaled to 28 layers); else analytic: ``6 * N`` FLOPs per LM token (N = 7.6e9) and per ViT patch
  (N = 0.67e9) at the project's MFU target 0.45 of 989 TFLOP/s (attention FLOPs ignored, which
  over-states consumption, i.e. errs against the loader). Reported: loader rate / consumption, per core.

Writes ``benchmarks/results/bench_preprocess_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # "one core" figures: the packing op's OpenMP too
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2mega.data.chat_template import DEFAULT_SYSTEM_PROMPT, with_system_prompt  # noqa: E402
from m2mega.data.loader import PackedTHDDataset, THDLoader  # noqa: E402
from m2mega.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from m2mega.testing.sample_files import write_sample_jsonl  # noqa: E402
from m2mega.data.tokenizer import build_tiny_qwen_tokenizer  # noqa: E402
from m2mega.models.qwen25vl.rope_index import get_rope_index_packed  # noqa: E402

H100_BF16_PEAK = 989e12
QWEN25VL_7B_LM_PARAMS = 7.6e9
QWEN25VL_VIT_PARAMS = 0.67e9  # 32 blocks of 1280 wide (SwiGLU 3420) + the 2x2 merger
MFU_TARGET = 0.45


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=240)
    p.add_argument("--image-sides", default="224,640")
    p.add_argument("--text-words", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3, help="loader: passes over the dataset (best and median)")
    p.add_argument("--tokenizer-model", default=None, help="HF tokenizer dir (default: tiny offline BPE)")
    p.add_argument("--quick", action="store_true", help="small images, no peer loader, one round")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/bench_preprocess_cpu.json)")
    return p.parse_args(argv)


def _hf_row(row, base, hf, proc):
    """The HF path for one row: ids (image pads expanded), pixel_values, grid."""
    from PIL import Image

    msgs = with_system_prompt(row["messages"], DEFAULT_SYSTEM_PROMPT)
    rl = msgs[-1]["role"] == "user"
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=rl)
    paths = [os.path.join(base, p["image"]) for m in msgs if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "image"]
    pv, grid = None, torch.zeros(0, 3, dtype=torch.long)
    if paths:
        out = proc(images=[Image.open(p) for p in paths], return_tensors="pt")
        pv, grid = out["pixel_values"], out["image_grid_thw"]
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + s for g, s in zip(grid, pieces[1:]))
    return hf(text, add_special_tokens=False)["input_ids"], pv, grid


def bench_preprocess(path, rows, tok, args, tmp):
    from m2mega.data.tokenizer import build_tokenizer

    build_tokenizer("HuggingFaceTokenizer", tok)  # imports (transformers, megatron) outside the timings
    out = {}
    for fmt in ("pixels", "patches"):
        for workers in sorted({1, args.workers}):
            cfg = PreprocessConfig(tokenizer_model=tok, image_format=fmt, patch_dtype="bfloat16", workers=workers,
                                   seq_length=args.seq_length, progress=False, max_reject_fraction=1.0,
                                   chunk_size=16)
            prefix = os.path.join(tmp, f"{fmt}_w{workers}")
            t = time.perf_counter()
            res = preprocess([path], prefix, cfg)
            dt = time.perf_counter() - t
            out[f"ours_{fmt}_w{workers}"] = {
                "rows_per_s": res.rows / dt, "rows_per_s_per_worker": res.rows / dt / workers, "seconds": dt,
                "accepted": res.accepted, "rejected": res.rejected, "tokens": res.tokens, "images": res.images,
                "bin_bytes": os.path.getsize(prefix + ".bin"),
                "image_bytes_per_image": (os.path.getsize(prefix + ".bin") - 4 * res.tokens) / max(res.images, 1),
            }
            print(f"preprocess {fmt:8s} workers={workers}: {res.rows / dt:7.1f} rows/s "
                  f"({res.rows / dt / workers:.1f}/s/worker)", flush=True)
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf, proc = AutoTokenizer.from_pretrained(tok), Qwen2VLImageProcessorPil()
    base = os.path.dirname(path)
    t = time.perf_counter()
    for r in rows:
        _hf_row(r, base, hf, proc)
    dt = time.perf_counter() - t
    out["hf_per_row"] = {"rows_per_s": len(rows) / dt, "rows_per_s_per_worker": len(rows) / dt, "seconds": dt}
    print(f"preprocess HF peer (1 process): {len(rows) / dt:7.1f} rows/s", flush=True)
    return out


def bench_loader(path, rows, tok, args, tmp):
    out = {}
    variants = [("pixels", torch.bfloat16), ("patches", torch.bfloat16), ("pixels", torch.float32)]
    for fmt, dtype in variants:
        ds = PackedTHDDataset(os.path.join(tmp, f"{fmt}_w1"), args.seq_length, pixel_dtype=dtype)
        n = len(ds)
        ds[0]  # warm-up (first touch of the mmaps)
        times, tokens, patches = [], 0, 0
        for _ in range(args.rounds):
            t = time.perf_counter()
            tokens = patches = 0
            for s in range(n):
                mb = ds[s]
                tokens += mb.num_tokens
                patches += 0 if mb.pixel_values is None else mb.pixel_values.shape[0]
            times.append(time.perf_counter() - t)
        best, med = min(times), statistics.median(times)
        name = f"ours_{fmt}_{str(dtype).split('.')[-1]}"
        out[name] = {"micro_batches": n, "tokens": tokens, "patches": patches, "mb_per_s_best": n / best,
                     "mb_per_s_median": n / med, "tokens_per_s_best": tokens / best,
                     "tokens_per_s_median": tokens / med}
        print(f"loader {name:22s}: {n / med:7.2f} micro-batches/s  {tokens / med / 1e3:8.1f}k tokens/s "
              f"(median, 1 core)", flush=True)
    if not args.quick:  # prefetching worker processes, as a trainer runs it
        ds = PackedTHDDataset(os.path.join(tmp, "pixels_w1"), args.seq_length, pixel_dtype=torch.bfloat16)
        n = len(ds)
        loader = THDLoader(ds, num_steps=n * args.rounds, num_workers=args.workers, prefetch_factor=4)
        t = time.perf_counter()
        k = sum(1 for _ in loader)
        dt = time.perf_counter() - t
        out[f"ours_pixels_bfloat16_{args.workers}workers"] = {"micro_batches": k, "mb_per_s": k / dt,
                                                              "note": "includes worker start-up"}
        print(f"loader pixels bf16, THDLoader {args.workers} workers: {k / dt:7.2f} micro-batches/s", flush=True)
    if not args.quick:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        hf, proc = AutoTokenizer.from_pretrained(tok), Qwen2VLImageProcessorPil()
        ds = PackedTHDDataset(os.path.join(tmp, "pixels_w1"), args.seq_length)
        sp = ds.data.special
        base = os.path.dirname(path)
        t = time.perf_counter()
        n, tokens = 0, 0
        for s in range(len(ds)):
            parts = [_hf_row(rows[ds.data.info(int(i)).line - 1], base, hf, proc) for i in ds.plan.samples(s)]
            ids = [torch.tensor(p[0]) for p in parts]
            grid = torch.cat([p[2] for p in parts])
            pv = [p[1] for p in parts if p[1] is not None]
            torch.cat(pv).to(torch.bfloat16) if pv else None
            get_rope_index_packed(ids, grid if len(grid) else None, image_token_id=sp["image_token_id"],
                                  vision_start_token_id=sp["vision_start_token_id"])
            n += 1
            tokens += sum(len(x) for x in ids)
        dt = time.perf_counter() - t
        out["hf_on_the_fly"] = {"micro_batches": n, "mb_per_s_median": n / dt, "tokens_per_s_median": tokens / dt}
        print(f"loader HF on-the-fly peer: {n / dt:7.2f} micro-batches/s  {tokens / dt / 1e3:8.1f}k tokens/s", flush=True)
    return out


def consumption(tokens: int, patches: int, micro_batches: int) -> dict:
    """Micro-batches/s one H100 trains on this workload: measured (bench_model on cuda) or analytic."""
    p = ROOT / "benchmarks" / "results" / "bench_model_cuda.json"
    if p.exists():
        r = json.loads(p.read_text())
        ours = r["results"]["ours"]
        layers = r.get("lm_layers", 28)
        tps = ours["lm_tokens_per_s"] * layers / 28
        return {"source": str(p.relative_to(ROOT)), "h100_lm_tokens_per_s": tps,
                "h100_mb_per_s": tps / (tokens / micro_batches),
                "note": f"measured at {layers} LM layers, scaled to 28 (vision share as measured there)"}
    flops = 6 * QWEN25VL_7B_LM_PARAMS * tokens + 6 * QWEN25VL_VIT_PARAMS * patches
    sec = flops / (MFU_TARGET * H100_BF16_PEAK)
    return {"source": "analytic", "h100_mb_per_s": micro_batches / sec, "h100_lm_tokens_per_s": tokens / sec,
            "note": f"MFU {MFU_TARGET} x {H100_BF16_PEAK / 1e12:.0f} TFLOP/s; 6*N FLOPs per LM token "
                    f"(N={QWEN25VL_7B_LM_PARAMS:.1e}) and per ViT patch (N={QWEN25VL_VIT_PARAMS:.2e}); attention "
                    "FLOPs ignored (over-states consumption)"}


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(1)  # the loader runs one core per DataLoader worker
    lo, hi = (int(x) for x in args.image_sides.split(","))
    if args.quick:
        lo, hi, args.rounds = 56, 160, 1
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        tok = args.tokenizer_model or build_tiny_qwen_tokenizer(os.path.join(tmp, "tok"), vocab_size=1000)
        path = os.path.join(tmp, "data", "train.jsonl")
        os.makedirs(os.path.dirname(path))
        rows = write_sample_jsonl(path, args.rows, seed=0, n_images=32, max_images_per_row=2, rl_fraction=0.0,
                                  text_words=args.text_words, image_sides=(lo, hi), image_format="jpg")
        pre = bench_preprocess(path, rows, tok, args, tmp)
        load = bench_loader(path, rows, tok, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = load["ours_pixels_bfloat16"]
    cons = consumption(ref["tokens"], ref["patches"], ref["micro_batches"])
    ratios = {k: v["mb_per_s_median"] / cons["h100_mb_per_s"] for k, v in load.items() if "mb_per_s_median" in v}
    px, pt = pre["ours_pixels_w1"], pre["ours_patches_w1"]
    summary = {
        "h100_consumption": cons,
        "loader_over_h100_consumption_1core": ratios,
        "cores_for_10x_pixels_bf16": 10 * cons["h100_mb_per_s"] / ref["mb_per_s_median"],
        "storage_bytes_per_image": {"pixels_uint8": px["image_bytes_per_image"],
                                    "patches_bf16": pt["image_bytes_per_image"]},
        "preprocess_speedup_vs_hf_1worker": px["rows_per_s"] / pre["hf_per_row"]["rows_per_s"],
    }
    print(f"H100 consumption ({cons['source']}): {cons['h100_mb_per_s']:.2f} micro-batches/s "
          f"({cons['h100_lm_tokens_per_s']:.0f} tokens/s)")
    for k, r in ratios.items():
        print(f"  {k:24s} delivers {r:6.1f}x that on one core")
    print(f"cores for 10x (pixels, bf16): {summary['cores_for_10x_pixels_bf16']:.2f}")
    print(f"bytes/image: pixels {px['image_bytes_per_image']:.0f}, patches bf16 {pt['image_bytes_per_image']:.0f}")
    result = {
        "command": "python benchmarks/bench_preprocess.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "rows": args.rows, "image_sides": [lo, hi], "text_words": args.text_words, "seq_length": args.seq_length,
        "preprocess": pre, "loader": load, "summary": summary,
    }
    out = args.json or str(ROOT / "benchmarks" / "results" / "bench_preprocess_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
