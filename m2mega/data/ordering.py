"""Sample orders: the curriculum (ascending difficulty, seeded tie-break), shuffles, bucket shuffles.

Used twice: by preprocessing to lay samples out on disk (``--order``), so a sequential reader sees the
curriculum, and by the loader/samplers to re-order per epoch. Everything is a pure function of its
arguments (numpy ``default_rng`` seeded from ``(seed, epoch)``), so every data-parallel rank computes the
same order without communicating.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ORDERS", "curriculum_order", "shuffle_order", "difficulty_buckets", "bucket_shuffle_order", "epoch_rng"]

ORDERS = ("curriculum", "input", "shuffle")


def epoch_rng(seed: int, epoch: int = 0, stream: int = 0) -> np.random.Generator:
    """Independent generator per (seed, epoch, stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream)]))


def curriculum_order(difficulty: np.ndarray, seed: int) -> np.ndarray:
    """Indices sorting ``difficulty`` ascending; equal difficulties in a seeded random order.

    NaN (no difficulty) sorts last.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    tiebreak = epoch_rng(seed, 0, 1).permutation(len(d))
    return np.lexsort((tiebreak, d)).astype(np.int64)


def shuffle_order(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)``."""
    return epoch_rng(seed, epoch, 2).permutation(n).astype(np.int64)


def difficulty_buckets(difficulty: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket id per sample: ``floor(d * num_buckets)`` clipped to ``[0, num_buckets-1]``; NaN -> ``num_buckets``."""
    d = np.asarray(difficulty, dtype=np.float64)
    b = np.clip(np.floor(np.nan_to_num(d, nan=0.0) * num_buckets), 0, num_buckets - 1).astype(np.int64)
    b[np.isnan(d)] = num_buckets
    return b


def bucket_shuffle_order(difficulty: np.ndarray, num_buckets: int, seed: int, epoch: int) -> np.ndarray:
    """Curriculum at bucket granularity: buckets in ascending difficulty, samples shuffled inside each
    bucket with a fresh seed per epoch (so epochs differ but stay easy-to-hard)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    buckets = difficulty_buckets(difficulty, num_buckets)
    noise = epoch_rng(seed, epoch, 3).random(len(buckets))
    return np.lexsort((noise, buckets)).astype(np.int64)
