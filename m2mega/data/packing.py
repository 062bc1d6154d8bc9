"""Which samples go into which micro-batch: deterministic, data-parallel, resumable plans.

A *plan* is a pure function of (sample lengths, seq_length, order, seed, epoch), so every rank builds the
same one without communication and a resumed job rebuilds it exactly. No sample is replayed or skipped
across a resume: step ``s`` of rank ``r`` is always the same micro-batch.

* :class:`PackPlan` (SFT): each epoch orders the samples (``sequential``: stored order, i.e. the curriculum
  when preprocessed with ``--order curriculum``; ``shuffle``: a fresh permutation per epoch;
  ``bucket_shuffle``: shuffled within difficulty buckets, buckets easy to hard) and cuts that order into
  packs greedily (a pack takes samples in order while they fit in ``seq_length`` tokens), so the order is
  preserved. Epochs are concatenated into one global pack stream; rank ``r`` of ``dp_size`` takes packs
  ``s * dp_size + r`` at its step ``s``.
* :class:`PromptPlan` (GRPO): the same orders over (RL) samples; step ``s`` takes the next
  ``global_batch`` prompts of the stream, and rank ``r`` its contiguous ``global_batch / dp_size`` slice.
"""

from __future__ import annotations

import numpy as np

from .ordering import bucket_shuffle_order, shuffle_order

__all__ = ["SAMPLER_ORDERS", "epoch_order", "greedy_pack_starts", "PackPlan", "PromptPlan"]

SAMPLER_ORDERS = ("sequential", "shuffle", "bucket_shuffle")


def epoch_order(n: int, order: str, seed: int, epoch: int, difficulty: np.ndarray | None = None,
                num_buckets: int = 10) -> np.ndarray:
    """Positions ``0..n-1`` in the order of ``epoch``."""
    if order == "sequential":
        return np.arange(n, dtype=np.int64)
    if order == "shuffle":
        return shuffle_order(n, seed, epoch)
    if order == "bucket_shuffle":
        if difficulty is None:
            raise ValueError("order='bucket_shuffle' needs the samples' difficulty")
        return bucket_shuffle_order(difficulty, num_buckets, seed, epoch)
    raise ValueError(f"order must be one of {SAMPLER_ORDERS}, got {order!r}")


def greedy_pack_starts(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Start positions of the packs when ``lengths`` (in order) are packed greedily into ``seq_length``;
    the last entry is ``len(lengths)``. Every length must be ``<= seq_length``."""
    cs = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    starts = [0]
    i, n = 0, len(lengths)
    while i < n:
        # largest j with cs[j] - cs[i] <= seq_length: samples i..j-1 fit
        i = int(np.searchsorted(cs, cs[i] + seq_length, side="right")) - 1
        starts.append(i)
    return np.asarray(starts, dtype=np.int64)


class _EpochStream:
    """Epoch-by-epoch cache of (order, boundaries) with cumulative unit counts, for global indexing."""

    def __init__(self, build, max_cached: int = 2) -> None:
        self._build = build  # epoch -> (order, starts)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._counts: list[int] = []  # units per epoch, computed in order
        self._max_cached = max_cached

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._cache:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[e] = self._build(e)
        return self._cache[e]

    def locate(self, g: int) -> tuple[int, int]:
        """Global unit index -> (epoch, unit within epoch)."""
        if g < 0:
            raise IndexError(f"negative index {g}")
        e, base = 0, 0
        while True:
            if e == len(self._counts):
                self._counts.append(len(self.epoch(e)[1]) - 1)
                if self._counts[-1] <= 0:
                    raise ValueError("an epoch has no units: the dataset is empty")
            if g < base + self._counts[e]:
                return e, g - base
            base += self._counts[e]
            e += 1


class PackPlan:
    """THD micro-batch plan for SFT: ``plan.samples(step)`` = dataset indices of this rank's micro-batch."""

    def __init__(self, lengths: np.ndarray, seq_length: int, *, dp_rank: int = 0, dp_size: int = 1,
                 order: str = "sequential", seed: int = 1234, difficulty: np.ndarray | None = None,
                 num_buckets: int = 10, indices: np.ndarray | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        self.indices = np.arange(len(lengths), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)[self.indices]
        too_long = np.flatnonzero(self.lengths > seq_length)
        if len(too_long):
            i = int(self.indices[too_long[0]])
            raise ValueError(
                f"{len(too_long)} samples are longer than seq_length={seq_length} (e.g. sample {i} with "
                f"{int(self.lengths[too_long[0]])} tokens); preprocess with --seq-length <= {seq_length}"
            )
        if len(self.lengths) == 0:
            raise ValueError("no samples to pack")
        self.seq_length, self.dp_rank, self.dp_size = seq_length, dp_rank, dp_size
        self.order, self.seed, self.num_buckets = order, seed, num_buckets
        self.difficulty = None if difficulty is None else np.asarray(difficulty, np.float64)[self.indices]
        epoch_order(0, order, seed, 0, self.difficulty, num_buckets)  # validate the arguments early
        self._stream = _EpochStream(self._build)

    def _build(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = epoch_order(len(self.lengths), self.order, self.seed, epoch, self.difficulty, self.num_buckets)
        return order, greedy_pack_starts(self.lengths[order], self.seq_length)

    def global_pack(self, g: int) -> tuple[int, np.ndarray]:
        """(epoch, dataset indices) of global pack ``g``."""
        e, k = self._stream.locate(g)
        order, starts = self._stream.epoch(e)
        return e, self.indices[order[starts[k] : starts[k + 1]]]

    def samples(self, step: int) -> np.ndarray:
        """Dataset indices packed into this rank's micro-batch at ``step``."""
        return self.global_pack(step * self.dp_size + self.dp_rank)[1]

    def epoch_of(self, step: int) -> int:
        return self.global_pack(step * self.dp_size + self.dp_rank)[0]

    def packs_in_epoch(self, epoch: int) -> int:
        """Global number of packs in ``epoch`` (over all ranks)."""
        return len(self._stream.epoch(epoch)[1]) - 1

    def state(self) -> dict:
        return {"seq_length": self.seq_length, "dp_size": self.dp_size, "order": self.order, "seed": self.seed,
                "num_samples": len(self.lengths), "num_buckets": self.num_buckets}


class PromptPlan:
    """GRPO prompt plan: ``plan.prompts(step)`` = dataset indices of this rank's prompts at ``step``."""

    def __init__(self, indices: np.ndarray, global_batch: int, *, dp_rank: int = 0, dp_size: int = 1,
                 order: str = "sequential", seed: int = 1234, difficulty: np.ndarray | None = None,
                 num_buckets: int = 10) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError("no prompts")
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self.order, self.seed, self.num_buckets = order, seed, num_buckets
        self.difficulty = None if difficulty is None else np.asarray(difficulty, np.float64)
        epoch_order(0, order, seed, 0, self.difficulty, num_buckets)

    def _position(self, g: int) -> int:
        """Dataset index at global stream position ``g`` (epochs of ``len(indices)`` prompts each)."""
        n = len(self.indices)
        e, k = divmod(g, n)
        if getattr(self, "_cached_epoch", None) != e:
            self._cached_order = epoch_order(n, self.order, self.seed, e, self.difficulty, self.num_buckets)
            self._cached_epoch = e
        return int(self.indices[self._cached_order[k]])

    def prompts(self, step: int) -> np.ndarray:
        per_rank = self.global_batch // self.dp_size
        g0 = step * self.global_batch + self.dp_rank * per_rank
        return np.asarray([self._position(g) for g in range(g0, g0 + per_rank)], dtype=np.int64)

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached at the start of ``step``."""
        return step * self.global_batch / len(self.indices)
