"""Run grader code with a hard time limit from any thread or process: persistent worker processes.

sympy can run for minutes on an answer like ``(1+10^{-40})^{10^{40}}``; ``signal.alarm`` (math-verify's own
timeout, and our old one) works only on the main thread, and not at all inside one long C call. A separate
process is the only limit that always holds, so every bounded call goes to a long-lived worker:

* the worker (:func:`_serve` in a fresh interpreter) imports sympy/math-verify once (~1 s), then answers
  JSON-line requests; inside it a ``SIGALRM`` soft limit (its main thread) stops most runaway calls
  cheaply and the worker lives on. It parses LaTeX with ANTLR's two-stage strategy
  (:func:`m2mega.rewards.grader.use_two_stage_parsing`), keeps its start-up heap out of the garbage
  collector's way, and after :func:`warm_up` grades a warm-up set once (see there): the p99 of a math
  call went from 115 ms to 67 ms (docs/rewards.md);
* the caller waits at most ``timeout_s``; on overrun it kills the worker (SIGKILL) and starts a fresh one in
  the background, so one hostile answer costs ``timeout_s`` once, not the next call's start-up;
* :func:`subprocess.Popen`, not :mod:`multiprocessing`: it works from daemonic pool workers (which may not
  have children) and never forks a parent that holds CUDA or threads;
* one worker per concurrent caller (threads get their own), a fork of the caller starts its own pool, and
  workers exit when the caller's end of the pipe closes (caller exit or death).

Requests and replies are JSON (strings and numbers only): nothing from the worker is unpickled.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Outcome", "call", "outcome_counts", "shutdown", "time_limit", "warm_up"]

STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take a while
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Outcome:
    """``status`` is ``"ok"`` (``value`` holds the result), ``"timeout"`` or ``"error"`` (``error`` says why)."""

    status: str
    value: Any = None
    error: str = ""


class _Timeout(BaseException):
    """BaseException so that sympy's internal ``except Exception`` blocks cannot swallow the soft limit."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """``SIGALRM`` limit on the main thread (a no-op elsewhere); raises :class:`_Timeout` when it fires."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- caller side


class _Worker:
    def __init__(self, deep: bool = False) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from m2mega.rewards.sandbox import _serve; _serve(deep={deep})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self.ready = False
        self.overran = False

    def poll_ready(self) -> bool:
        """Non-blocking: has the worker finished starting up?"""
        if not self.ready and select.select([self.proc.stdout.fileno()], [], [], 0)[0]:
            self.wait_ready()
        return self.ready

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("grader worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self._readline(time.monotonic() + STARTUP_TIMEOUT_S)
        if line is None or json.loads(line).get("ready") is not True:
            raise RuntimeError(f"grader worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
        self.ready = True

    def request(self, op: str, args: list, timeout_s: float) -> Outcome:
        self.wait_ready()
        msg = json.dumps({"op": op, "args": args, "soft_s": 0.8 * timeout_s}) + "\n"
        deadline = time.monotonic() + timeout_s
        self.proc.stdin.write(msg.encode())
        self.proc.stdin.flush()
        line = self._readline(deadline)
        if line is None:
            self.overran = True
            return Outcome("timeout")
        rep = json.loads(line)
        return Outcome(rep["status"], rep.get("value"), rep.get("error", ""))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.deep = False  # set by warm_up(): workers started from then on warm up deeply (when idle)
        self.idle: list[_Worker] = []
        self.all: list[_Worker] = []
        self.lock = threading.Lock()

    def take(self) -> _Worker:
        with self.lock:
            if self.idle:
                ready = [w for w in self.idle if w.poll_ready()]
                w = ready[-1] if ready else self.idle[-1]
                self.idle.remove(w)
                if not self.idle:
                    # One warm spare beside each busy worker: after a kill the next call finds a worker
                    # already up instead of paying the ~1 s interpreter + sympy start-up.
                    self.idle.append(_spawn_tracked(self))
                return w
            w = _spawn_tracked(self)
            self.idle.append(_spawn_tracked(self))
            return w

    def give(self, w: _Worker) -> None:
        with self.lock:
            self.idle.append(w)

    def drop(self, w: _Worker) -> None:
        w.kill()
        with self.lock:
            if w in self.all:
                self.all.remove(w)

    def close(self) -> None:
        with self.lock:
            workers, self.all, self.idle = self.all, [], []
        for w in workers:
            w.kill()


def _spawn_tracked(pool: _Pool) -> _Worker:
    w = _Worker(pool.deep)
    pool.all.append(w)
    return w


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_OUTCOMES: Counter = Counter()  # (op, "timeout" | "error") -> calls so far in this process


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            # A forked child must not talk to its parent's workers: start its own (the parent keeps its).
            _POOL = _Pool()
        return _POOL


def call(op: str, args: list, timeout_s: float) -> Outcome:
    """Run worker operation ``op`` (see ``_OPS``) on JSON-able ``args``; at most ``timeout_s`` seconds of
    waiting once the worker is up. Never raises for what the operation does; raises ``RuntimeError`` only
    when no worker process can be started at all."""
    pool = _pool()
    w = pool.take()
    try:
        out = w.request(op, args, timeout_s)
    except (EOFError, OSError, ValueError) as e:  # the worker died (OOM killer, a crash in C code)
        pool.drop(w)
        _count(op, "error")
        return Outcome("error", error=f"grader worker died: {e}")
    except BaseException:
        pool.drop(w)
        raise
    if w.overran:  # no answer in time: the worker may be stuck in C code, only a kill stops it
        pool.drop(w)
    else:
        pool.give(w)
    if out.status != "ok":
        _count(op, out.status)
    return out


def _count(op: str, status: str) -> None:
    with _POOL_LOCK:
        _OUTCOMES[(op, status)] += 1


def outcome_counts() -> dict[tuple[str, str], int]:
    """Calls so far in this process that did not return a value, by ``(op, status)``: ``"timeout"`` (the
    hard limit or the in-worker soft limit) and ``"error"`` (the operation raised, or the worker died)."""
    with _POOL_LOCK:
        return dict(_OUTCOMES)


def warm_up(deep: bool = True, wait: bool = True) -> None:
    """Start this process's grader workers before the first reward, and warm them up.

    ``deep`` (what trainers and evaluators want): workers also grade
    :data:`m2mega.rewards.grader.WARM_UP_PAIRS` once, filling ANTLR's prediction DFA and sympy's lazy
    imports; the first answers of each shape would otherwise cost 2-5x (corpus p99 116-136 ms instead of
    65-69 ms, docs/rewards.md). A deep worker does this while it is idle, one pair at a time, once it has
    served its first call (a spare that is never used costs nothing); a call that arrives meanwhile waits
    for the current pair only (2-300 ms). ``wait=True`` (benchmarks, evaluation) does it all now (~2-3 s)
    and returns when the worker is ready and warm; ``wait=False`` (the GRPO trainer) only starts the worker,
    whose ~1 s start-up then overlaps model building. ``deep=False``: light workers (start-up only; tests).
    Optional: :func:`call` starts light workers on demand."""
    pool = _pool()
    pool.deep = pool.deep or deep
    if not wait:
        with pool.lock:
            if not pool.idle:
                pool.idle.append(_spawn_tracked(pool))
        return
    w = pool.take()
    try:
        w.wait_ready()
        if deep:
            out = w.request("warm_up", [], STARTUP_TIMEOUT_S)
            if out.status != "ok":
                raise RuntimeError(f"grader worker warm-up failed: {out.status} {out.error}".strip())
    except (EOFError, OSError, ValueError) as e:
        pool.drop(w)
        raise RuntimeError(f"grader worker died while warming up: {e}") from None
    except BaseException:
        pool.drop(w)
        raise
    if w.overran:
        pool.drop(w)
    else:
        pool.give(w)


def shutdown() -> None:
    """Stop this process's workers (also done at exit)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


atexit.register(shutdown)


# --------------------------------------------------------------------------- worker side


@lru_cache(maxsize=8192)  # the G rollouts of a prompt often give the same answer: grade it once
def _op_math_equal(pred: str, gold: str, rel_tol: float) -> bool:
    from .grader import math_verify_equal

    return bool(math_verify_equal(pred, gold, rel_tol))


def _op_math_value(text: str) -> float | None:
    from .grader import math_value

    return math_value(text)


def _op_custom(spec: str, kwargs: dict) -> Any:
    from .custom import run_in_worker

    return run_in_worker(spec, kwargs)


class _Warmer:
    """Worker side of the deep warm-up: a deep worker says "ready" after its light start-up (~1 s); once it
    has served a call it grades :data:`m2mega.rewards.grader.WARM_UP_PAIRS` one pair at a time while no
    request is waiting, so a spare that replaces a killed worker takes calls at once (a call arriving
    mid-pair waits for that pair only: 2-300 ms) and an unused spare costs no CPU. The "warm_up" op grades
    whatever is left in one go (``sandbox.warm_up()``)."""

    def __init__(self, deep: bool) -> None:
        from .grader import WARM_UP_PAIRS

        self.pending = list(WARM_UP_PAIRS) if deep else []
        self.done = False

    def step(self) -> None:
        from .grader import warm_up as grader_warm_up

        grader_warm_up([self.pending.pop(0)], forget=False)
        if not self.pending:
            grader_warm_up([], forget=True)
            self.done = True
            _freeze_heap()

    def drain(self) -> float:
        from .grader import WARM_UP_PAIRS

        t0 = time.perf_counter()
        if not self.done and not self.pending:  # a light worker: warm it up fully now
            self.pending = list(WARM_UP_PAIRS)
        while self.pending:
            self.step()
        return time.perf_counter() - t0


_WARMER: _Warmer | None = None


def _freeze_heap() -> None:
    # The start-up heap (sympy, the ANTLR grammar and DFA: ~200k objects) never becomes garbage; without
    # this, each full collection walks it again: 5-6 pauses of ~60 ms per 450 math calls, a third of the
    # p99. Frozen, it is skipped by the cyclic collector (freed objects still go by reference count).
    gc.collect()
    gc.freeze()


def _op_warm_up() -> float:
    return _WARMER.drain() if _WARMER is not None else 0.0


def _op_sleep(seconds: float) -> float:  # tests: a call that overruns
    time.sleep(seconds)
    return seconds


def _op_stuck(seconds: float) -> float:  # tests: code the soft limit cannot stop (like a long C call)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return seconds


_OPS: dict[str, Callable[..., Any]] = {
    "math_equal": _op_math_equal,
    "math_value": _op_math_value,
    "custom": _op_custom,
    "warm_up": _op_warm_up,
    "sleep": _op_sleep,
    "stuck": _op_stuck,
    "pid": lambda: os.getpid(),
}


def _serve(deep: bool = False) -> None:
    # Protocol on a private copy of stdout; fd 1 goes to stderr so that prints in user code (custom reward
    # functions) cannot corrupt it.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import logging

    from m2mega.rewards.grader import math_verify_equal, use_two_stage_parsing

    global _WARMER
    # math-verify warns on every call that its signal timeout is off: the limit here is the process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    use_two_stage_parsing()
    math_verify_equal("x^2-1", "(x-1)(x+1)")  # warm up sympy/ANTLR before saying ready
    _WARMER = _Warmer(deep)
    _freeze_heap()

    out.write(json.dumps({"ready": True}) + "\n")
    served = False
    while True:
        while served and _WARMER.pending and not select.select([sys.stdin], [], [], 0)[0]:
            _WARMER.step()  # in use and idle: warm up further (deep workers)
        line = sys.stdin.readline()  # one request at a time: the caller waits for each reply
        if not line:
            break
        served = True
        req = json.loads(line)
        try:
            with time_limit(req.get("soft_s")):
                value = _OPS[req["op"]](*req["args"])
            rep = {"status": "ok", "value": value}
        except _Timeout:  # the soft limit fired in Python code: the worker is fine
            rep = {"status": "timeout"}
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker lives on
            rep = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
        try:
            text = json.dumps(rep)
        except (TypeError, ValueError):
            text = json.dumps({"status": "error", "error": f"result is not JSON: {type(rep['value']).__name__}"})
        out.write(text + "\n")

