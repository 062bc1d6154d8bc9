"""Benchmark: m2mega vision packing vs HF's Qwen2-VL image processors, same images, same run.

Contenders (each gets the same decoded uint8 HWC images, already in memory):
  - hf_slow      HF Qwen2VLImageProcessorPil (the slow processor: PIL resize + numpy), use_fast=False
  - hf_fast      HF Qwen2VLImageProcessor (torchvision backend) when torchvision is importable
  - m2mega_ext   m2mega.ops.pack_images(backend="ext"), fp32 and bf16 (CPU; CUDA too when available)
  - m2mega_torch the plain-torch reference (pack_images(backend="torch"))

Runs are interleaved (every contender once per round) and the best and median of the rounds are
reported, because the CPU may be shared with other jobs. images/s counts input images; MB/s counts
input megabytes (uint8 H*W*3 per frame) per second; out_MB/s counts pixel_values bytes produced.
On CUDA it also reports the kernels' share of the measured device memory bandwidth: (bytes read +
bytes written, counting inputs, the uint8 intermediate and the output) / time, over the bandwidth of a
large device-to-device copy.

  python benchmarks/bench_vision_pack.py --num-images 256 --json benchmarks/results/cpu_vision_pack.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from m2mega.ops import pack_images
from m2mega.ops import vision_pack as vp


def make_images(n: int, lo: int, hi: int, seed: int) -> list[np.ndarray]:
    """Mixed resolutions, sides uniform in [lo, hi]; smooth content plus noise (JPEG-like statistics do
    not matter for the cost, which is set by the sizes)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.sin(yy / 17.0)[..., None] * 80 + np.cos(xx / 23.0)[..., None] * 80 + 128
        images.append(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("transformers", "PIL", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    import m2mega

    out["m2mega"] = m2mega.__version__
    out["m2mega_ext"] = vp.extension_available()
    out["m2mega_ext_cuda"] = vp.extension_has_cuda()
    return out


def measure(contenders: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up (imports, allocator, page cache)
        fn()
        sync()
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: list[float], n_images: int, in_bytes: int, out_bytes: int) -> dict:
    best, med = min(times), statistics.median(times)
    return {
        "seconds_best": best,
        "seconds_median": med,
        "rounds": len(times),
        "images_per_s": n_images / best,
        "images_per_s_median": n_images / med,
        "MB_per_s": in_bytes / best / 1e6,
        "out_MB_per_s": out_bytes / best / 1e6,
    }


def _one_thread(fn: Callable[[], object]) -> object:
    """Run fn with torch (and so the extension's OpenMP loop) limited to one thread: per-core cost."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes moved (read + written) per second by a large device-to-device copy."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--min-side", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--torch-ref-rounds", type=int, default=1, help="the torch reference is slow; 0 skips it")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads for m2mega (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    images = make_images(args.num_images, args.min_side, args.max_side, args.seed)
    tensors = [torch.from_numpy(a) for a in images]
    in_bytes = sum(a.nbytes for a in images)
    result: dict = {
        "benchmark": "vision_pack",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
        "versions": versions(),
        "config": {"num_images": args.num_images, "sides": [args.min_side, args.max_side], "seed": args.seed,
                   "min_pixels": vp.DEFAULT_MIN_PIXELS, "max_pixels": vp.DEFAULT_MAX_PIXELS,
                   "m2mega_threads": torch.get_num_threads(), "rounds": args.rounds,
                   "hf_threads": "1 (PIL resize + numpy, per image, in Python)"},
        "input_MB": in_bytes / 1e6,
        "cpu": {},
    }

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf_slow = Qwen2VLImageProcessorPil()
    hf_kwargs = dict(return_tensors="pt", input_data_format="channels_last")
    contenders: dict[str, Callable[[], object]] = {"hf_slow": lambda: hf_slow(images=images, **hf_kwargs)}
    try:
        import torchvision  # noqa: F401
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        hf_fast = Qwen2VLImageProcessor()
        tensors_chw = [t.permute(2, 0, 1) for t in tensors]
        contenders["hf_fast"] = lambda: hf_fast(images=tensors_chw, return_tensors="pt")
    except ImportError:
        result["hf_fast"] = "unavailable: torchvision is not installed"
    if vp.extension_available():
        contenders["m2mega_ext_fp32"] = lambda: pack_images(tensors, backend="ext")
        contenders["m2mega_ext_bf16"] = lambda: pack_images(tensors, backend="ext", dtype=torch.bfloat16)
        if torch.get_num_threads() > 1:
            contenders["m2mega_ext_fp32_1thread"] = lambda: _one_thread(lambda: pack_images(tensors, backend="ext"))
    else:
        result["m2mega_ext"] = "unavailable: m2mega._C not built"

    # correctness in the same run: ours must equal HF bit for bit
    hf_out = hf_slow(images=images, **hf_kwargs)
    ours = pack_images(tensors)
    result["bit_exact_vs_hf_slow"] = bool(torch.equal(ours.pixel_values, hf_out["pixel_values"])
                                          and torch.equal(ours.grid_thw, hf_out["image_grid_thw"]))
    num_patches = int(hf_out["pixel_values"].shape[0])
    result["num_patches"] = num_patches
    out_bytes = {"fp32": num_patches * 1176 * 4, "bf16": num_patches * 1176 * 2}
    del hf_out, ours

    times = measure(contenders, args.rounds, sync=lambda: None)
    for name, ts in times.items():
        result["cpu"][name] = summarise(ts, args.num_images, in_bytes, out_bytes["bf16" if "bf16" in name else "fp32"])
    if args.torch_ref_rounds > 0:  # slow: timed without a warm-up round
        ts = []
        for _ in range(args.torch_ref_rounds):
            t0 = time.perf_counter()
            pack_images(tensors, backend="torch")
            ts.append(time.perf_counter() - t0)
        result["cpu"]["m2mega_torch_fp32"] = summarise(ts, args.num_images, in_bytes, out_bytes["fp32"])
    base = result["cpu"]["hf_slow"]["seconds_best"]
    base_med = result["cpu"]["hf_slow"]["seconds_median"]
    result["cpu_speedup_vs_hf_slow"] = {
        k: {"best": base / v["seconds_best"], "median": base_med / v["seconds_median"]}
        for k, v in result["cpu"].items() if k != "hf_slow"
    }

    if torch.cuda.is_available() and vp.extension_has_cuda():
        dev = torch.device("cuda")
        t0 = time.perf_counter()
        gpu_tensors = [t.to(dev) for t in tensors]
        torch.cuda.synchronize()
        upload = time.perf_counter() - t0
        gpu = {"device": torch.cuda.get_device_name(dev), "upload_seconds": upload}
        g_contenders = {
            "m2mega_ext_fp32": lambda: pack_images(gpu_tensors, backend="ext"),
            "m2mega_ext_bf16": lambda: pack_images(gpu_tensors, backend="ext", dtype=torch.bfloat16),
        }
        g_times = measure(g_contenders, max(args.rounds, 10), sync=torch.cuda.synchronize)
        ref = pack_images(tensors, backend="ext")
        gpu["bit_exact_vs_cpu"] = bool(torch.equal(pack_images(gpu_tensors, backend="ext").pixel_values.cpu(),
                                                   ref.pixel_values))
        # bytes the kernels touch: inputs once, the uint8 stage-1 intermediate written and read, output
        tmp_bytes = 0
        for a in images:
            h, w = a.shape[:2]
            oh, ow = vp.smart_resize(h, w)
            if oh != h and ow != w:
                tmp_bytes += 3 * (oh * w if (h - oh) > 0 and (h - oh) > 2 * (w - ow) else h * ow)
        bw = copy_bandwidth(dev)
        gpu["copy_bandwidth_GB_per_s"] = bw / 1e9
        for name, ts in g_times.items():
            ob = out_bytes["bf16" if "bf16" in name else "fp32"]
            s = summarise(ts, args.num_images, in_bytes, ob)
            moved = in_bytes + 2 * tmp_bytes + ob
            s["bytes_moved"] = moved
            s["pct_of_copy_bandwidth"] = 100.0 * moved / s["seconds_best"] / bw
            s["speedup_vs_hf_slow_cpu"] = base / s["seconds_best"]
            gpu[name] = s
        result["gpu"] = gpu

    result["host"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
