"""torch.distributed + megatron parallel-state set-up and teardown (re-exported by :mod:`m2mega.runtime`)."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from . import cpu
from .optional_libs import announce_missing

__all__ = ["init", "shutdown", "RuntimeInfo", "device"]


@dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    tp: int
    pp: int
    dp: int


def _drop_cpu_rng_note(record: logging.LogRecord) -> bool:
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def device() -> torch.device:
    """The device model tensors of this rank live on."""
    if torch.cuda.is_available() and not cpu.is_active():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    backend: str | None = None,
    seed: int = 1234,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
    timeout_s: float = 600.0,
) -> RuntimeInfo:
    """Initialise torch.distributed and megatron-core's parallel_state.

    Rank/world size come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    unless given. ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without; asking for ``nccl``
    without CUDA is an error, and ``gloo`` on a CUDA machine is allowed (CPU-side debugging) but keeps
    the model on the GPU, so the CPU runtime is only activated when CUDA is absent.
    """

    has_cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if has_cuda else "gloo"
    if backend == "nccl" and not has_cuda:
        raise RuntimeError("backend='nccl' needs CUDA; this machine has none (use backend='gloo')")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unsupported backend {backend!r}; expected 'nccl' or 'gloo'")

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by TP({tp}) x PP({pp})")

    if not has_cuda:
        cpu.activate()
        # megatron logs this on every RNG-tracker fork when the CPU generator plays the CUDA one (it is
        # the CPU runtime's design, not a bug): a line per dropout layer per step per rank.
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_drop_cpu_rng_note)
    else:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())

    if not dist.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if rank == 0:
        announce_missing()
    return RuntimeInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device(),
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
    )


def init_from_config(cfg) -> RuntimeInfo:
    """:func:`init` with a training config's layout: ``parallel.tp/pp/backend/timeout_s`` and ``seed``
    (``parallel.backend: auto`` = NCCL with CUDA, else gloo). The one place command lines start a runtime."""
    p = cfg.parallel
    return init(p.tp, p.pp, backend=None if p.backend == "auto" else p.backend, seed=cfg.seed,
                timeout_s=p.timeout_s)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker (same seed, same weights)."""
    import random


    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Destroy megatron's groups, the process group and the CPU runtime patches (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu.deactivate()
