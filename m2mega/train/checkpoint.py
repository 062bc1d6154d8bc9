"""Training checkpoints with megatron-core ``dist_checkpointing``: atomic, rotated, resumable, reshardable.

Layout under ``root``::

    root/iter_0000200/     a complete checkpoint (megatron dist-ckpt files + config.yaml)
    root/iter_0000300/
    root/latest            "300", written last (atomically) once iter_0000300 is complete

A save writes into ``iter_XXXXXXX.tmp``, and only when every rank has finished does rank 0 rename it to
``iter_XXXXXXX`` and then replace ``latest``; a crash at any point leaves the previous checkpoint as the
newest complete one (resume ignores ``*.tmp``). After a save, rank 0 deletes the oldest complete
checkpoints beyond ``keep_last`` (never a ``protect``-ed one) and stale ``*.tmp`` directories. The
checkpoint root must be on a filesystem all ranks share (as megatron assumes).

Guarantees (docs/training.md, "Checkpoint guarantees"):

* a checkpoint never claims what it does not hold: a save of an iteration that already exists replaces it
  (the new one is renamed in, then the old one deleted), and resume takes the highest complete
  ``iter_*`` (``latest`` is kept in step with it for people and tools);
* a run that does not resume refuses a ``save_dir`` that already holds checkpoints
  (:func:`check_save_dir`), so two runs never mix in one directory;
* resume checks the newest checkpoint's files (:func:`m2mega.convert.checks.verify_dcp_checkpoint`)
  and falls back to the previous complete one, with a warning naming the damaged file;
* a changed model architecture is refused before the model is built (:func:`check_model_config`,
  against the checkpoint's ``config.yaml``) and again before any tensor is read (global shapes against
  ``.metadata``);
* nothing is unpickled except through allow-lists (:mod:`m2mega.convert.safe_dcp`); the RNG state is
  stored as tensors and plain data so it loads under ``torch.load(weights_only=True)``.

Contents (one ``dist_checkpointing.save`` call):

* ``model`` (``model0``, ``model1``, ... with virtual pipeline chunks): the model's ``sharded_state_dict``:
  global tensors, so a checkpoint saved at TP2 loads at TP1 (or any TP/PP) for the model weights;
* ``optimizer``: megatron optimizer state (distributed optimizer: ``checkpoint.optimizer_format``;
  ``dp_reshardable`` reloads at any DP size with the same TP/PP);
* ``rng_state``: python/numpy/torch/CUDA generators and megatron's RNG tracker, one object per
  (pp, tp, dp) rank: restored only when the layout is unchanged;
* common state (rank 0): iteration, LR scheduler, data-loader position, caller extras, the parallel layout
  and the run config (also written as ``config.yaml``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.optimizer import ChainedOptimizer, DistributedOptimizer

from m2mega.convert.checks import CorruptCheckpoint, UnsafeCheckpoint
from m2mega.convert.layout import (  # re-exported: the trainer's checkpoint API
    LATEST,
    find_latest,
    is_iter_dirname,
    iter_dirname,
    list_checkpoints,
    pick_checkpoint,
    resolve_checkpoint,
)
from m2mega.models.wrappers import unwrap_model
from m2mega.runtime import device
from m2mega.runtime.compat import ensure_adam_state, restore_adam_steps

from .async_save import install_results_queue
from .checkpoint_checks import check_global_shapes as _check_global_shapes
from .checkpoint_checks import check_model_config, check_save_dir
from .config import TrainConfig, to_dict, to_yaml
from .hf_files import write_hf_files

__all__ = [
    "LoadedCheckpoint",
    "iter_dirname",
    "find_latest",
    "list_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "unwrap_model",
    "get_rng_state",
    "set_rng_state",
    "pick_checkpoint",
    "resolve_checkpoint",
    "check_save_dir",
    "check_model_config",
    "CorruptCheckpoint",
    "UnsafeCheckpoint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    path: str
    iteration: int
    data_state: Any = None
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    saved_layout: dict = field(default_factory=dict)
    loaded_optimizer: bool = False
    loaded_rng: bool = False


# ----------------------------------------------------------------------------------------- helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    chunks = [unwrap_model(c) for c in model_chunks]
    return {k: c.sharded_state_dict() for k, c in zip(_model_keys(len(chunks)), chunks)}


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool, fmt: str) -> dict:
    # The optimizer maps its state onto the model's ShardedTensors by parameter identity.
    merged: dict = {}
    for v in model_sd.values():
        merged.update(v)
    return optimizer.sharded_state_dict(
        merged, is_loading=is_loading, metadata={"distrib_optim_sharding_type": fmt}
    )


def _optimizer_has_stepped(optimizer) -> bool:
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", o)
        if any(len(st) for st in getattr(inner, "state", {}).values()):
            return True
    return False


def get_rng_state() -> dict:
    """Every generator a training step draws from, so a resumed run draws the same numbers."""
    # Tensors and plain data only (no numpy arrays), so the state loads under torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if device().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None):
    # One object per (pp, tp, dp) rank: DP replicas may have drawn different amounts (ragged batches).
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- save


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    cfg: TrainConfig,
    data_state: Any = None,
    extra: dict | None = None,
    keep_last: int | None = None,
    protect: Sequence[str] = (),
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory. An existing checkpoint of
    the same iteration is replaced (see the module docstring); ``protect``: checkpoints rotation must keep
    (e.g. the last one saved before a run started skipping steps)."""

    final = os.path.join(root, iter_dirname(iteration))
    tmp = final + ".tmp"
    keep_last = cfg.checkpoint.keep_last if keep_last is None else keep_last
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()

    model_sd = _model_sharded_state_dict(model_chunks)
    state: dict = dict(model_sd)
    # An optimizer that never stepped has no state to save (megatron's distributed optimizer asserts on
    # it): e.g. GRPO steps whose rollouts all scored alike. The checkpoint then records none.
    if optimizer is not None and not _optimizer_has_stepped(optimizer):
        optimizer = None
    if optimizer is not None:
        state["optimizer"] = _optimizer_sharded_state_dict(
            optimizer, model_sd, is_loading=False, fmt=cfg.checkpoint.optimizer_format
        )
    state["rng_state"] = _rng_sharded_object(get_rng_state())
    state["m2mega"] = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data": _plain(data_state),
        "extra": _plain(dict(extra or {})),
        "layout": _layout(),
        "config": to_dict(cfg),
        "has_optimizer": optimizer is not None,
        "optimizer_format": cfg.checkpoint.optimizer_format,
        "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
    }
    install_results_queue()
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=cfg.checkpoint.save_threads)
    if ps.get_data_parallel_world_size() > 1:
        # Spread the writes of replicated tensors over the data-parallel ranks.
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, ps.get_data_parallel_group(with_context_parallel=True)
        )
    dist_checkpointing.save(state, tmp, sharded_strategy=strategy)  # ends in a barrier
    if _rank() == 0:
        _write_atomic(os.path.join(tmp, "config.yaml"), to_yaml(cfg))
        write_hf_files(cfg, tmp)  # config.json, tokenizer, image processor: exportable on its own
        _fsync_dir(tmp)
        old = final + _REPLACED
        if os.path.exists(final):
            # Never keep an older state under this name: move it aside, rename the new one in, then delete
            # it. A crash in between leaves the new one complete, or the previous iterations to resume from.
            log.warning("checkpoint %s exists; replacing it with this run's iteration %d", final, iteration)
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), f"{iteration}\n")
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, keep=[final, *protect])
    _barrier()
    return final


_REPLACED = ".replaced"


def _plain(obj: Any) -> Any:
    """numpy scalars/arrays -> python numbers/lists, recursively: common state must load under
    ``torch.load(weights_only=True)``, which refuses numpy objects (a loader's state may hold them)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_plain(v) for v in obj)
    return obj


def _prune(root: str, keep_last: int, keep: str | Sequence[str]) -> None:
    for name in os.listdir(root):
        for suffix in (".tmp", _REPLACED):  # a crashed save's leftovers
            if name.endswith(suffix) and is_iter_dirname(name[: -len(suffix)]):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last <= 0:
        return
    keep = {os.path.abspath(k) for k in ([keep] if isinstance(keep, str) else keep) if k}
    done = list_checkpoints(root)
    for _, path in done[: max(0, len(done) - keep_last)]:
        if os.path.abspath(path) not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- load


def _read_meta(path: str) -> dict:
    from m2mega.convert import safe_dcp

    common = safe_dcp.load_common_state_dict(path)
    meta = common.get("m2mega") if isinstance(common, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not an m2mega training checkpoint (no 'm2mega' common state)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def load_model_weights(path: str, model_chunks: Sequence[torch.nn.Module], *, strict: bool = True) -> None:
    """Load only the model weights of a checkpoint (any TP/PP it was saved with). ``path`` is one
    checkpoint (``iter_XXXXXXX``) or a save root, whose newest intact complete checkpoint is used."""
    from m2mega.convert import safe_dcp

    path = resolve_checkpoint(path)
    model_sd = _model_sharded_state_dict(model_chunks)
    _check_global_shapes(path, model_sd)
    loaded = safe_dcp.load(model_sd, path)
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        if key not in loaded:
            raise ValueError(f"{path} holds no '{key}' state (saved with a different number of model chunks?)")
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)


def load_checkpoint(
    path: str,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    optimizer_format: str | None = None,
) -> LoadedCheckpoint:
    """Collective. Restores what the current layout allows (see module docstring) and returns the rest.

    Model weights always load (resharded to the current TP/PP). Optimizer state loads when the layout's
    TP/PP is unchanged, or for optimizer states stored in model space (non-distributed optimizer, or the
    ``fully_reshardable`` format). RNG state loads only with an identical (TP, PP, DP) layout. Whatever is
    skipped is logged; the optimizer's master weights are then refreshed from the loaded model.
    """
    from m2mega.convert import safe_dcp

    meta = _read_meta(path)
    if scheduler is not None and meta.get("scheduler") is not None:
        _check_scheduler(scheduler, meta["scheduler"], path)  # before anything is modified
    now = _layout()
    saved = meta["layout"]
    same_mp = saved["tp"] == now["tp"] and saved["pp"] == now["pp"]
    same_all = same_mp and saved["dp"] == now["dp"]
    fmt = optimizer_format or meta.get("optimizer_format", "dp_reshardable")
    model_space_optim = (not meta.get("distributed_optimizer", True)) or fmt == "fully_reshardable"

    want_optim = optimizer is not None and load_optimizer and meta.get("has_optimizer", False)
    if want_optim and not (same_mp or model_space_optim):
        log.warning(
            "checkpoint %s was saved at TP%d/PP%d, now TP%d/PP%d: the distributed optimizer's %s state does "
            "not reshard across TP/PP; loading model weights only (fresh optimizer state)",
            path, saved["tp"], saved["pp"], now["tp"], now["pp"], fmt,
        )
        want_optim = False
    if want_optim and meta.get("distributed_optimizer", True) != _is_distributed(optimizer):
        log.warning("checkpoint %s optimizer type differs from this run's; not loading optimizer state", path)
        want_optim = False
    want_rng = load_rng and same_all
    if load_rng and not same_all:
        log.warning("checkpoint %s layout %s != current %s: RNG state not restored", path, saved, now)

    model_sd = _model_sharded_state_dict(model_chunks)
    request: dict = dict(model_sd)
    if want_optim:
        ensure_adam_state(optimizer)
        request["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True, fmt=fmt)
    if want_rng:
        request["rng_state"] = _rng_sharded_object(None)
    _check_global_shapes(path, model_sd)
    loaded = safe_dcp.load(request, path)

    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        if key not in loaded:
            raise ValueError(f"{path} holds no '{key}' state (saved with a different number of model chunks?)")
        unwrap_model(chunk).load_state_dict(loaded[key])
    if want_optim:
        # The distributed optimizer copies into views of parameters that require grad.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()  # master weights follow the freshly loaded model weights
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
        if scheduler.override_opt_param_scheduler:
            _adopt_config_schedule(scheduler)
    if want_rng:
        set_rng_state(loaded["rng_state"])
    return LoadedCheckpoint(
        path=path,
        iteration=int(meta["iteration"]),
        data_state=meta.get("data"),
        extra=dict(meta.get("extra") or {}),
        config=dict(meta.get("config") or {}),
        saved_layout=dict(saved),
        loaded_optimizer=want_optim,
        loaded_rng=want_rng,
    )


def _adopt_config_schedule(scheduler) -> None:
    """checkpoint.override_scheduler: the config's LR bounds replace the checkpoint's everywhere. megatron
    reads ``max_lr``/``min_lr`` from each optimizer param group first (set when the optimizer was built,
    then overwritten by the loaded optimizer state), so the scheduler's own values alone would leave the
    resumed run on the old peak."""
    for group in scheduler.optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"] = scheduler.max_lr
        if "min_lr" in group:
            group["min_lr"] = scheduler.min_lr
    scheduler.step(0)  # the LR of the current step under the adopted schedule


def _check_scheduler(scheduler, state: dict, path: str) -> None:
    if not scheduler.override_opt_param_scheduler:
        now = scheduler.state_dict()
        diff = {k: (state.get(k), now[k]) for k in ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps",
                                                     "lr_decay_style") if k in state and state[k] != now[k]}
        if diff:
            raise ValueError(
                f"{path}: the LR schedule differs from the config's (saved, now): {diff}. Keep the saved values "
                f"(e.g. schedule.lr_decay_iters) or set checkpoint.override_scheduler=true to adopt the new one"
            )


def _is_distributed(optimizer) -> bool:
    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in opts)
