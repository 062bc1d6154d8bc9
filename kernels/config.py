"""Process-wide switches for the fused kernels (torch fallback, input checks, backward slab size).

The trainer builds a :class:`KernelConfig` from its YAML (``kernels: {use_torch: true}``) and calls
:func:`set_kernel_config`; every call of ``fused_linear_logprob`` / ``fused_grpo_loss`` then reads it. The
environment variable ``M2MEGA_KERNELS_TORCH=1`` forces the torch counterparts too, so a suspected kernel
bug can be ruled out on an existing launch command without editing its config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["KernelConfig", "get_kernel_config", "set_kernel_config", "kernel_config", "triton_runs_on"]


def triton_runs_on(t) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: a GPU, or CPU under ``TRITON_INTERPRET=1``
    (CI). Otherwise (a plain CPU run such as the demo) the callers use the torch counterpart, which on CPU
    is also far faster than the numpy interpreter."""
    return t.device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Switches read by every fused-kernel call.

    use_torch: run the plain-torch counterparts instead of the Triton kernels (debugging; they
        materialise T x V logits, so expect the eager memory cost).
    check_inputs: validate target ids against the (global) vocabulary and raise naming the first bad
        index. Costs one device->host sync per call; turn off in production once the data path is trusted.
    bwd_slab_bytes: memory budget of the backward's recomputed dlogits slab (T x V_chunk in the input
        dtype). Smaller saves memory at the cost of more, smaller GEMMs; 256 MiB keeps every GEMM large
        enough for full tensor-core efficiency at H = 3584 while staying well under 10% of eager's peak.
    bwd_vocab_chunk: force the vocab chunk of the backward (rows of W per slab) instead of the budget.
    """

    use_torch: bool = False
    check_inputs: bool = True
    bwd_slab_bytes: int = 256 * 2**20
    bwd_vocab_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.bwd_slab_bytes <= 0:
            raise ValueError(f"KernelConfig.bwd_slab_bytes must be > 0, got {self.bwd_slab_bytes}")
        if self.bwd_vocab_chunk is not None and self.bwd_vocab_chunk <= 0:
            raise ValueError(f"KernelConfig.bwd_vocab_chunk must be > 0 or None, got {self.bwd_vocab_chunk}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "KernelConfig":
        """Build from a config mapping; unknown keys are an error naming the key (typos must not pass)."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown kernel config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


_CONFIG = KernelConfig()


def get_kernel_config() -> KernelConfig:
    """The active config, with ``M2MEGA_KERNELS_TORCH=1`` in the environment overriding use_torch."""
    if os.environ.get("M2MEGA_KERNELS_TORCH", "") == "1" and not _CONFIG.use_torch:
        return dataclasses.replace(_CONFIG, use_torch=True)
    return _CONFIG


def set_kernel_config(cfg: KernelConfig | Mapping[str, Any]) -> KernelConfig:
    """Install ``cfg`` process-wide; returns the previous config."""
    global _CONFIG
    prev = _CONFIG
    _CONFIG = cfg if isinstance(cfg, KernelConfig) else KernelConfig.from_dict(cfg)
    return prev


@contextlib.contextmanager
def kernel_config(**overrides: Any) -> Iterator[KernelConfig]:
    """Temporarily override fields: ``with kernel_config(use_torch=True): ...``."""
    prev = set_kernel_config(dataclasses.replace(_CONFIG, **overrides))
    try:
        yield _CONFIG
    finally:
        set_kernel_config(prev)
