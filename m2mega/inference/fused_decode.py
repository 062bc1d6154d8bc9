"""The fused CPU decode step of the rollout engine: when to use it, and its packed weights.

``m2mega._C.lm_decode_cpu`` (``csrc/lm_decode_cpu.cpp``) runs every layer of one decode step of
:class:`~m2mega.inference.stage.LMStage` on a :class:`~m2mega.inference.kv_cache.KVSlab` in one call: the
matmuls are ATen's (the same MKL calls as the torch path), the glue (RMSNorm, rotary fused with the KV
write, attention that skips a slot's masked slab columns) is hand-written. On the rollout bench (2-core AMD
EPYC, 32 rows of a 4-layer hidden-256 model) it made a decode step 1.31-1.36x and a whole ``generate``
1.24-1.31x faster with the same tokens: much of a decode step there was Python and small-op overhead, not
arithmetic (docs/generate.md).

The torch path (``LMStage._layers``) stays the reference and the fallback: everything the kernel does not
cover (CUDA, bf16, TP > 1, TP wider than the KV heads, a non-SiLU MLP, cascade attention) runs there.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_decode_available", "use_fused_decode", "FusedDecodeWeights"]

_SETTINGS = ("auto", "on", "off")


def fused_decode_available() -> bool:
    """True when the compiled extension has the fused decode (built from csrc/ by ``pip install -e .``)."""
    try:
        from m2mega import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    return hasattr(_C, "lm_decode_cpu")


def _unsupported(stage) -> Optional[str]:
    """Why ``stage`` cannot decode with the fused kernel (None: it can)."""
    if stage.device.type != "cpu":
        return f"a CPU model (this one is on {stage.device.type})"
    if stage.dtype != torch.float32:
        return f"fp32 weights (these are {stage.dtype})"
    if stage.tp > 1:
        return f"TP1 (this stage runs at TP{stage.tp}: its all-reduces sit between the layer's matmuls)"
    if stage.act is not F.silu:
        return f"a SwiGLU MLP (this model's activation is {getattr(stage.act, '__name__', stage.act)})"
    if not fused_decode_available():
        return "m2mega._C built with csrc/lm_decode_cpu.cpp (pip install --no-build-isolation -e .)"
    return None


def use_fused_decode(setting: str, stage, environ=None) -> bool:
    """Whether ``stage``'s decode steps on a KV slab run fused. ``M2MEGA_FUSED_DECODE`` (``auto``/``on``/
    ``off``) overrides ``setting``. ``auto``: wherever the kernel applies (CPU, fp32, TP1, SwiGLU, extension
    built); ``on`` where it cannot apply is an error naming why, not a silent fallback."""
    environ = os.environ if environ is None else environ
    s = (environ.get("M2MEGA_FUSED_DECODE") or setting or "auto").lower()
    if s not in _SETTINGS:
        raise ValueError(f"fused_decode must be auto, on or off, got {s!r}")
    if s == "off":
        return False
    why = _unsupported(stage)
    if why is not None and s == "on":
        raise ValueError(f"fused_decode=on needs {why}")
    return why is None


class FusedDecodeWeights:
    """The flat weight list the kernel reads: per layer (ln1, wqkv^T, bqkv, wproj^T, bproj, ln2, wfc1^T,
    bfc1, wfc2^T, bfc2), matmul weights as the ``[in, out]`` copies ``LMStage.pack_weights`` takes (absent
    biases as empty tensors), plus the final norm and output layer on the last stage."""

    def __init__(self, stage) -> None:
        empty = torch.empty(0, dtype=stage.dtype, device=stage.device)

        def plain(t: Optional[Tensor]) -> Tensor:
            return empty if t is None else t.detach()

        self.flat: list[Tensor] = []
        for L in stage.layers:
            wqkv, wproj, wfc1, wfc2 = L.t
            self.flat += [plain(L.ln1), wqkv, plain(L.bqkv), wproj, plain(L.bproj), plain(L.ln2), wfc1,
                          plain(L.bfc1), wfc2, plain(L.bfc2)]
        self.final_ln = plain(stage.final_ln) if stage.last else empty
        self.out_t = stage.out_t if stage.last else empty

    def decode(self, stage, x: Tensor, cache_pos: Tensor, rope_pos: Tensor, slab, span: int) -> Tensor:
        """``x [n, hidden]`` -> logits ``[n, padded vocab]`` on the last stage, else the hidden states."""
        from m2mega import _C  # type: ignore[attr-defined]

        rot = stage.rotary
        return _C.lm_decode_cpu(x, rot.cos, rot.sin, rope_pos, self.flat, slab.k, slab.v, cache_pos, slab.mask,
                                span, stage.groups, stage.qpg, stage.eps, stage.scale, self.final_ln, self.out_t)
