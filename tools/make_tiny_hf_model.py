#!/usr/bin/env python3
"""Write a tiny random Qwen2.5-VL as an HF model directory, to walk the whole m2mega path on a CPU.

    python tools/make_tiny_hf_model.py --out work/hf [--corpus work/data/sft.jsonl] [--seed 0]

The directory is what ``save_pretrained`` writes for a real model (config.json, safetensors) plus an
offline Qwen-style BPE tokenizer (the 14 Qwen2.5-VL special tokens; trained on ``--corpus`` text when given)
and a ``preprocessor_config.json``. Use it wherever a real checkpoint such as Qwen2.5-VL-7B-Instruct goes:
``tools/convert_checkpoint.py hf-to-mcore --hf-dir``, ``tools/preprocess_data.py --tokenizer-model``.
Its sizes are deliberately odd (head dim 10, M-RoPE sections 2/1/2) so shape bugs show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _texts(corpus: str | None) -> list[str] | None:
    if not corpus:
        return None
    out = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for m in row.get("messages", []):
                c = m.get("content")
                out += [c] if isinstance(c, str) else [p.get("text", "") for p in c if isinstance(p, dict)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--vocab-size", type=int, default=300, help="tokenizer ids including the 14 special tokens")
    p.add_argument("--corpus", help="JSONL rows (m2mega schema) whose text trains the tokenizer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if os.path.isdir(a.out) and os.listdir(a.out):
        p.error(f"--out {a.out} is not empty")

    import shutil
    import tempfile

    from m2mega.convert.hf_io import image_processor_config
    from m2mega.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
    from m2mega.data.tokenizer import build_tiny_qwen_tokenizer, build_tokenizer
    from m2mega.models.qwen25vl.config import Qwen25VLConfig, TextArch, VisionArch
    from m2mega.models.qwen25vl.hf_parity import build_hf_model

    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tiny_qwen_tokenizer(os.path.join(tmp, "tok"), vocab_size=a.vocab_size, texts=_texts(a.corpus))
        tok = build_tokenizer("HuggingFaceTokenizer", tok_dir)
        cfg = Qwen25VLConfig(
            text=TextArch(vocab_size=tok.vocab_size, hidden_size=40, intermediate_size=70, num_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 1, 2),
                          max_position_embeddings=4096),
            vision=VisionArch(depth=2, hidden_size=32, num_heads=2, intermediate_size=46, out_hidden_size=40,
                              fullatt_block_indexes=(1,)),
            image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id,
            make_vocab_size_divisible_by=8, name="tiny-hf",
        )
        build_hf_model(cfg, seed=a.seed).save_pretrained(a.out, safe_serialization=True)
        for fn in os.listdir(tok_dir):
            shutil.copyfile(os.path.join(tok_dir, fn), os.path.join(a.out, fn))
    with open(os.path.join(a.out, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(image_processor_config(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), f, indent=2)
    print(f"wrote a tiny random Qwen2.5-VL ({tok.vocab_size} ids) to {a.out}: {sorted(os.listdir(a.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
