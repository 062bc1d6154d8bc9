"""CUDA graphs of the rollout engine's decode steps (:mod:`m2mega.inference.engine`): when to use them and
the captured steps keyed by (batch bucket, span)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["use_cuda_graphs"]


def use_cuda_graphs(setting: str, device_type: str, tp: int, pp: int, environ=None) -> bool:
    """Whether decode steps are captured as CUDA graphs. ``M2MEGA_CUDA_GRAPHS`` (``on``/``off``/``auto``)
    overrides ``setting``. ``auto``: on CUDA at TP1 x PP1 (TP/PP steps carry collectives, which would have
    to be captured too; not done here). ``on`` where it cannot work is an error, not a silent fallback."""
    environ = os.environ if environ is None else environ
    s = (environ.get("M2MEGA_CUDA_GRAPHS") or setting or "auto").lower()
    if s not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {s!r}")
    ok = device_type == "cuda" and tp == 1 and pp == 1
    if s == "on" and not ok:
        why = "a CUDA device" if device_type != "cuda" else "TP1 x PP1"
        raise ValueError(f"cuda_graphs=on needs {why} (device {device_type}, TP{tp} x PP{pp})")
    return ok and s != "off"


def _bucket(n: int, limit: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, limit)


class _Graphs:
    """Captured decode steps keyed by (batch bucket, span); inputs are copied into static buffers."""

    def __init__(self) -> None:
        self.graphs: dict = {}
        self.pool = None

    def run(self, stage, slab, tokens: Tensor, cache_pos: Tensor, rope_pos: Tensor, span: int) -> Tensor:
        n = tokens.numel()
        nb = _bucket(n, slab.slots)
        entry = self.graphs.get((nb, span))
        fresh = entry is None
        if fresh:
            entry = {k: torch.zeros(nb, dtype=torch.long, device=tokens.device) for k in ("tok", "cpos", "rpos")}
        # Padded rows are free slots: token 0 at cache position 0 (their mask keeps column 0 on).
        for name, src in (("tok", tokens), ("cpos", cache_pos), ("rpos", rope_pos)):
            entry[name][:n].copy_(src)
            entry[name][n:].zero_()
        if fresh:
            # Warm-up runs execute the real step (same inputs as the replay below), so the K/V they write
            # are the step's own; capturing itself runs nothing.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                stage.decode(entry["tok"], entry["cpos"], entry["rpos"], slab, span)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                entry["out"] = stage.decode(entry["tok"], entry["cpos"], entry["rpos"], slab, span)
            self.pool = graph.pool()
            entry["graph"] = graph
            self.graphs[(nb, span)] = entry
        entry["graph"].replay()
        return entry["out"][:n]
