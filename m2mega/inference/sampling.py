"""Next-token selection: greedy, or temperature / top-k / top-p sampling, as HF ``generate`` does it.

Works on full-vocabulary logits ``[B, V]`` (the generator gathers TP slices first, so every TP rank sees
bit-identical logits and, with the same seeded generator, draws the same tokens).

Two sources of randomness:

- ``select_next_tokens(..., generator)``: one ``torch.Generator`` for a whole batch (``generate()``): row i's
  draw depends on the rows before it, so results depend on how rollouts are batched;
- :func:`select_from_streams`: the rollout engine's counter-based streams. Each sample (a prompt and its
  member number in the group) has a 64-bit key; its t-th token uses the uniform ``splitmix64(key, t)``, and
  the token is the inverse CDF of the filtered distribution at that uniform. Draws therefore do not depend
  on which other rollouts share the batch, on slot order or on the batch size, and the integer hash gives
  the same numbers on CPU and GPU. (torch has no per-row generator; one ``torch.Generator`` per row would
  cost a call per row and step.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SamplingParams", "select_next_tokens", "filter_logits", "stream_key", "stream_uniforms",
           "select_from_streams"]


@dataclass(frozen=True)
class SamplingParams:
    """``greedy`` (or ``temperature == 0``) takes the argmax; otherwise sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (0 = all) and the
    smallest set whose probability reaches ``top_p`` (1.0 = all)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf (HF's TopK then TopP warpers' order and
    tie rules: top-p drops tokens whose cumulative ascending probability is <= 1 - top_p, always keeping
    the most likely one)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_next_tokens(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick one token per row of ``logits [B, V]``. Returns ``(tokens [B] int64, logprobs [B] fp32)``.

    ``logprobs`` is the log-probability of the chosen token under ``softmax(logits / temperature)``
    *before* top-k/top-p filtering (plain ``log_softmax(logits)`` when greedy): the policy distribution
    GRPO's old-policy ratio needs, independent of the exploration filter.
    """
    logits = logits.float()
    if params.is_greedy:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        scaled = logits / params.temperature
        logp = torch.log_softmax(scaled, -1)
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64): the reference the tensor version is tested against."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def stream_key(seed: int, prompt: int, member: int) -> int:
    """The 64-bit stream key (as a signed int64) of member ``member`` of prompt ``prompt`` under ``seed``."""
    k = _splitmix64(int(seed) & _MASK64)
    k = _splitmix64(k ^ (int(prompt) & _MASK64))
    return _signed(_splitmix64(k ^ (int(member) & _MASK64)))


def _lsr(x: Tensor, s: int) -> Tensor:
    # logical right shift of int64 (torch's >> is arithmetic)
    return (x >> s) & ((1 << (64 - s)) - 1)


def stream_uniforms(keys: Tensor, steps: Tensor) -> Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits) for streams ``keys [n]`` (int64) at ``steps [n]``:
    ``splitmix64(key + (step + 1) * golden)``. Integer ops only, so every device gives the same bits
    (int64 products wrap modulo 2^64 on CPU and CUDA, as splitmix64 needs)."""
    x = keys + (steps + 1) * _signed(_GOLDEN)
    x = x + _signed(_GOLDEN)
    x = (x ^ _lsr(x, 30)) * _signed(_MIX1)
    x = (x ^ _lsr(x, 27)) * _signed(_MIX2)
    x = x ^ _lsr(x, 31)
    return _lsr(x, 11).double() * (1.0 / (1 << 53))


def select_from_streams(logits: Tensor, params: SamplingParams, uniforms: Tensor | None,
                        suppress: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Like :func:`select_next_tokens` (same distribution, filters and log-probs), drawing row i by inverse
    CDF at ``uniforms[i]`` (from :func:`stream_uniforms`; ignored when greedy). A zero-probability token is
    never picked: the CDF does not rise at it, and the pick is the first index whose CDF exceeds u x total.
    ``suppress`` (``[V]``, 0 or -inf) is added to the logits the token is picked from, like top-k/top-p,
    but not to those the log-probs come from: they stay the policy's full distribution, which is what the
    training forward computes for the same token."""
    logits = logits.float()
    pick = logits if suppress is None else logits + suppress
    if params.is_greedy:
        tokens = pick.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        t = params.temperature  # x / 1.0 == x exactly: skip two passes over [n, vocab] at temperature 1
        scaled, pick = (logits, pick) if t == 1.0 else (logits / t, pick / t)
        logp = torch.log_softmax(scaled, -1)
        cdf = filter_logits(pick, params.top_k, params.top_p).softmax(-1).double().cumsum(-1)
        target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
