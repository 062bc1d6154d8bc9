"""A user's own reward function: ``custom_function: "path/to/file.py:fn"`` (verl's convention).

The function is called like verl's ``compute_score``::

    fn(data_source=task, solution_str=response, ground_truth=answer, extra_info={...record fields...})

and returns a float (or int/bool), or a dict with ``"score"`` and optionally ``"correct"``/``"acc"``. Its
value becomes the ``accuracy`` part of the reward (format and repetition terms still apply); ``correct``
is the dict's flag, else ``score >= 1``.

It runs in a grader worker process (:mod:`m2mega.rewards.sandbox`) with the task's ``math_timeout_s`` as
a hard limit, so a slow or hanging function cannot stall a GRPO step. Exceptions, timeouts and returns
that are not a finite number score 0 for that sample; they are counted (:func:`custom_failures`) and
logged (the first few of each kind, then every 100th), never fatal. A file or function that does not
exist is a one-line ``ValueError`` when the config is built (:func:`check_custom_function`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

from .sandbox import call

__all__ = ["check_custom_function", "call_custom_function", "custom_failures", "run_in_worker"]

log = logging.getLogger(__name__)
_FAILURES: Counter = Counter()  # (spec, kind) -> count
_LOCK = threading.Lock()
_LOG_FIRST = 5


def _split(spec: str) -> tuple[Path, str]:
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"custom_function must be 'path/to/file.py:function', got {spec!r}")
    path, _, name = spec.rpartition(":")
    if not path or not name.isidentifier():
        raise ValueError(f"custom_function must be 'path/to/file.py:function', got {spec!r}")
    return Path(path).expanduser().resolve(), name


def _load(spec: str) -> Callable[..., Any]:
    path, name = _split(spec)
    if not path.is_file():
        raise ValueError(f"custom_function {spec!r}: file {str(path)!r} does not exist")
    mod_name = f"m2mega_custom_reward_{abs(hash(str(path)))}"
    mod = sys.modules.get(mod_name)
    if mod is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"custom_function {spec!r}: cannot import {str(path)!r} as a Python file")
        mod = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - any import error of user code is a config error
            raise ValueError(f"custom_function {spec!r}: importing {path.name} failed: {type(e).__name__}: {e}")
        sys.modules[mod_name] = mod
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"custom_function {spec!r}: {path.name} has no function {name!r}")
    return fn


def check_custom_function(spec: str) -> str:
    """Validate ``spec`` at config time (the file exists, imports, and defines the function); returns it
    with the path made absolute, so that workers started elsewhere find the same file."""
    _load(spec)
    path, name = _split(spec)
    return f"{path}:{name}"


def run_in_worker(spec: str, kwargs: dict) -> Any:
    """Worker side: import (once) and call the function; the caller checks the returned value."""
    return _load(spec)(**kwargs)


def _score(value: Any) -> tuple[float, bool] | None:
    correct = None
    if isinstance(value, Mapping):
        correct = value.get("correct", value.get("acc"))
        value = value.get("score")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    v = float(value)
    return v, bool(correct) if correct is not None else v >= 1.0


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _count(spec: str, kind: str, detail: str) -> None:
    with _LOCK:
        _FAILURES[(spec, kind)] += 1
        n = _FAILURES[(spec, kind)]
    if n <= _LOG_FIRST or n % 100 == 0:
        log.warning("custom reward %s: %s #%d (sample scored 0): %s", spec, kind, n, detail)


def call_custom_function(
    spec: str, response: str, ground_truth: str, task: str, extra: Mapping[str, Any] | None, timeout_s: float
) -> tuple[float, bool]:
    """``(accuracy, correct)`` from the user's function; ``(0.0, False)`` on any failure (counted)."""
    kwargs = {
        "data_source": task,
        "solution_str": response,
        "ground_truth": ground_truth,
        "extra_info": {k: v for k, v in (extra or {}).items() if _jsonable(v)},
    }
    out = call("custom", [spec, kwargs], timeout_s)
    if out.status == "timeout":
        _count(spec, "timeout", f"no result within {timeout_s} s")
        return 0.0, False
    if out.status != "ok":
        _count(spec, "exception", out.error)
        return 0.0, False
    scored = _score(out.value)
    if scored is None:
        _count(spec, "bad_return", f"returned {out.value!r:.80}, expected a finite float or {{'score': float}}")
        return 0.0, False
    return scored


def custom_failures() -> dict[str, int]:
    """Failures so far in this process, by kind (``exception``, ``timeout``, ``bad_return``), all specs."""
    with _LOCK:
        out: Counter = Counter()
        for (_, kind), n in _FAILURES.items():
            out[kind] += n
        return dict(out)
