"""Qwen2.5-VL forward+backward throughput and MFU: m2mega (megatron-core) vs HF transformers, same run.

    python benchmarks/bench_model.py                      # cuda: 7B shape cut to 12 LM layers, 8k packed, bf16
    python benchmarks/bench_model.py --device cpu --tiny  # seconds on a laptop: keeps the script from rotting

Workload: one packed (THD) micro-batch of ``--seq`` tokens made of ``--samples`` samples, each with the
images of ``--images`` (e.g. 448x448 and 336x504 px) and random text filling it up; a masked next-token
loss; ``loss.backward()``. The vision tower runs on all images of the micro-batch (full depth by default).

Peer: ``Qwen2_5_VLForConditionalGeneration`` (sdpa attention) with the *same weights* (converted with
``m2mega.models.qwen25vl.sharding``) on the same samples as a right-padded batch (HF has no packed path
without flash-attn). Both losses are reported: they must agree to bf16 precision. ``--no-peer`` skips it.

FLOPs are counted explicitly (model FLOPs, not hardware FLOPs; no recompute credited):

* dense: ``6 * N * T`` with N the matmul parameters a token passes through: per LM layer
  ``h*(q+2kv) + q*h + 3*h*F`` plus the LM head ``h*V`` for the T LM tokens; per ViT layer ``h*3h + h*h +
  3*h*F_v`` plus the patch embedding for the P patches; the merger ``(4h)^2 + 4h*h_LM`` for the P/4 merged
  tokens;
* attention: ``3 * 4 * heads * head_dim * sum(len^2)`` per layer (QK^T and PV, forward + 2x backward), halved
  for the LM's causal mask; ViT segments are whole images on the full-attention layers and 112-px windows
  on the others.

MFU = FLOPs / time / peak, peak = dense bf16 of the GPU (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops``).
Writes ``benchmarks/results/bench_model_<device>[_tiny].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the repo's kernels/ must not shadow the PyPI package 'kernels' that
# transformers imports (m2mega installs it as m2mega.kernels).
sys.path.append(str(ROOT))


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny preset, short sequence (CPU smoke run)")
    p.add_argument("--preset", default="7b")
    p.add_argument("--lm-layers", type=int, help="LM layers kept (default 12 for 7b; all for tiny)")
    p.add_argument("--vit-layers", type=int, help="ViT layers kept (default: all)")
    p.add_argument("--seq", type=int, help="packed tokens per micro-batch (default 8192; 192 tiny)")
    p.add_argument("--samples", type=int, default=4, help="samples packed into the micro-batch")
    p.add_argument("--images", default=None, help="per-sample image sizes HxW, comma separated "
                   "(default 448x448,336x504; tiny 84x140,56x56)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--iters", type=int, help="timed iterations (default 10 cuda / 3 cpu)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 3 cuda / 1 cpu)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--no-peer", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--attn-backend", default=None, help="force PackedAttention backend (sdpa/torch_varlen/flash_attn)")
    p.add_argument("--out", help="output JSON path")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- FLOPs


def count_flops(cfg, lm_lens: list[int], grids: list[tuple[int, int, int]], vit_meta) -> dict[str, float]:
    t, v = cfg.text, cfg.vision
    T = sum(lm_lens)
    h, F, hd = t.hidden_size, t.intermediate_size, t.head_dim
    nq, nkv = t.num_attention_heads, t.num_key_value_heads
    lm_layer = h * (nq * hd + 2 * nkv * hd) + nq * hd * h + 3 * h * F
    lm_params = t.num_layers * lm_layer + h * t.vocab_size
    lm_dense = 6 * lm_params * T
    lm_attn = 3 * t.num_layers * 4 * nq * hd * sum(n * n for n in lm_lens) / 2
    P = sum(a * b * c for a, b, c in grids)
    vh, vF = v.hidden_size, v.intermediate_size
    vit_layer = vh * 3 * vh + vh * vh + 3 * vh * vF
    vit_dense = 6 * (v.depth * vit_layer + v.patch_dim * vh) * P
    merger_dense = 6 * (v.merger_hidden_size**2 + v.merger_hidden_size * v.out_hidden_size) * (P // 4)
    cu, _, cu_win, _ = vit_meta
    full_sq = sum(int(x) ** 2 for x in (cu[1:] - cu[:-1]))
    win_sq = sum(int(x) ** 2 for x in (cu_win[1:] - cu_win[:-1]))
    n_full = len(set(v.fullatt_block_indexes) & set(range(v.depth)))
    vit_attn = 3 * 4 * v.num_heads * v.head_dim * (n_full * full_sq + (v.depth - n_full) * win_sq)
    total = lm_dense + lm_attn + vit_dense + merger_dense + vit_attn
    return {"lm_dense": lm_dense, "lm_attn": lm_attn, "vit_dense": vit_dense, "merger_dense": merger_dense,
            "vit_attn": vit_attn, "total": total, "lm_tokens": T, "patches": P}


def _peak(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756e12
    if "H100" in name or "H200" in name or "H800" in name:
        return 989e12
    if "A100" in name:
        return 312e12
    return None


# --------------------------------------------------------------------------------------------- workload


def _workload(cfg, args):
    from m2mega.models.qwen25vl.hf_parity import synthetic_batch

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.images.split(",") if s]
    images = [list(sizes) for _ in range(args.samples)]
    base = synthetic_batch(cfg, images, seed=0)
    lens = [s.numel() for s in base.samples]
    per = args.seq // args.samples
    if min(per - n for n in lens) < 0:
        raise SystemExit(f"--seq {args.seq} over {args.samples} samples is too short for the images ({lens})")
    extra = [per - n for n in lens]
    extra[-1] += args.seq - per * args.samples
    batch = synthetic_batch(cfg, images, seed=0, extra_text=extra)
    assert sum(s.numel() for s in batch.samples) == args.seq
    return batch


def _timeit(step, iters, warmup, device):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --tiny)")
    if args.images is None:
        args.images = "84x140,56x56" if args.tiny else "448x448,336x504"
    args.seq = args.seq or (192 if args.tiny else 8192)
    args.iters = args.iters or (10 if device.type == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    import m2mega.runtime as rt
    from m2mega.models.qwen25vl import build_model, packed_seq_params_from_lengths, preset
    from m2mega.models.qwen25vl import attention as attn_mod
    from m2mega.models.qwen25vl.hf_parity import build_hf_model, randomize_
    from m2mega.models.qwen25vl.sharding import hf_to_mcore, load_full_into_model
    from m2mega.models.qwen25vl.vision import vision_metadata
    from m2mega.runtime.multiproc import free_port

    cfg = preset("tiny" if args.tiny else args.preset)
    lm_layers = args.lm_layers or (cfg.text.num_layers if args.tiny else min(12, cfg.text.num_layers))
    vit_layers = args.vit_layers or cfg.vision.depth
    cfg = cfg.replace(
        text=cfg.text.__class__(**{**cfg.text.__dict__, "num_layers": lm_layers}),
        vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "depth": vit_layers, "fullatt_block_indexes": tuple(
            i for i in cfg.vision.fullatt_block_indexes if i < vit_layers)}),
    )
    batch = _workload(cfg, args)
    lens = [s.numel() for s in batch.samples]
    grids = [tuple(g) for g in batch.image_grid_thw.tolist()]
    flops = count_flops(cfg, lens, grids, vision_metadata(batch.image_grid_thw))
    peak = _peak(args, device)

    rt.init(1, 1, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    torch.manual_seed(0)
    # Same random weights for both sides: HF parity model built on the device, converted to m2mega.
    with torch.device(device):
        hf = build_hf_model(cfg, seed=0, dtype=dtype) if not args.no_peer else None
    if hf is not None:
        full = hf_to_mcore(hf.state_dict(), cfg)
    # On GPU: initialise on the device and fuse bias+SwiGLU (megatron's jit kernel; no TE needed).
    fast = {"use_cpu_initialization": device.type == "cpu", "bias_activation_fusion": device.type == "cuda"}
    model = build_model(cfg, dtype, attn_backend=args.attn_backend, language_overrides=fast, vision_overrides=fast)
    if hf is not None:
        load_full_into_model(model, full, cfg)
        del full
    else:
        randomize_(model, seed=0, std=0.02)
    model.train()

    packed, _ = batch.packed()
    labels, lmask = batch.packed_labels()
    packed, labels, lmask = packed.to(device), labels.to(device), lmask.to(device)
    pv, grid = batch.pixel_values.to(device, dtype), batch.image_grid_thw.to(device)
    psp = packed_seq_params_from_lengths(lens, device=device)
    losses = {}

    def ours_step():
        model.zero_grad(set_to_none=True)
        per_tok = model(packed, pixel_values=pv, image_grid_thw=grid, packed_seq_params=psp, labels=labels)
        loss = (per_tok * lmask).sum() / lmask.sum()
        loss.backward()
        losses["ours"] = loss.item()

    probe = torch.zeros(1, 1, 1, device=device, dtype=dtype)
    backend = attn_mod._pick_backend(probe, args.attn_backend, 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = _timeit(ours_step, args.iters, args.warmup, device)
    mem_ours = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    results = {"ours": {"times_s": t_ours, "attn_backend": backend, "peak_mem_bytes": mem_ours}}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if hf is not None:
        hf.train()
        ids, am = batch.padded()
        hlabels, hmask = batch.padded_labels()
        ids, am, hlabels, hmask = ids.to(device), am.to(device), hlabels.to(device), hmask.to(device)
        mm = (ids == cfg.image_token_id).int()

        def hf_step():
            hf.zero_grad(set_to_none=True)
            logits = hf(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=grid,
                        mm_token_type_ids=mm).logits
            per_tok = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), hlabels.reshape(-1), reduction="none"
            )
            loss = (per_tok * hmask.reshape(-1)).sum() / hmask.sum()
            loss.backward()
            losses["hf"] = loss.item()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_hf = _timeit(hf_step, args.iters, args.warmup, device)
        results["hf_transformers"] = {
            "times_s": t_hf, "attn_backend": "sdpa (padded batch)",
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        }
    rt.shutdown()

    for name, r in results.items():
        med = statistics.median(r["times_s"])
        r["median_s"] = med
        r["lm_tokens_per_s"] = flops["lm_tokens"] / med
        r["tflops_per_s"] = flops["total"] / med / 1e12
        r["mfu"] = flops["total"] / med / peak if peak else None
        r["loss"] = losses.get("ours" if name == "ours" else "hf")
    out = {
        "command": "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "preset": cfg.name, "lm_layers": lm_layers, "vit_layers": vit_layers,
        "samples": args.samples, "seq": args.seq, "images": args.images, "patches": flops["patches"],
        "iters": args.iters, "warmup": args.warmup, "peak_flops": peak, "flops": flops, "results": results,
        "threads": torch.get_num_threads(),
    }
    print(f"{out['device']} {out['dtype']} preset={cfg.name} LM layers={lm_layers} ViT layers={vit_layers} "
          f"T={args.seq} patches={flops['patches']} model TFLOP/step={flops['total'] / 1e12:.3f}")
    print(f"{'impl':18s} {'median s':>10s} {'tokens/s':>12s} {'TFLOP/s':>9s} {'MFU':>7s} {'loss':>9s}  attention")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{name:18s} {r['median_s']:10.4f} {r['lm_tokens_per_s']:12.1f} {r['tflops_per_s']:9.3f} "
              f"{mfu:>7s} {r['loss']:9.5f}  {r['attn_backend']}")
    if "hf_transformers" in results:
        a, b = results["ours"]["loss"], results["hf_transformers"]["loss"]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        out["loss_rel_diff"] = abs(a - b) / abs(b)
        print(f"loss rel. difference ours vs HF: {out['loss_rel_diff']:.2e} (tolerance {tol:g})")
        if out["loss_rel_diff"] > tol:
            raise SystemExit("m2mega and HF losses disagree: the benchmark is not comparing the same model")
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"bench_model_{device.type}{'_tiny' if args.tiny else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
