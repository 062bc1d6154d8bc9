"""Every workaround for a megatron-core limitation or bug, in one place, each with the version it is for.

megatron-core is pinned at 0.16.1 (the last release for Python 3.11). Bumping it means re-checking each entry
here (the tests named in each docstring catch a regression). The CPU/gloo shim that maps megatron's
hard-coded CUDA calls to CPU is the other compat layer and lives in :mod:`m2mega.runtime.cpu`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core.optimizer import ChainedOptimizer, DistributedOptimizer
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

__all__ = ["MEGATRON_CORE_VERSION", "ensure_adam_state", "restore_adam_steps", "output_layer_skipped"]

MEGATRON_CORE_VERSION = "0.16.1"  # what every workaround below was written and tested against


def _torch_adam_dist_optimizers(optimizer) -> Iterator[tuple[object, torch.optim.Optimizer]]:
    """(megatron DistributedOptimizer, its inner torch Adam/AdamW) pairs of a (chained) optimizer."""
    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", None)
        if isinstance(o, DistributedOptimizer) and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield o, inner


def ensure_adam_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer the per-parameter state torch's AdamW creates lazily.

    Without TE/apex, megatron-core 0.16.1's ``DistributedOptimizer.state_dict()`` (called to build the
    *loading* state dict) asserts that all parameters share one ``step`` and fails on a fresh optimizer
    whose state is still empty. Zero state is exactly what the optimizer would start from, and the load
    then overwrites all of it.
    """

    if HAVE_APEX_OR_TE:
        return
    for _, inner in _torch_adam_dist_optimizers(optimizer):
        for group in inner.param_groups:
            on_device = group.get("capturable", False) or group.get("fused", False)
            for p in group["params"]:
                st = inner.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer) -> None:
    """Set every parameter's Adam ``step`` to the checkpoint's step, each in its own tensor.

    Two megatron-core 0.16.1 bugs in the distributed optimizer's torch-AdamW fallback (no TE/apex) meet
    here: ``load_state_dict`` assigns one *shared* ``step`` tensor to all parameters (torch's foreach AdamW
    then increments it once per parameter per step, so bias correction runs ahead), and the
    ``dp_reshardable`` parameter-state load copies the loading template's ``step`` (not the saved one)
    back over it. The saved step survives in each param group's ``step`` (megatron writes it there).
    Caught by tests/test_checkpoint.py's resume-equality test.
    """
    for _, inner in _torch_adam_dist_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st is not None and isinstance(st.get("step"), torch.Tensor):
                    old = st["step"]
                    st["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)


@contextlib.contextmanager
def output_layer_skipped(gpt_model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Run megatron's ``GPTModel`` without its output layer (the caller wants the final hidden states).

    megatron-core 0.16.1's GPTModel has no "skip the output layer" switch; with ``post_process`` off its
    ``_postprocess`` returns the decoder output (the final norm lives in the decoder), so flip it for the
    call. Covered by tests/test_grpo_update.py (hidden states -> fused log-probs == logits path)."""
    if not skip:
        yield
        return
    gpt_model.post_process = False
    try:
        yield
    finally:
        gpt_model.post_process = True
