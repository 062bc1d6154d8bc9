"""Generation throughput, KV cache vs full recompute, in one run on this machine (TP1, one process).

    python -m m2mega.inference.bench --preset tiny --batch 4 --prompt-len 64 --new-tokens 64 --repeats 3
    python -m m2mega.inference.bench --hidden 512 --layers 8 ...   # a wider custom LM (random weights)

Prompts are random text plus one 56x56 image each (random weights and pixels). Reported: generated tokens
per second (batch x new tokens / wall time, prefill included), best of ``--repeats``, for both paths on the
same model and prompts; greedy decoding with no EOS so both paths produce the same number of tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time


def _config(args):
    from m2mega.models.qwen25vl import preset

    cfg = preset(args.preset)
    if args.hidden or args.layers:
        t = cfg.text
        hidden = args.hidden or t.hidden_size
        if hidden % 64:
            raise SystemExit(f"--hidden must be a multiple of 64 (head_dim 64), got {hidden}")
        heads = hidden // 64
        t = dataclasses.replace(t, hidden_size=hidden, num_layers=args.layers or t.num_layers,
                                num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else 1,
                                intermediate_size=hidden * 3, mrope_section=(16, 8, 8))
        cfg = cfg.replace(text=t, vision=dataclasses.replace(cfg.vision, out_hidden_size=hidden), name="bench")
    return cfg


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = p.parse_args(argv)

    import torch

    import m2mega.runtime as rt
    from m2mega.inference import generate
    from m2mega.models.qwen25vl import build_model
    from m2mega.models.qwen25vl.hf_parity import synthetic_batch
    from m2mega.runtime.multiproc import free_port

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    images = [[(56, 56)] for _ in range(args.batch)]
    base = synthetic_batch(cfg, images, seed=0, text_len=(2, 4))
    extra = [max(0, args.prompt_len - s.numel()) for s in base.samples]
    batch = synthetic_batch(cfg, images, seed=0, text_len=(2, 4), extra_text=extra)
    per = int(batch.image_grid_thw[0].prod())
    pv = [batch.pixel_values[i * per:(i + 1) * per] for i in range(args.batch)]
    grids = [batch.image_grid_thw[i:i + 1] for i in range(args.batch)]
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model = build_model(cfg)
        results = {}
        outs = {}
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = generate(model, batch.samples, pixel_values=pv, image_grid_thw=grids,
                               max_new_tokens=args.new_tokens, greedy=True, use_cache=use_cache)
                best = min(best, time.perf_counter() - t0)
            n = int(out.response_lengths.sum())
            outs[use_cache] = [t.tolist() for t in out.tokens]
            results["kv_cache" if use_cache else "no_cache"] = {"seconds": round(best, 4), "tokens": n,
                                                                "tokens_per_s": round(n / best, 1)}
        results["same_tokens"] = outs[True] == outs[False]
        results["speedup"] = round(results["kv_cache"]["tokens_per_s"] / results["no_cache"]["tokens_per_s"], 2)
        results["setup"] = {"config": cfg.name, "hidden": cfg.text.hidden_size, "layers": cfg.text.num_layers,
                            "batch": args.batch, "prompt_len": max(s.numel() for s in batch.samples),
                            "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    finally:
        rt.shutdown()
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
