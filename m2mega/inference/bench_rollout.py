"""GRPO rollout throughput in one run: m2mega's static batching, the rollout engine, and HF ``generate``.

    python -m m2mega.inference.bench_rollout                       # tiny fp32 model, 4 prompts (2 with images), G=8
    python -m m2mega.inference.bench_rollout --shape 7b --layers 4 --device cuda --dtype bf16   # 7B-shaped cut

Same random weights in all three (the HF model is built first, then loaded into m2mega) and the same
prompts: ``--prompts`` prompts of random text, the first ``--image-prompts`` of them with one image each,
``--group`` samples per prompt, up to ``--new-tokens`` new tokens. Every token id divisible by
``--eos-every`` is an EOS token, so responses end at ragged lengths. Contenders:

- ``static``: ``generate()`` on the prompts repeated G times (what GRPO's rollout driver did before the
  engine: one padded batch, prefill and vision tower G times per prompt, finished rows idle);
- ``engine``: :class:`~m2mega.inference.engine.RolloutEngine` (shared group prefill, continuous batching);
- ``hf``: transformers ``generate(num_return_sequences=G)`` on the padded prompts (greedy: the prompts
  repeated G times, as HF refuses ``num_return_sequences`` without sampling).

For each, under greedy and under sampling (temperature 1): generated tokens per second (best of
``--repeats``, wall time of the whole call), prefill + first token vs decode seconds (``static``/``hf``:
a ``max_new_tokens=1`` run gives the prefill; ``engine``: its own split), decode seconds per step, peak
memory above the start of the call (CUDA: ``max_memory_allocated``; CPU: the C heap in use, sampled every
2 ms), and under greedy whether the three produced the same tokens. Prints one JSON object (``--json``
also writes it). Contenders run round-robin per repeat, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time

SHAPES = {  # (hidden, heads, kv heads, ffn, vocab)
    "small": (256, 4, 2, 768, 2000),
    "7b": (3584, 28, 4, 18944, 152064),
}


def _config(args):
    from m2mega.models.qwen25vl import preset
    from m2mega.models.qwen25vl.config import TextArch

    hidden, heads, kv, ffn, vocab = SHAPES[args.shape]
    d = hidden // heads
    unit = d // 2 // 8  # M-RoPE sections (t, h, w) in Qwen2.5-VL's 2:3:3 split of head_dim / 2
    section = (d // 2 - 6 * unit, 3 * unit, 3 * unit)
    text = TextArch(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=args.layers,
                    num_attention_heads=heads, num_key_value_heads=kv, rope_theta=1000000.0, mrope_section=section,
                    max_position_embeddings=32768)
    base = preset("tiny")
    vision = dataclasses.replace(base.vision, out_hidden_size=hidden)
    return base.replace(text=text, vision=vision, image_token_id=vocab - 3, video_token_id=vocab - 4,
                        vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1,
                        make_vocab_size_divisible_by=8, name=f"bench-{args.shape}-{args.layers}l")


def _drop_repo_root_from_path() -> None:
    """``python -m`` puts the working directory first on ``sys.path``; at the repository root its
    ``kernels/`` (installed as ``m2mega.kernels``) would shadow the PyPI package ``kernels`` that
    transformers imports (the root conftest.py does the same for tests)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != root]


class _PeakMemory:
    """Peak memory in use while the block runs, above what was in use when it started: CUDA's
    ``max_memory_allocated``; on CPU the C heap in use (glibc ``mallinfo2``: allocated, not merely
    cached, which resident-set size cannot tell apart), sampled every 2 ms."""

    def __init__(self, device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _in_use() -> int:
        import ctypes

        class _Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Info
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._in_use()

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, self._in_use() - self.base)

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._in_use() - self.base)


def _environment(dev) -> dict:
    """Date, machine and library versions, so a stored result says what produced it."""
    import datetime
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "transformers": ver("transformers"), "megatron_core": ver("megatron-core")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--image-prompts", type=int, default=2)
    p.add_argument("--image-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    p.add_argument("--prompt-len", type=int, nargs=2, default=(24, 64), metavar=("MIN", "MAX"))
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--eos-every", type=int, default=40, help="token ids divisible by this are EOS (0: none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=256, help="engine decode slots")
    p.add_argument("--cascade", choices=("auto", "on", "off"), default="auto",
                   help="engine's cascade attention over shared prompts (auto: CPU, prompts of >= 128 tokens)")
    p.add_argument("--fused-decode", choices=("auto", "on", "off"), default="auto",
                   help="engine's fused CPU decode step, m2mega._C.lm_decode_cpu (auto: CPU fp32 TP1 when built)")
    p.add_argument("--modes", default="greedy,sample")
    p.add_argument("--contenders", default="static,engine,hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if bad := set(contenders) - {"static", "engine", "hf"} or set(modes) - {"greedy", "sample"}:
        raise SystemExit(f"unknown contender/mode {sorted(bad)}")

    _drop_repo_root_from_path()
    import torch

    import m2mega.runtime as rt
    from m2mega.inference import SamplingParams, generate
    from m2mega.inference.engine import Request, RolloutEngine
    from m2mega.models.qwen25vl import build_model, load_hf_into_model
    from m2mega.models.qwen25vl.hf_parity import build_hf_model, synthetic_batch
    from m2mega.runtime.multiproc import free_port

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = _config(args)
    images = [[tuple(args.image_size)] if i < args.image_prompts else [] for i in range(args.prompts)]
    g = torch.Generator().manual_seed(1)
    lo, hi = args.prompt_len
    base = synthetic_batch(cfg, images, seed=0, text_len=(2, 4))
    want = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in images]
    batch = synthetic_batch(cfg, images, seed=0, text_len=(2, 4),
                            extra_text=[max(0, w - s.numel()) for w, s in zip(want, base.samples)])
    pv, grids, off, k = [], [], 0, 0
    for imgs in images:
        if not imgs:
            pv.append(None)
            grids.append(None)
            continue
        gr = batch.image_grid_thw[k:k + 1]
        n = int(gr.prod(-1).sum())
        pv.append(batch.pixel_values[off:off + n].to(dev, dtype))
        grids.append(gr.to(dev))
        off, k = off + n, k + 1
    prompts = [s.to(dev) for s in batch.samples]
    special = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id)
    eos = [t for t in range(args.eos_every, special, args.eos_every)] if args.eos_every else []
    suppress = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    G, NEW, PAD = args.group, args.new_tokens, 0

    hf = build_hf_model(cfg, seed=11, dtype=dtype).to(dev)
    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    results: dict = {"setup": {
        "shape": args.shape, "hidden": cfg.text.hidden_size, "layers": cfg.text.num_layers,
        "vocab": cfg.text.vocab_size, "dtype": args.dtype, "device": str(dev), "prompts": args.prompts,
        "image_prompts": args.image_prompts, "image_size": list(args.image_size),
        "prompt_tokens": [s.numel() for s in prompts], "group": G, "new_tokens": NEW, "eos_ids": len(eos),
        "threads": torch.get_num_threads(), "max_batch": args.max_batch, "cascade": args.cascade,
        "fused_decode": args.fused_decode},
        "environment": _environment(dev)}
    try:
        model = build_model(cfg, dtype=dtype)
        load_hf_into_model(model, {k: v.detach().clone() for k, v in hf.state_dict().items()}, cfg)
        engine = RolloutEngine(model, max_batch=args.max_batch, cascade=args.cascade,
                               fused_decode=args.fused_decode)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def run_static(greedy, new):
            rep = [i for i in range(len(prompts)) for _ in range(G)]
            out = generate(model, [prompts[i] for i in rep], pixel_values=[pv[i] for i in rep],
                           image_grid_thw=[grids[i] for i in rep], max_new_tokens=new, greedy=greedy,
                           temperature=1.0, eos_token_id=eos or None, pad_token_id=PAD, seed=1234,
                           return_logprobs=True, suppress_token_ids=suppress)
            return [t.tolist() for t in out.tokens], {}

        def run_engine(greedy, new):
            reqs = [Request(prompts[i], pv[i], grids[i], num_samples=G) for i in range(len(prompts))]
            out = engine.generate(reqs, max_new_tokens=new, eos_token_id=eos or None, seed=1234,
                                  sampling=SamplingParams(greedy=greedy, temperature=1.0), suppress_token_ids=suppress)
            s = engine.stats
            return [x.tokens.tolist() for r in out for x in r], {
                "prefill_s": s.prefill_s, "decode_s": s.decode_s, "decode_steps": s.decode_steps,
                "slots": s.slots, "slot_occupancy": round(s.slot_occupancy, 3), "images_encoded": s.images_encoded,
                "cuda_graphs": s.cuda_graphs, "cascade": s.cascade, "fused_decode": s.fused_decode,
                "kv_bytes": s.kv_bytes}

        S = max(s.numel() for s in prompts)
        ids = torch.full((len(prompts), S), PAD, dtype=torch.long, device=dev)
        am = torch.zeros_like(ids)
        for i, s in enumerate(prompts):
            ids[i, S - s.numel():] = s
            am[i, S - s.numel():] = 1
        bad_words = [[t] for t in suppress]

        def hf_inputs(rep):
            x = [i for i in range(len(prompts)) for _ in range(rep)]
            p_ = [pv[i] for i in x if pv[i] is not None]
            g_ = [grids[i] for i in x if grids[i] is not None]
            return ids[x], am[x], (torch.cat(p_) if p_ else None), (torch.cat(g_) if g_ else None)

        # HF refuses num_return_sequences > 1 without sampling: greedy gets the prompts repeated G times.
        hf_in = {True: hf_inputs(G), False: hf_inputs(1)}

        def run_hf(greedy, new):
            torch.manual_seed(1234)
            i_, a_, p_, g_ = hf_in[greedy]
            with torch.no_grad():
                out = hf.generate(input_ids=i_, attention_mask=a_, pixel_values=p_, image_grid_thw=g_,
                                  mm_token_type_ids=(i_ == cfg.image_token_id).int(), do_sample=not greedy,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=0,
                                  num_return_sequences=1 if greedy else G, eos_token_id=eos or None,
                                  pad_token_id=PAD, bad_words_ids=bad_words)
            toks = []
            for row in out[:, S:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                toks.append(row[:cut])
            return toks, {}

        runners = {"static": run_static, "engine": run_engine, "hf": run_hf}
        for mode in modes:
            greedy = mode == "greedy"
            res, tokens, best, extra, peak, prefill = {}, {}, {}, {}, {}, {}
            for name in contenders:
                runners[name](greedy, 2)  # warm-up (allocations, lazy inits)
                best[name], prefill[name], peak[name] = float("inf"), float("inf"), 0
            # Round-robin over the contenders, so load from other processes hits all of them alike.
            for _ in range(args.repeats):
                for name in contenders:
                    engine.release()  # the engine allocates its KV slab inside the timed call, as GRPO does
                    sync()
                    with _PeakMemory(dev) as mem:
                        t0 = time.perf_counter()
                        toks, ex = runners[name](greedy, NEW)
                        sync()
                        dt = time.perf_counter() - t0
                    peak[name] = max(peak[name], mem.peak)
                    if dt < best[name]:
                        best[name], extra[name], tokens[name] = dt, ex, toks
                    if name != "engine":  # prefill + first token of the same call
                        sync()
                        t0 = time.perf_counter()
                        runners[name](greedy, 1)
                        sync()
                        prefill[name] = min(prefill[name], time.perf_counter() - t0)
            for name in contenders:
                n_tok = sum(len(t) for t in tokens[name])
                ex = extra[name]
                if name == "engine":
                    pre, decode = ex.pop("prefill_s"), ex.pop("decode_s")
                    per_step = decode / max(1, ex["decode_steps"])
                else:
                    pre = prefill[name]
                    decode = max(0.0, best[name] - pre)
                    per_step = decode / max(1, max(len(t) for t in tokens[name]) - 1)
                res[name] = {"seconds": round(best[name], 4), "tokens": n_tok,
                             "tokens_per_s": round(n_tok / best[name], 1), "prefill_first_token_s": round(pre, 4),
                             "decode_s": round(decode, 4), "decode_ms_per_step": round(1000 * per_step, 2),
                             "peak_mem_mb": round(peak[name] / 2**20, 1),
                             "mean_len": round(n_tok / len(tokens[name]), 1), **ex}
            if "engine" in res:
                for other in ("static", "hf"):
                    if other in res:
                        res[f"engine_vs_{other}"] = round(res["engine"]["tokens_per_s"] / res[other]["tokens_per_s"], 2)
            if greedy and len(tokens) > 1:
                names = list(tokens)
                res["same_tokens"] = all(tokens[n] == tokens[names[0]] for n in names[1:])
            results[mode] = res
    finally:
        rt.shutdown()
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
