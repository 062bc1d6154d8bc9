"""Run a function on N ranks (one process each, gloo on CPU) and collect every rank's return value.

This is the harness every multi-rank test uses::

    def body(tp, pp):                      # module-level, so 'spawn' can import it
        info = m2mega.runtime.init(tp, pp)
        ...
        return {"loss": loss.detach()}     # anything torch.save can serialise

    results = run_ranks(body, world_size=4, args=(2, 2), timeout_s=120)   # list, index = rank

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free
port) and one intra-op thread, so N ranks share a small CI machine fairly. ``m2mega.runtime.shutdown()``
runs after the body even when it fails. A failure on any rank terminates the others and raises
:class:`RankFailure` carrying that rank's traceback; a rank still running after ``timeout_s`` raises
:class:`RankTimeout` naming the ranks that did not finish (a hung collective must fail, not hang CI).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "RankFailure", "RankTimeout", "free_port"]


class RankFailure(RuntimeError):
    """A rank raised; the message holds its traceback."""


class RankTimeout(RuntimeError):
    """Some ranks did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, kwargs, env, out_q):
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **env,
        }
    )
    torch.set_num_threads(1)
    # megatron warns at import about every optional accelerator library it cannot find (TE, apex):
    # N ranks x a dozen lines of noise that would bury a real failure's traceback.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    try:
        result = fn(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, KeyboardInterrupt too
        out_q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import m2mega.runtime as rt

            rt.shutdown()
        except Exception:  # noqa: BLE001 - a failing shutdown must not mask the body's result
            pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return results ordered by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, r, world_size, port, tuple(args), dict(kwargs or {}), dict(env or {}), out_q),
            # Not daemonic: ranks may start children themselves (dist_checkpointing's writer does);
            # the finally-block below terminates them instead.
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankTimeout(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f}s")
            try:
                rank, status, payload = out_q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    # Give a dying rank's last message a moment to arrive before declaring a crash.
                    try:
                        rank, status, payload = out_q.get(timeout=2.0)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise RankFailure(f"ranks exited without a result (exit codes {codes})") from None
                else:
                    continue
            if status == "error":
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    return [results[r] for r in range(world_size)]
