"""SIGINT / SIGTERM that stop a run at any moment and are never lost.

Python runs a signal handler at the next bytecode of the main thread, wherever that is. When that is a
place whose exceptions CPython only reports ("Exception ignored in ...") and then drops (an
``os.register_at_fork`` hook such as logging's ``_releaseLock``, run by every ``os.fork()`` of a
``multiprocessing`` pool; a ``__del__``; a weakref or GC callback), the ``KeyboardInterrupt`` disappears
and the run goes on to completion as if Ctrl-C had never been pressed. ``StopSignals`` records the signal
before raising, so a raise that was swallowed is raised again at the next ``check()``, and ``deferred()``
keeps the handler from raising at all inside a region full of such hooks (creating a pool), raising once
the region is left instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_exception(signum: int) -> BaseException:
    """What a stop signal raises: ``KeyboardInterrupt`` for SIGINT (as Python's default handler), and
    ``SystemExit(128 + signum)`` for SIGTERM (143, what a shell reports for a process killed by it), so
    ``except``/``finally`` cleanup runs where the default action would end the process without it."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


class StopSignals:
    """Context manager installing SIGINT/SIGTERM handlers for the length of a run (main thread only;
    elsewhere signal handlers cannot be set and it does nothing); the previous handlers are restored
    on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first stop signal received
        self._deferring = 0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}
        self._raised: BaseException | None = None
        self._unraisable_hook = None

    def __enter__(self) -> "StopSignals":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._unraisable_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._unraisable_hook is not None:
            sys.unraisablehook = self._unraisable_hook
            self._unraisable_hook = None

    def _unraisable(self, unraisable) -> None:
        # Our stop exception dropped by CPython (raised in a hook or finalizer): it is recorded and check()
        # raises it again, so the "Exception ignored ... Traceback" report would only be noise.
        if self._raised is None or unraisable.exc_value is not self._raised:
            self._unraisable_hook(unraisable)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # A forked child still holding this handler (a pool worker before its initializer sets its own):
            # Ctrl-C is the parent's to handle; SIGTERM (``pool.terminate()``) must end it now, even inside
            # an at-fork hook where a raise would be dropped, or ``terminate()`` waits for it forever.
            if signum == signal.SIGTERM:
                os._exit(128 + signum)
            return
        first = self.signum is None
        if first:
            self.signum = signum
        # A repeated Ctrl-C only records: it must not interrupt the cleanup the first one started.
        if first and not self._deferring:
            self._raised = stop_exception(signum)
            raise self._raised

    def check(self) -> None:
        """Raise the stop exception if a stop signal arrived (its first raise may have been swallowed)."""
        if self.signum is not None:
            raise stop_exception(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal inside the block is only recorded, and raised when the block is left. Use it around
        ``multiprocessing`` pool creation: the fork hooks that would swallow the raise run there, and a
        forked child inherits the deferring handler until its initializer replaces it."""
        self._deferring += 1
        # Blocked too: a child forked here inherits the mask, so a SIGTERM sent to it (pool.terminate())
        # before CPython's after-fork code runs stays pending in the kernel instead of being cleared with
        # the flags that code resets, which left a worker alive and terminate() joining it forever. The
        # child unblocks once its own handlers are set (preprocess._init_worker).
        masked = hasattr(signal, "pthread_sigmask")
        if masked:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            yield
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # runs a pending handler: it only records
            self._deferring -= 1
        self.check()
