"""Keeps megatron's checkpoint-writer helper process from outliving the run (see
:func:`install_results_queue`). A module of its own, importing nothing heavy, because the helper process
imports it to run :func:`_die_with_parent`."""

from __future__ import annotations

from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

__all__ = ["install_results_queue"]

_async_manager = None


def _die_with_parent() -> None:
    """Runs in megatron's results-queue manager process: end it when its parent dies (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def install_results_queue() -> None:
    """megatron's ``FileSystemWriterAsync`` collects write results through a ``multiprocessing`` Manager
    it starts once per process and never stops (a ~320 MB server process). A normal exit shuts it down; a
    killed run (SIGKILL, a scheduler's SIGTERM) left it running forever. We start that manager ourselves,
    with an initializer that ties its life to ours, and hand megatron its queue."""
    global _async_manager

    if fa._results_queue is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    _async_manager = SyncManager(ctx=mp.get_context("spawn"))  # spawn, as megatron does: no forked CUDA state
    _async_manager.start(_die_with_parent)
    fa._results_queue = _async_manager.Queue()
