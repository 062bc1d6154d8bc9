"""Fused linear log-prob and linear + GRPO loss: time, peak memory and % of the bf16 matmul roofline,
against the torch eager reference, torch.compile of the reference and Liger-Kernel, all in one run.

    python benchmarks/bench_kernels.py --device cuda     # T in {4096, 16384}, H=3584, V=152064, bf16
    python benchmarks/bench_kernels.py --device cpu      # Triton interpreter, tiny shapes (keeps it from rotting)

Writes ``benchmarks/results/<device>.json`` (``cpu_kernels.json`` on CPU). Liger-Kernel is imported
optionally; on a device without network, carry its wheel (``pip download liger-kernel --no-deps -d .whl``,
then ``pip install --no-deps .whl/liger_kernel-*.whl`` there).

Benchmarks (each method runs the same math on the same inputs; outputs are checked against eager):
* ``logprob``: logprob[T] of the targets; ``fwd`` under no_grad, ``fwd+bwd`` = backward of -sum(logprob)
  (Liger: ``LigerFusedLinearCrossEntropyLoss(reduction="sum")``, the same quantity).
* ``grpo``: logprob -> GRPO/DAPO loss (clip 0.2/0.28, beta 0.04, token mean), ``fwd+bwd``
  (Liger: ``LigerFusedLinearGRPOLoss``).

Memory: ``peak_extra_bytes`` = peak allocated during the call minus what was allocated before it (inputs);
``work_bytes`` = that minus the gradients every method must return (grad_hidden + grad_weight), i.e. the
temporary working memory, which is what the "< 10% of eager" target is about. Roofline: model FLOPs
(2·T·H·V forward, 3x that forward+backward) over the best torch.mm bf16 rate measured on this device at
the same shapes; our backward also recomputes the logits (one extra 2·T·H·V), which the model FLOPs
deliberately do not credit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--tokens", type=int, nargs="*", help="T values (default: 4096 16384 on cuda, 37 on cpu)")
    p.add_argument("--hidden", type=int, help="H (default 3584 cuda / 48 cpu)")
    p.add_argument("--vocab", type=int, help="V (default 152064 cuda / 403 cpu)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 10 cuda / 1 cpu)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first (default 3 cuda / 1 cpu)")
    p.add_argument("--methods", nargs="*", default=["eager", "compile", "liger", "ours"])
    p.add_argument("--benches", nargs="*", default=["logprob", "grpo"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on small CPUs)")
    p.add_argument("--out", type=str, help="output JSON (default benchmarks/results/<device>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ measurement


class Meter:
    """Device-specific timing (CUDA events / perf_counter) and peak memory (CUDA allocator; None on CPU)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def run(self, fn, reps, warmup):
        torch = self.torch
        for _ in range(warmup):
            fn()
        self.sync()
        times, peaks = [], []
        for _ in range(reps):
            if self.cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
                peaks.append(torch.cuda.max_memory_allocated() - base)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), (max(peaks) if peaks else None)


def matmul_rate(meter, T, H, V, dtype, device):
    """Best measured torch.mm TFLOP/s at this benchmark's GEMM shapes (logits and both backward GEMMs)."""
    torch = meter.torch
    Vc = min(V, 32768)
    a = torch.randn(T, H, device=device, dtype=dtype)
    b = torch.randn(Vc, H, device=device, dtype=dtype)
    d = torch.randn(T, Vc, device=device, dtype=dtype)
    best = 0.0
    for fn in (lambda: a @ b.t(), lambda: d @ b, lambda: d.t() @ a):
        ms, _ = meter.run(fn, reps=5 if meter.cuda else 1, warmup=2 if meter.cuda else 0)
        best = max(best, 2 * T * H * Vc / (ms * 1e-3) / 1e12)
    return best


# ------------------------------------------------------------------------------------------ methods


def _inputs(torch, T, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * 0.5).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (T,), generator=g).to(device)
    return h, w, y


def _grpo_data(torch, T, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    L = min(T, 1024)
    B = T // L
    if B * L != T:
        raise ValueError(f"grpo bench packs T into sequences of 1024: T={T} must be <= 1024 or a multiple of it")
    old = (torch.randn(B, L, generator=g) * 0.2 - 2.0).to(device)
    ref = (torch.randn(B, L, generator=g) * 0.2 - 2.0).to(device)
    adv = torch.randn(B, generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) > 0.1).to(device)
    return B, L, old, ref, adv, mask


def build(method, bench, mode, torch, h, w, y, grpo, compile_ok):
    """Return (callable running one step, callable returning the comparable output) or raise Unavailable."""
    from m2mega.kernels import fused_grpo_loss, fused_linear_logprob, grpo_loss_torch, linear_logprob_torch

    fwd_only = mode == "fwd"
    hh = h.detach().requires_grad_(not fwd_only)
    ww = w.detach().requires_grad_(not fwd_only)
    out = {}

    if method in ("eager", "ours", "compile"):
        lp_fn = {"eager": linear_logprob_torch, "ours": fused_linear_logprob}.get(method)
        loss_fn = {"eager": grpo_loss_torch, "ours": fused_grpo_loss}.get(method)
        if method == "compile":
            if not compile_ok:
                raise Unavailable("skipped (--no-compile)")
            lp_fn = torch.compile(linear_logprob_torch, dynamic=False)
            loss_fn = grpo_loss_torch  # elementwise on [T]: the compiled log-prob part dominates

        def step():
            hh.grad, ww.grad = None, None
            if fwd_only:
                with torch.no_grad():
                    out["v"] = lp_fn(hh, ww, y).sum()  # scalar: comparable with Liger's summed CE
                return
            lp = lp_fn(hh, ww, y)
            if bench == "logprob":
                loss = -lp.sum()
            else:
                B, L, old, ref, adv, mask = grpo
                loss, _ = loss_fn(lp.view(B, L), old, ref, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.04)
            loss.backward()
            out["v"] = loss.detach()

    elif method == "liger":
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not here"
            raise Unavailable(f"unavailable: {type(e).__name__}: {e}") from None
        if h.device.type != "cuda":
            raise Unavailable("unavailable: Liger-Kernel needs CUDA")
        if bench == "logprob":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            mod = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def step():
                hh.grad, ww.grad = None, None
                if fwd_only:
                    with torch.no_grad():
                        out["v"] = -mod(ww.detach(), hh.detach(), y)
                    return
                loss = mod(ww, hh, y)
                loss.backward()
                out["v"] = loss.detach()
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            B, L, old, ref, adv, mask = grpo
            mod = LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                                           use_ref_model=True)

            def step():
                hh.grad, ww.grad = None, None
                res = mod(hh.view(B, L, -1), ww, y.view(B, L), mask.long(), adv, ref_per_token_logps=ref,
                          old_per_token_logps=old)
                loss = res[0] if isinstance(res, tuple) else res
                loss.backward()
                out["v"] = loss.detach()
    else:
        raise ValueError(f"unknown method {method}")
    return step, lambda: out["v"]


class Unavailable(Exception):
    pass


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = _parse(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    cuda = args.device == "cuda"
    T_list = args.tokens or ([4096, 16384] if cuda else [37])
    H = args.hidden or (3584 if cuda else 48)
    V = args.vocab or (152064 if cuda else 403)
    reps = args.reps or (10 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    dtype = torch.bfloat16
    dev_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    meter = Meter(args.device)
    out_path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" /
        (re.sub(r"[^a-z0-9]+", "_", dev_name.lower()).strip("_") + ".json" if cuda else "cpu_kernels.json"))

    report = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": {"H": H, "V": V, "dtype": str(dtype).replace("torch.", ""), "T": T_list},
        "matmul_tflops": {},
        "results": [],
    }
    for T in T_list:
        rate = matmul_rate(meter, T, H, V, dtype, args.device)
        report["matmul_tflops"][str(T)] = round(rate, 3)
        h, w, y = _inputs(torch, T, H, V, dtype, args.device)
        grpo = _grpo_data(torch, T, args.device)
        grad_bytes = (h.numel() + w.numel()) * h.element_size()
        for bench in args.benches:
            modes = ["fwd", "fwd+bwd"] if bench == "logprob" else ["fwd+bwd"]
            for mode in modes:
                eager_row, eager_val = None, None
                for method in args.methods:
                    row = {"bench": bench, "T": T, "H": H, "V": V, "mode": mode, "method": method}
                    try:
                        step, value = build(method, bench, mode, torch, h, w, y, grpo, not args.no_compile)
                        ms, peak = meter.run(step, reps, warmup)
                        val = value().float()
                        row.update(status="ok", time_ms=round(ms, 4))
                        if peak is not None:
                            row["peak_extra_bytes"] = int(peak)
                            row["work_bytes"] = int(peak - (grad_bytes if mode == "fwd+bwd" else 0))
                        flops = 2 * T * H * V * (1 if mode == "fwd" else 3)
                        row["model_tflops"] = round(flops / (ms * 1e-3) / 1e12, 4)
                        row["pct_roofline"] = round(100 * row["model_tflops"] / rate, 2) if rate else None
                        if method == "eager":
                            eager_row, eager_val = row, val
                        elif eager_val is not None:
                            err = float((val - eager_val).norm() / eager_val.norm().clamp_min(1e-30))
                            row["rel_err_vs_eager"] = float(f"{err:.3e}")
                            row["speedup_vs_eager"] = round(eager_row["time_ms"] / ms, 3)
                            if peak is not None and eager_row.get("work_bytes"):
                                row["work_frac_of_eager"] = round(row["work_bytes"] / eager_row["work_bytes"], 4)
                                row["peak_frac_of_eager"] = round(peak / eager_row["peak_extra_bytes"], 4)
                        del step, value
                    except Unavailable as e:
                        row.update(status=str(e))
                    except torch.cuda.OutOfMemoryError:
                        row.update(status="oom")
                    except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
                        row.update(status="error", error=f"{type(e).__name__}: {e}",
                                   traceback=traceback.format_exc(limit=4))
                    if cuda:
                        torch.cuda.empty_cache()
                    report["results"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        del h, w, y, grpo
    # Cross-method comparisons that the targets name: ours vs Liger.
    for row in report["results"]:
        if row["method"] == "ours" and row.get("status") == "ok":
            lig = [r for r in report["results"] if r["method"] == "liger" and r.get("status") == "ok"
                   and (r["bench"], r["T"], r["mode"]) == (row["bench"], row["T"], row["mode"])]
            if lig:
                row["speedup_vs_liger"] = round(lig[0]["time_ms"] / row["time_ms"], 3)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    # Appended, not prepended: the repo's kernels/ must not shadow the PyPI package 'kernels' that
    # transformers imports (m2mega installs it as m2mega.kernels).
    sys.path.append(str(ROOT))
    main()
