"""Which attention and RMSNorm implementation a call uses: one rule, tested on CPU by forcing its inputs.

The GPU machines this stack meets may lack Transformer Engine and flash-attn, so the paths they take must
be the fast torch-native ones, and a CPU test must be able to prove which path a given GPU would take.
Everything the choice depends on is an explicit :class:`Environment` (device type, compute capability,
which libraries import); :func:`select_backends` is a pure function of it, the dtype, dropout and the
overrides. ``Environment.of(tensor)`` fills it in for real calls.

Attention (packed THD and per-window vision attention, see ``models/qwen25vl/attention.py``):

1. ``M2MEGA_ATTN_BACKEND`` / a spec's ``backend`` forces one (an unavailable one is an error, not a
   silent fallback);
2. CUDA, fp16/bf16, sm80+: ``flash_attn`` (``flash_attn_varlen_func``) when installed, else
   ``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``, torch's FlashAttention-2 kernels, no
   dropout) when this torch has it;
3. otherwise ``sdpa``: ``scaled_dot_product_attention`` over block-diagonal chunks (CPU, fp32, old GPUs).

This mirrors megatron-core's own choice (TE's fused attention when the TE spec is used, else the local
``DotProductAttention``), with torch's varlen kernel as the THD path megatron's local spec lacks.

RMSNorm: ``torch_fused`` (``torch.nn.functional.rms_norm``, one fused kernel on CUDA) on CUDA where torch
has it, else ``hf_formula`` (the explicit fp32 formula). Both round like HF Qwen2
(``w * normalised.to(dtype)``): ``F.rms_norm`` on a half input normalises in fp32 and casts once, which is
HF's ``h.to(dtype)``; the weight multiply stays outside. ``M2MEGA_NORM_BACKEND`` forces one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["Environment", "Backends", "select_backends", "ATTENTION_BACKENDS", "NORM_BACKENDS"]

ATTENTION_BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
NORM_BACKENDS = ("torch_fused", "hf_formula")
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _has_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "not available"
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


@dataclass(frozen=True)
class Environment:
    """The inputs of the selection rule."""

    device_type: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability, None off CUDA
    flash_attn: bool = False
    torch_varlen: bool = False
    fused_rms_norm: bool = False

    @classmethod
    def of(cls, t: torch.Tensor) -> "Environment":
        """This process's environment for tensor ``t``'s device (cached lookups: cheap per call)."""
        cuda = t.device.type == "cuda"
        return cls(
            device_type=t.device.type,
            capability=_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
            if cuda else None,
            flash_attn=_has_flash_attn(),
            torch_varlen=_has_torch_varlen(),
            fused_rms_norm=hasattr(torch.nn.functional, "rms_norm"),
        )


@dataclass(frozen=True)
class Backends:
    attention: str
    rms_norm: str


def _forced(value: str | None, env_var: str) -> str:
    return value or os.environ.get(env_var, "") or "auto"


def select_backends(env: Environment, dtype: torch.dtype, dropout_p: float = 0.0, *, attention: str | None = None,
                    rms_norm: str | None = None) -> Backends:
    """The attention and norm backends for a call on ``env`` with activations of ``dtype``.

    ``attention`` / ``rms_norm`` force a backend (default: ``M2MEGA_ATTN_BACKEND`` /
    ``M2MEGA_NORM_BACKEND``, ``auto`` when unset). A forced backend that cannot run here raises
    ``RuntimeError`` naming it and the reason.
    """
    on_gpu = env.device_type == "cuda"
    sm80 = on_gpu and env.capability is not None and tuple(env.capability) >= (8, 0)
    flash_ok = env.flash_attn and sm80 and dtype in _HALF
    varlen_ok = env.torch_varlen and sm80 and dtype in _HALF and dropout_p == 0.0

    attn = _forced(attention, "M2MEGA_ATTN_BACKEND")
    if attn == "auto":
        attn = "flash_attn" if flash_ok else "torch_varlen" if varlen_ok else "sdpa"
    elif attn not in ATTENTION_BACKENDS:
        raise RuntimeError(f"unknown attention backend {attn!r}; known: auto, {', '.join(ATTENTION_BACKENDS)}")
    elif attn == "flash_attn" and not flash_ok:
        why = "flash-attn is not installed" if not env.flash_attn else "it needs CUDA sm80+ and fp16/bf16"
        raise RuntimeError(f"attention backend 'flash_attn' was requested but {why} ({env}, {dtype})")
    elif attn == "torch_varlen" and not varlen_ok:
        why = ("this torch has no torch.nn.attention.varlen" if not env.torch_varlen
               else "it needs CUDA sm80+, fp16/bf16 and no dropout")
        raise RuntimeError(f"attention backend 'torch_varlen' was requested but {why} ({env}, {dtype}, "
                           f"dropout {dropout_p})")

    norm = _forced(rms_norm, "M2MEGA_NORM_BACKEND")
    if norm == "auto":
        norm = "torch_fused" if (on_gpu and env.fused_rms_norm) else "hf_formula"
    elif norm not in NORM_BACKENDS:
        raise RuntimeError(f"unknown RMSNorm backend {norm!r}; known: auto, {', '.join(NORM_BACKENDS)}")
    elif norm == "torch_fused" and not env.fused_rms_norm:
        raise RuntimeError("RMSNorm backend 'torch_fused' was requested but this torch has no "
                           "torch.nn.functional.rms_norm")
    return Backends(attn, norm)
