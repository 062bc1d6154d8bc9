"""Roofline lower bounds for the fused kernels on an H100 SXM: FLOPs and HBM bytes per call, and the time
no implementation can beat, so a measured time has something to be compared with.

    time >= max(FLOPs / matmul rate, HBM bytes / HBM bandwidth)

Two matmul rates: the 989 TFLOP/s dense bf16 datasheet figure, and ~800 TFLOP/s, what large bf16 GEMMs
reach on Hopper in practice (cuBLAS / Triton tutorial numbers, 790-800); "% of roofline" in the benchmarks
is against the measured rate. fp32 inputs take the exact-fp32 FMA path (``DOT_MODE=1``, no TF32), so
they are bounded by the 67 TFLOP/s CUDA-core rate.

Byte counts are lower bounds: every operand read once and every output written once, i.e. perfect L2
reuse of W across row blocks (what the GROUP_T super-grouping aims at). The counts follow the launches in
``kernels/fused_linear_logprob.py`` (vocab chunking of the backward included) and
``kernels/fused_grpo_loss.py`` (one program per sequence, one pass each way).

``python benchmarks/roofline.py`` prints the table for the production shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["Device", "H100_SXM", "Cost", "linear_logprob_costs", "grpo_loss_costs", "production_table"]


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops_spec: float  # dense tensor-core bf16, datasheet
    bf16_flops_measured: float  # what large bf16 GEMMs reach in practice
    fp32_flops: float  # non-tensor fp32 FMA (the exact-fp32 kernel path)
    hbm_bytes_per_s: float


H100_SXM = Device("NVIDIA H100 SXM5 80GB", 989e12, 800e12, 67e12, 3.35e12)


@dataclass(frozen=True)
class Cost:
    """One call's work. ``tensor_core`` tells which FLOP rate bounds it."""

    flops: float
    hbm_bytes: float
    tensor_core: bool = True

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes, self.tensor_core and other.tensor_core)

    def bound_s(self, dev: Device = H100_SXM, measured: bool = True) -> float:
        """Lower-bound seconds: the larger of compute time and HBM time."""
        rate = (dev.bf16_flops_measured if measured else dev.bf16_flops_spec) if self.tensor_core else dev.fp32_flops
        return max(self.flops / rate, self.hbm_bytes / dev.hbm_bytes_per_s)

    def summary(self, dev: Device = H100_SXM) -> dict[str, float | bool | str]:
        compute = self.flops / (dev.bf16_flops_measured if self.tensor_core else dev.fp32_flops)
        memory = self.hbm_bytes / dev.hbm_bytes_per_s
        return {
            "flops": self.flops,
            "hbm_bytes": self.hbm_bytes,
            "arithmetic_intensity": self.flops / self.hbm_bytes if self.hbm_bytes else float("inf"),
            "bound": "compute" if compute >= memory else "memory",
            "lower_bound_ms_measured_rate": self.bound_s(dev, True) * 1e3,
            "lower_bound_ms_spec_rate": self.bound_s(dev, False) * 1e3,
        }


def _chunks(V: int, T: int, itemsize: int, slab_bytes: int) -> list[tuple[int, int]]:
    # The backward's vocab chunking, from the kernel module itself so the model cannot drift from it.
    from m2mega.kernels.config import KernelConfig
    from m2mega.kernels.fused_linear_logprob import _vocab_chunks

    return _vocab_chunks(V, T, itemsize, KernelConfig(bwd_slab_bytes=slab_bytes))


def linear_logprob_costs(T: int, H: int, V: int, itemsize: int = 2, with_entropy: bool = False,
                         slab_bytes: int = 256 * 2**20) -> dict[str, Cost]:
    """Per-launch and total costs of ``fused_linear_logprob`` (one TP rank: V is the local vocab)."""
    tc = itemsize < 4
    gemm = 2.0 * T * H * V
    n_vb = -(-V // 128)  # partial-statistics rows (MIN_BLOCK_V on GPU)
    nstat = 3 if with_entropy else 2
    h_b, w_b = T * H * itemsize, V * H * itemsize
    fwd = Cost(gemm, h_b + w_b + T * 8 + n_vb * T * 4 * nstat + T * 4, tc)
    chunks = _chunks(V, T, itemsize, slab_bytes)
    per_row = 4 * (3 if with_entropy else 2)  # lse, g_lp (+ g_ent, ebar) read per row, per chunk
    dlogits = Cost(gemm, len(chunks) * (h_b + T * (8 + per_row)) + w_b + T * V * itemsize, tc)
    grad_w = Cost(gemm, T * V * itemsize + len(chunks) * h_b + V * H * itemsize, tc)  # d^T @ h per chunk
    # grad_h (fp32) is read and written once per chunk except the first (no read).
    grad_h = Cost(gemm, T * V * itemsize + w_b + (2 * len(chunks) - 1) * T * H * 4, tc)
    out = {"fwd_stats": fwd, "bwd_dlogits": dlogits, "bwd_grad_weight_mm": grad_w, "bwd_grad_hidden_mm_acc": grad_h}
    out["fwd"] = fwd
    out["bwd"] = dlogits + grad_w + grad_h
    out["fwd_bwd"] = out["fwd"] + out["bwd"]
    # What a model-FLOPs count credits (3 GEMMs: forward, grad_hidden, grad_weight; no recompute) and the
    # bytes any implementation must move (inputs in, gradients out).
    out["model_fwd_bwd"] = Cost(3 * gemm, 2 * (h_b + w_b) + T * 12, tc)
    return out


def grpo_loss_costs(T: int, B: int, logp_bytes: int = 4, mask_bytes: int = 1, has_ref: bool = True,
                    adv_token: bool = False, has_weights: bool = True) -> dict[str, Cost]:
    """``fused_grpo_loss`` over T tokens in B sequences: memory-bound streams of per-token inputs."""
    per_tok = logp_bytes * (2 + int(has_ref)) + mask_bytes + (4 if adv_token else 0)
    per_seq = 16 + (0 if adv_token else 4) + (4 if has_weights else 0)  # starts, lens, adv, weight
    flops_tok = 30.0  # exp, clip, min/max, k3 and 9 running sums: noise next to the bytes
    fwd = Cost(flops_tok * T, T * per_tok + B * (per_seq + 9 * 4), tensor_core=False)
    bwd = Cost(flops_tok * T, T * (per_tok + logp_bytes) + B * (per_seq + 4), tensor_core=False)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


PRODUCTION = {"T": (4096, 16384), "H": 3584, "V": 152064, "TP": (1, 2, 4, 8)}


def production_table(dev: Device = H100_SXM) -> list[dict]:
    """Rows for every production shape: kernel, launch, T, H, V_local, TP, dtype and the cost summary."""
    rows = []
    for T in PRODUCTION["T"]:
        for tp in PRODUCTION["TP"]:
            V = PRODUCTION["V"] // tp
            for dtype, size in (("bf16", 2), ("fp32", 4)):
                for ent in (False, True):
                    for launch, cost in linear_logprob_costs(T, PRODUCTION["H"], V, size, ent).items():
                        rows.append({"kernel": "fused_linear_logprob", "launch": launch, "T": T, "H": PRODUCTION["H"],
                                     "V_local": V, "TP": tp, "dtype": dtype, "entropy": ent, **cost.summary(dev)})
        B = T // 1024
        for launch, cost in grpo_loss_costs(T, B).items():
            rows.append({"kernel": "fused_grpo_loss", "launch": launch, "T": T, "B": B, "dtype": "fp32",
                         **cost.summary(dev)})
    return rows


def main() -> None:
    print(json.dumps({"device": asdict(H100_SXM), "rows": production_table()}, indent=1))


if __name__ == "__main__":
    main()
