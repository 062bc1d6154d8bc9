"""Missing optional GPU libraries (Transformer Engine, apex, flash-attn): one line each per job, not
megatron-core's per-rank, per-module warnings.

megatron-core warns from a dozen modules *at import time* ("Transformer Engine and Apex are not installed.
Falling back to ...", "Apex is not installed. Falling back to Torch Norm"), in every rank: a 2-rank CPU run
prints ~16 multi-line warnings that say the same two facts. :func:`quiet_fallback_warnings` drops exactly
those messages (and three other per-rank megatron-internal warnings, see ``_IGNORED``) (``m2mega/__init__.py``
calls it, because the root package is the one module guaranteed to load before any megatron import, in every
rank and tool), and :func:`announce_missing` states the facts once, from rank 0, when the runtime initialises.
Only the presence of the libraries is checked here (``find_spec``, no import): which kernels a call actually
uses is :mod:`m2mega.runtime.backends`' job.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import TextIO

__all__ = ["OPTIONAL_LIBRARIES", "missing_optional_libraries", "quiet_fallback_warnings", "announce_missing"]

# import name -> (what the user installs, what runs instead when it is missing)
OPTIONAL_LIBRARIES: dict[str, tuple[str, str]] = {
    "transformer_engine": ("Transformer Engine",
                           "megatron-core uses its local torch layers, optimizers and grad clipping"),
    "apex": ("apex", "megatron-core uses torch norms and multi-tensor fallbacks"),
    "flash_attn": ("flash-attn", "attention uses torch's varlen / SDPA kernels"),
}

# (message regex, category, module regex) of warnings every rank repeats and no user can act on:
_IGNORED: list[tuple[str, type[Warning], str]] = [
    # megatron-core's import-time fallbacks (megatron/core/{optimizer,models,distributed}/...): stated once
    # by announce_missing instead.
    (r"(Transformer Engine and Apex are|Apex is) not installed\.", UserWarning, ""),
    # megatron-core's own default cuda_graph_scope="full" warns about itself on every TransformerConfig.
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer"),
    # megatron-core's DDP / optimizer call torch's old collective names (torch warns from c10d_logger).
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed"),
    # megatron's grad-buffer code reads .grad of views; on CPU torch attributes that to our dispatch shim.
    (r"The \.grad attribute of a Tensor that is not a leaf", UserWarning, r"m2mega\.runtime\.cpu"),
]

_announced = False


def missing_optional_libraries() -> list[str]:
    """Import names from :data:`OPTIONAL_LIBRARIES` that are not installed."""
    missing = []
    for name in OPTIONAL_LIBRARIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def quiet_fallback_warnings() -> None:
    """Ignore megatron-core's "X is not installed. Falling back to ..." warnings and the other
    per-rank megatron-internal warnings in :data:`_IGNORED` (nothing else)."""
    for message, category, module in _IGNORED:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def announce_missing(stream: TextIO | None = None) -> list[str]:
    """Print ``note: <library> is not installed: <fallback>`` once per process for each missing library.

    Called by :func:`m2mega.runtime.init` on rank 0 only, so a job prints each line once. Returns the
    lines printed (empty on the second call).
    """
    global _announced
    if _announced:
        return []
    _announced = True
    lines = [f"note: {OPTIONAL_LIBRARIES[n][0]} is not installed: {OPTIONAL_LIBRARIES[n][1]}"
             for n in missing_optional_libraries()]
    out = sys.stderr if stream is None else stream
    for line in lines:
        print(line, file=out, flush=True)
    return lines
