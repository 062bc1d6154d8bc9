"""Loading megatron ``torch_dist`` checkpoints without running code a checkpoint file could carry.

torch's distributed checkpoint reads ``.metadata`` with plain ``pickle.load`` and every non-tensor object
(megatron ``ShardedObject``: RNG state, ``_extra_state``, optimizer bucket sizes) with
``torch.load(weights_only=False)``: a planted file would run arbitrary code. Every m2mega load path
(``init_from``, resume, evaluation, HF export, difficulty scoring) goes through :func:`load` here, which

1. checks the whole checkpoint first (:func:`m2mega.convert.checks.verify_dcp_checkpoint`: allow-list
   unpickler for ``.metadata``, weights-only ``common.pt``, every ``*.distcp`` present and long enough), and
2. loads with megatron's own strategy, whose metadata reader and load planner are swapped for ones that
   use the same allow-list / ``weights_only=True`` (so nothing is unpickled unchecked even if a file
   changes between 1 and 2).

We reuse megatron's ``TorchDistLoadShardedStrategy`` rather than copy its 40-line ``load`` (key renaming,
PyT ShardedTensor conversion, shape validation): it looks both classes up as module globals, which a
scoped swap replaces for the duration of one call.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from .checks import CorruptCheckpoint, UnsafeCheckpoint, read_dcp_metadata, safe_torch_load, verify_dcp_checkpoint

__all__ = ["load", "load_common_state_dict", "load_tensors_metadata", "SafeTorchDistLoadStrategy"]

_swap_lock = threading.RLock()


class _SafeReader(FileSystemReader):
    """FileSystemReader whose ``read_metadata`` uses the allow-list unpickler (and caches, as megatron's does)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._md = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._md is None:
            md = read_dcp_metadata(self.path)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._md = md
        return self._md


def _safe_reader(checkpoint_dir, cache_metadata: bool = False) -> FileSystemReader:
    return _SafeReader(checkpoint_dir)


class _SafePlanner(mcore_torch.MCoreLoadPlanner):
    """megatron's planner, but stored objects are read by torch's weights-only (allow-list) unpickler."""

    def __init__(self, *args: Any, ckpt_dir: str = "?", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ckpt_dir = ckpt_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
        where = os.path.join(self._ckpt_dir, getattr(info, "relative_path", "?"))
        obj = safe_torch_load(f"{where} (object {read_item.dest_index.fqn!r})", value.getvalue())
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _unwrap(e: CheckpointException) -> BaseException:
    """DCP wraps each rank's exception into one CheckpointException (with tracebacks in its text): surface
    our own one-line errors as themselves."""
    for exc, _trace in e.failures.values():
        if isinstance(exc, (UnsafeCheckpoint, CorruptCheckpoint)):
            return exc
    return e


@contextlib.contextmanager
def _guarded(ckpt_dir):
    def planner(*args: Any, **kwargs: Any) -> _SafePlanner:
        return _SafePlanner(*args, ckpt_dir=os.fspath(ckpt_dir), **kwargs)

    with _swap_lock:
        saved = mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner
        mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner = _safe_reader, planner
        try:
            yield
        except CheckpointException as e:
            raise _unwrap(e) from None
        finally:
            mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner = saved


class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """megatron's torch_dist load strategy with the allow-list reader and weights-only planner."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _guarded(checkpoint_dir):
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with _guarded(checkpoint_dir):
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _guarded(checkpoint_dir):
            return super().load_sharded_metadata(checkpoint_dir)


def load(sharded_state_dict: dict, ckpt_dir: str | os.PathLike, **kwargs: Any) -> dict:
    """``dist_checkpointing.load`` after :func:`verify_dcp_checkpoint`, with :class:`SafeTorchDistLoadStrategy`."""
    ckpt_dir = os.fspath(ckpt_dir)
    verify_dcp_checkpoint(ckpt_dir)
    return dist_checkpointing.load(sharded_state_dict, ckpt_dir, sharded_strategy=SafeTorchDistLoadStrategy(),
                                   **kwargs)


def load_tensors_metadata(ckpt_dir: str | os.PathLike) -> dict:
    ckpt_dir = os.fspath(ckpt_dir)
    verify_dcp_checkpoint(ckpt_dir)
    return dist_checkpointing.load_tensors_metadata(ckpt_dir, sharded_strategy=SafeTorchDistLoadStrategy())


def load_common_state_dict(ckpt_dir: str | os.PathLike) -> Any:
    """``common.pt`` through the weights-only unpickler (megatron relies on torch's default for it)."""
    ckpt_dir = os.fspath(ckpt_dir)
    verify_dcp_checkpoint(ckpt_dir)
    return safe_torch_load(os.path.join(ckpt_dir, "common.pt"))
