"""How every m2mega command line reports a problem the user can fix: one line ``error: ...`` on stderr and
exit code 2 (a bad flag, config value, missing input) or 1 (the run started and failed for a stated
reason: a damaged or unsafe checkpoint, a diverged run), never a traceback, and under ``torchrun`` printed
once (by rank 0: every rank checks the same config and files, so every rank fails the same way).

    if __name__ == "__main__":
        sys.exit(run_main(main))

Set ``M2MEGA_TRACEBACK=1`` to get the traceback instead (debugging m2mega itself). Entry points check
their config and input paths (:func:`require_prefixes`, ``m2mega.train.preflight.preflight``) before they
initialise process groups or build a model, so these errors come within seconds.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Optional, Sequence

__all__ = ["UsageError", "RunFailed", "run_main", "report", "launch_rank", "require_prefixes", "require_paths"]

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(ValueError):
    """A flag, config value or input path the user has to fix (exit code 2). The packages' own user errors
    (``ConfigError``, ``CheckpointMismatch``) derive from it, so this module needs to import none of them."""


class RunFailed(RuntimeError):
    """The run started and failed for a stated reason (exit code 1): ``UnsafeCheckpoint``,
    ``CorruptCheckpoint``, ``TrainingDiverged`` derive from it."""


def launch_rank() -> int:
    """This process's global rank as torchrun announces it (before torch.distributed is initialised)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``error: message`` (first line only matters; it is one line) on rank 0; return ``code``."""
    if launch_rank() == 0:
        line = " ".join(str(message).split("\n"))
        print(f"error: {line}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank meets the same error, but torchrun tears the job down as soon as one process exits:
        # a silent rank exiting first could kill rank 0 before it prints. Give rank 0 time to say it.
        import time

        time.sleep(3.0)
    return code


def _classify(exc: BaseException) -> Optional[int]:
    """Exit code for the errors whose message is the whole story, None for bugs (which keep their trace)."""
    if isinstance(exc, (UsageError, FileNotFoundError, NotADirectoryError)):
        return EXIT_USAGE
    if isinstance(exc, RunFailed):
        return EXIT_FAILED
    return None


def run_main(main: Callable[[Optional[list[str]]], int], argv: Optional[list[str]] = None) -> int:
    """Run an entry point's ``main``, turning user errors into one ``error:`` line and an exit code."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return report("interrupted", 130)
    except Exception as e:
        code = _classify(e)
        if code is None or os.environ.get("M2MEGA_TRACEBACK") == "1":
            raise
        return report(str(e) or type(e).__name__, code)


def require_paths(paths: Iterable[tuple[str, Optional[str]]]) -> None:
    """``(flag, path)`` pairs: every set path must exist; raises :class:`UsageError` naming the flag."""
    for flag, path in paths:
        if path and not os.path.exists(path):
            raise UsageError(f"{flag}: {path} does not exist")


def require_prefixes(prefixes: Sequence[tuple[str, Optional[str]]]) -> None:
    """``(flag, PREFIX)`` pairs of preprocessed datasets: PREFIX.bin and PREFIX.idx must exist."""
    for flag, prefix in prefixes:
        if not prefix:
            continue
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise UsageError(f"{flag}: dataset {prefix} is missing {', '.join(missing)} "
                             f"(write it with tools/preprocess_data.py)")
