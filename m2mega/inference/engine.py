"""The rollout engine: shared group prefill + continuous batching over a preallocated KV slab.

GRPO draws G samples from each prompt. :class:`RolloutEngine` takes requests (a prompt, its images, how
many samples) and:

1. **Shared group prefill.** Each distinct prompt is prefilled once (the vision tower runs once per prompt),
   several prompts packed into one forward up to ``max_tokens_per_step`` tokens; its keys/values are then
   copied into the slots of its G samples, and each sample draws its first token from the prompt's logits
   with its own random stream.
2. **Continuous batching.** A queue of samples (prompt-major) keeps the decode batch full: when a sample
   stops (an EOS token, a stop string, or its ``max_new_tokens``), its slot goes to the next sample in the
   queue. Live slots are kept as a prefix ``0..n-1`` of the slab (a finishing slot is filled by moving the
   last live one into it), so every decode step runs on views of fixed buffers.
3. **KV slab.** :class:`~m2mega.inference.kv_cache.KVSlab` is allocated once per call (reused across calls
   when big enough) with ``slots x capacity`` tokens, ``slots <= max_batch`` and
   ``slots x capacity <= max_kv_tokens``: the memory bound. Decode attends over the live slots' prefix of
   the slab rounded up to 64 columns (``span``). On CPU (fp32, TP1) a decode step on the slab runs as one
   fused kernel call (:mod:`~m2mega.inference.fused_decode`); for groups of very long prompts
   (:func:`~m2mega.inference.cascade.use_cascade`), :class:`~m2mega.inference.cascade.CascadeKV` takes the
   slab's place: each prompt's keys and values stored once and attended once per group (cascade
   attention), the slots holding only what they generate.
4. **CUDA graphs** (:func:`use_cuda_graphs`): on CUDA at TP1 x PP1 decode steps are captured per
   (batch bucket, span), both powers of two, and replayed; padded rows point at free slots. A capture that
   fails is warned about once and decoding continues eagerly.

Sampling uses per-sample counter-based streams (:func:`~m2mega.inference.sampling.stream_key` of the seed,
the request's key and the member number; the t-th token uses step t), so the tokens of a sample do not
depend on batch size, slot order or which other requests share the call. Greedy decoding gives the same
tokens as ``generate()`` (and HF). Every rank of a model replica calls :meth:`RolloutEngine.generate` with
the same arguments; the last stage's choices are broadcast, so all ranks schedule identically.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from m2mega.models.wrappers import unwrap_vlm
from m2mega.runtime.cpu import plain_dispatch

from .cascade import CascadeKV, use_cascade
from .fused_decode import use_fused_decode
from .generate import _broadcast_choice, _collect_images, _collect_seconds, _inference_mode
from .graphs import _bucket, _Graphs, use_cuda_graphs
from .kv_cache import KVSlab
from .sampling import SamplingParams, select_from_streams, stream_key, stream_uniforms

__all__ = ["Request", "Sample", "EngineStats", "RolloutEngine", "use_cuda_graphs", "use_cascade"]

_SPAN_ALIGN = 64  # decode attends over a multiple of this many slab columns (fewer distinct shapes)


@dataclass
class Request:
    """One prompt and how many samples to draw from it. Images: patches ``[n, C*T*P*P]`` and grids
    ``[n_images, 3]`` (None or empty: none); videos likewise, with ``second_per_grid_ts`` per video (the
    M-RoPE time axis, default 1 s), as :func:`~m2mega.inference.generate.generate` takes them per prompt.
    ``key`` names the request's random streams (default: its index in the call); ``max_new_tokens``
    overrides the call's value for this request."""

    prompt: Tensor
    pixel_values: Optional[Tensor] = None
    image_grid_thw: Optional[Tensor] = None
    num_samples: int = 1
    max_new_tokens: Optional[int] = None
    key: Optional[int] = None
    pixel_values_videos: Optional[Tensor] = None
    video_grid_thw: Optional[Tensor] = None
    second_per_grid_ts: Optional[Tensor] = None


@dataclass
class Sample:
    """One generated continuation: ``tokens`` (the stop token included), their log-probabilities under
    ``softmax(logits / temperature)`` before top-k/top-p (as :func:`select_next_tokens`), and why it
    stopped: ``"eos"``, ``"stop_string"`` or ``"length"``."""

    tokens: Tensor
    logprobs: Tensor
    stop: str

    @property
    def finished(self) -> bool:
        return self.stop != "length"


@dataclass
class EngineStats:
    """What the last :meth:`RolloutEngine.generate` call did and how long it took (seconds)."""

    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0  # prefilled once per request
    generated_tokens: int = 0
    images_encoded: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    slots: int = 0
    capacity: int = 0
    slot_occupancy: float = 0.0  # mean live slots / slots over decode steps
    cuda_graphs: bool = False
    cascade: bool = False  # decoded with cascade attention (CascadeKV)
    fused_decode: bool = False  # decoded with the fused CPU kernel (m2mega._C.lm_decode_cpu)
    graphs_captured: int = 0
    kv_bytes: int = 0
    slab_allocations: int = 0  # over the engine's lifetime

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class _Prefix:
    keys: list[Tensor]  # per layer [kv_heads, S, head_dim] (views of the packed prefill output)
    values: list[Tensor]
    logits: Optional[Tensor]  # [vocab] of the prompt's last token (last stage)
    length: int
    next_rope: int  # M-RoPE position of the first generated token
    pending: int  # members not yet given a slot


@dataclass
class _Live:
    request: int
    member: int
    key: int
    max_new: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cache_len: int = 0  # positions written in the slab
    rope: int = 0  # rotary position of the next token fed


class RolloutEngine:
    """Generates samples of many prompts with one model replica. ``max_batch``: decode slots;
    ``max_tokens_per_step``: prompt tokens packed into one prefill forward (a longer prompt runs alone);
    ``max_kv_tokens``: bound on slots x capacity of the KV slab (None: half the free memory on CUDA, no
    bound elsewhere); ``cuda_graphs``: auto / on / off (:func:`use_cuda_graphs`); ``cascade``: auto / on /
    off, cascade attention over shared prompts (:func:`use_cascade`); ``fused_decode``: auto / on / off, the
    fused CPU decode step (:func:`~m2mega.inference.fused_decode.use_fused_decode`)."""

    def __init__(self, model, *, max_batch: int = 256, max_tokens_per_step: int = 8192,
                 max_kv_tokens: Optional[int] = None, cuda_graphs: str = "auto", cascade: str = "auto",
                 fused_decode: str = "auto") -> None:
        from .stage import LMStage

        if max_batch < 1 or max_tokens_per_step < 1:
            raise ValueError(f"max_batch and max_tokens_per_step must be >= 1, got {max_batch}, "
                             f"{max_tokens_per_step}")
        self.model = unwrap_vlm(model)
        self.stage = LMStage(self.model)
        self.max_batch, self.max_tokens_per_step, self.max_kv_tokens = max_batch, max_tokens_per_step, max_kv_tokens
        self.graphs_on = use_cuda_graphs(cuda_graphs, self.stage.device.type, self.stage.tp, self.stage.pp)
        if cascade not in ("auto", "on", "off"):
            raise ValueError(f"cascade must be auto, on or off, got {cascade!r}")
        if cascade == "on" and not self.stage.matmul_attention:
            raise ValueError("cascade=on needs the CPU decode (matmul attention); CUDA decodes from the KV slab")
        self.cascade = cascade
        self.stage.fused_decode = use_fused_decode(fused_decode, self.stage)
        self.slab = None
        self._graphs: Optional[_Graphs] = None
        self.stats = EngineStats()
        self._allocations = 0

    def release(self) -> None:
        """Free the KV slab and captured graphs (GRPO calls this before the training step needs the memory)."""
        self.slab = None
        self._graphs = None

    # ------------------------------------------------------------------ public
    def generate(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(greedy=True),
        eos_token_id: int | Sequence[int] | None = None,
        seed: int = 0,
        suppress_token_ids: Optional[Sequence[int]] = None,
        stop_strings: Sequence[str] = (),
        decode: Optional[Callable[[list[int]], str]] = None,
    ) -> list[list[Sample]]:
        """``num_samples`` samples of every request, in request order. ``stop_strings`` end a sample once
        its decoded text contains one (``decode`` turns token ids into text; the tokens completing the
        string are kept, as HF does); ``suppress_token_ids`` are never generated (the returned log-probs are
        still under the full distribution, as the training forward computes them)."""
        t_start = time.perf_counter()
        reqs = self._check(requests, max_new_tokens)
        if stop_strings and decode is None:
            raise ValueError("stop_strings need decode= (token ids -> text)")
        eos = set() if eos_token_id is None else {int(e) for e in torch.as_tensor(eos_token_id).flatten().tolist()}
        # A stop string of c characters spans at most 4c tokens (one per UTF-8 byte).
        window = 4 * max((len(s) for s in stop_strings), default=0) + 1
        dev = self.stage.device
        bias = None
        if suppress_token_ids:
            bias = torch.zeros(self.stage.vocab, device=dev)
            bias[list(suppress_token_ids)] = float("-inf")
        caps = [r.prompt.numel() + r.max_new_tokens for r in reqs]
        capacity = max(caps)
        total = sum(r.num_samples for r in reqs)
        slots = min(self.max_batch, total)
        budget = self.max_kv_tokens if self.max_kv_tokens is not None else self._default_kv_tokens()
        if budget is not None:
            if budget < capacity:
                raise ValueError(f"max_kv_tokens={budget} cannot hold one sequence of {capacity} tokens "
                                 f"(prompt + max_new_tokens)")
            slots = min(slots, budget // capacity)
        slab = self._slab(slots, capacity, reqs)
        table = self.stage.rotary.cos.data_ptr()
        self.stage.rotary.ensure(capacity + 1)  # before any capture: the table never moves while decoding
        if self._graphs is not None and self.stage.rotary.cos.data_ptr() != table:
            self._graphs = _Graphs()  # captured steps read the old table
        st = self.stats = EngineStats(requests=len(reqs), samples=total, slots=slab.slots, capacity=slab.capacity,
                                      cuda_graphs=self.graphs_on, kv_bytes=slab.nbytes,
                                      cascade=isinstance(slab, CascadeKV),
                                      fused_decode=self.stage.fused_decode and isinstance(slab, KVSlab),
                                      slab_allocations=self._allocations)
        results: list[list[Optional[Sample]]] = [[None] * r.num_samples for r in reqs]
        queue = deque((i, j) for i, r in enumerate(reqs) for j in range(r.num_samples))
        prefixes: dict[int, _Prefix] = {}
        live: list[_Live] = []
        occupancy = 0

        def finish(slot: int, why: str) -> None:
            s = live[slot]
            results[s.request][s.member] = Sample(torch.tensor(s.tokens, dtype=torch.long),
                                                  torch.tensor(s.logprobs, dtype=torch.float32), why)
            st.generated_tokens += len(s.tokens)
            last = len(live) - 1
            if slot != last:  # keep live slots a prefix: the last one moves into the hole
                slab.move(last, slot, live[last].cache_len)
                live[slot] = live[last]
            slab.release(last)
            live.pop()

        def take(slot_ids: list[int], toks: list[int], lps: list[float]) -> None:
            """Record each slot's new token; stop the ones that are done (highest slot first)."""
            done = []
            for i, t, lp in zip(slot_ids, toks, lps):
                s = live[i]
                s.tokens.append(t)
                s.logprobs.append(lp)
                if t in eos:
                    done.append((i, "eos"))
                elif stop_strings and any(x in decode(s.tokens[-window:]) for x in stop_strings):
                    done.append((i, "stop_string"))
                elif len(s.tokens) >= s.max_new:
                    done.append((i, "length"))
            for i, why in sorted(done, reverse=True):
                finish(i, why)

        with _inference_mode(self.model):
            self.stage.pack_weights()
            try:
                while queue or live:
                    if queue and len(live) < slab.slots:
                        t0 = time.perf_counter()
                        self._admit(reqs, queue, prefixes, live, slab, sampling, seed, bias, take, st)
                        st.prefill_s += time.perf_counter() - t0
                    if not live:
                        continue
                    t0 = time.perf_counter()
                    n = len(live)
                    occupancy += n
                    st.decode_steps += 1
                    with plain_dispatch(self.stage.device):
                        toks, lps = self._decode_step(live, slab, sampling, bias)
                        take(list(range(n)), toks, lps)
                    st.decode_s += time.perf_counter() - t0
            finally:
                self.stage.unpack_weights()
        st.slot_occupancy = occupancy / (st.decode_steps * slab.slots) if st.decode_steps else 0.0
        st.graphs_captured = len(self._graphs.graphs) if self._graphs is not None else 0
        st.total_s = time.perf_counter() - t_start
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _check(self, requests: Sequence[Request], max_new_tokens: int) -> list[Request]:
        if not requests:
            raise ValueError("RolloutEngine.generate needs at least one request")
        out = []
        for i, r in enumerate(requests):
            p = r.prompt
            if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"request {i}: prompt must be a non-empty 1-D tensor of token ids, got {shape}")
            if p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ValueError(f"request {i}: prompt has dtype {p.dtype}; token ids must be integers")
            lo, hi = int(p.min()), int(p.max())
            if lo < 0 or hi >= self.stage.vocab:
                raise ValueError(f"request {i}: token ids in [{lo}, {hi}] outside the vocabulary "
                                 f"[0, {self.stage.vocab})")
            m = r.max_new_tokens if r.max_new_tokens is not None else max_new_tokens
            if m < 1:
                raise ValueError(f"request {i}: max_new_tokens must be >= 1, got {m}")
            if r.num_samples < 1:
                raise ValueError(f"request {i}: num_samples must be >= 1, got {r.num_samples}")
            dev = self.stage.device
            try:
                pv, grid = _collect_images(1, [r.pixel_values], [r.image_grid_thw], dev)
                vpv, vgrid = _collect_images(1, [r.pixel_values_videos], [r.video_grid_thw], dev,
                                             ("pixel_values_videos", "video_grid_thw"))
                sec = _collect_seconds(1, [vgrid], [r.second_per_grid_ts]) if vgrid is not None else None
            except ValueError as e:
                raise ValueError(f"request {i}: {str(e).replace('prompt 0: ', '')}") from None
            out.append(Request(p.to(dev, torch.long), pixel_values=pv, image_grid_thw=grid, num_samples=r.num_samples,
                               max_new_tokens=m, key=i if r.key is None else int(r.key), pixel_values_videos=vpv,
                               video_grid_thw=vgrid, second_per_grid_ts=sec))
        return out

    def _default_kv_tokens(self) -> Optional[int]:
        """On CUDA, half of the free memory (keys and values of this stage's layers); elsewhere no bound."""
        if self.stage.device.type != "cuda":
            return None
        if self.slab is not None:  # the current slab's memory is reusable
            return max(self.slab.slots * self.slab.capacity, self._kv_tokens_in(torch.cuda.mem_get_info()[0] // 2))
        return self._kv_tokens_in(torch.cuda.mem_get_info()[0] // 2)

    def _kv_tokens_in(self, nbytes: int) -> int:
        st = self.stage
        per_token = len(st.layers) * 2 * st.groups * st.head_dim * torch.finfo(st.dtype).bits // 8
        return int(nbytes // max(1, per_token))

    def _slab(self, slots: int, capacity: int, reqs: list[Request]):
        s = self.slab
        lens = [r.prompt.numel() for r in reqs]
        if use_cascade(self.cascade, self.stage.matmul_attention, lens, [r.num_samples for r in reqs],
                       self.stage.fused_decode):
            need = (slots, min(slots, len(reqs)), max(lens), max(r.max_new_tokens for r in reqs))
            if not isinstance(s, CascadeKV) or not s.fits(*need):
                self.slab = None
                self.slab = self.stage.new_cascade(*need)
                self._allocations += 1
            self.slab.reset()
            return self.slab
        if not isinstance(s, KVSlab) or s.slots < slots or s.capacity < capacity:
            self.slab = None  # free the old one first
            self._graphs = None
            self.slab = self.stage.new_slab(slots, capacity)
            self._allocations += 1
        if self.graphs_on and self._graphs is None:
            self._graphs = _Graphs()
        return self.slab

    def _choose(self, logits: Optional[Tensor], keys: list[int], steps: list[int], sampling: SamplingParams,
                bias: Optional[Tensor]) -> tuple[list[int], list[float]]:
        n = len(keys)
        tok = lp = None
        if logits is not None:
            u = None
            if not sampling.is_greedy:
                dev = logits.device
                u = stream_uniforms(torch.tensor(keys, dtype=torch.long, device=dev),
                                    torch.tensor(steps, dtype=torch.long, device=dev))
            tok, lp = select_from_streams(logits, sampling, u, bias)
        if self.stage.tp > 1 or self.stage.pp > 1:
            tok, lp = _broadcast_choice(tok, lp, n, self.stage.device)
        return tok.tolist(), lp.tolist()

    def _prefill(self, reqs: list[Request], pack: list[int], st: EngineStats) -> dict[int, _Prefix]:
        stage, m = self.stage, self.model
        ids = torch.cat([reqs[i].prompt for i in pack])
        lengths = [reqs[i].prompt.numel() for i in pack]

        def cat(attr: str) -> Optional[Tensor]:
            xs = [getattr(reqs[i], attr) for i in pack if getattr(reqs[i], attr) is not None]
            return torch.cat(xs) if xs else None

        pv, grid = cat("pixel_values"), cat("image_grid_thw")
        vpv, vgrid = cat("pixel_values_videos"), cat("video_grid_thw")
        sec = None
        if vgrid is not None:  # a video without its seconds per grid step counts 1 s (M-RoPE's default)
            sec = torch.cat([reqs[i].second_per_grid_ts if reqs[i].second_per_grid_ts is not None
                             else torch.ones(reqs[i].video_grid_thw.shape[0]) for i in pack
                             if reqs[i].video_grid_thw is not None])
        with plain_dispatch(stage.device):  # many small ops, no device literals: skip the CPU runtime's mode
            positions, _ = _packed_positions(m, [reqs[i].prompt for i in pack], grid, vgrid, sec)
        logits, keys, values = stage.prefill(ids, positions, lengths, pv, grid, vpv, vgrid)
        st.prompt_tokens += ids.numel()
        st.images_encoded += sum(0 if g is None else g.shape[0] for g in (grid, vgrid))
        out, off = {}, 0
        for row, (i, S) in enumerate(zip(pack, lengths)):
            seg = slice(off, off + S)
            out[i] = _Prefix(keys=[k[seg].transpose(0, 1) for k in keys],
                             values=[v[seg].transpose(0, 1) for v in values],
                             logits=None if logits is None else logits[row], length=S,
                             next_rope=int(positions[:, seg].max()) + 1, pending=reqs[i].num_samples)
            off += S
        return out

    def _pack(self, reqs: list[Request], queue, prefixes: dict, free: int) -> list[int]:
        """The distinct requests to prefill next: the queue's head (always) and the following ones whose
        samples can start now (``free`` slots), packed up to the token budget."""
        need, pack, tokens, seen = 0, [], 0, set()
        for i, _ in queue:
            if i in seen:
                continue
            seen.add(i)
            if need >= free:
                break
            if i in prefixes:
                need += prefixes[i].pending
                continue
            S = reqs[i].prompt.numel()
            if pack and tokens + S > self.max_tokens_per_step:
                break
            pack.append(i)
            tokens += S
            need += reqs[i].num_samples
        return pack

    def _admit(self, reqs, queue, prefixes, live, slab, sampling, seed, bias, take, st) -> None:
        while queue and len(live) < slab.slots:
            i = queue[0][0]
            if i not in prefixes:  # samples that stop at their first token can free slots for later prompts
                prefixes.update(self._prefill(reqs, self._pack(reqs, queue, prefixes, slab.slots - len(live)), st))
            pre = prefixes[i]
            members = []
            while queue and queue[0][0] == i and len(live) + len(members) < slab.slots:
                members.append(queue.popleft()[1])
            first = len(live)
            with plain_dispatch(self.stage.device):
                idx = torch.arange(first, first + len(members), device=slab.mask.device)
                slab.load_prefix(idx, pre.keys, pre.values)
                r = reqs[i]
                for j in members:
                    live.append(_Live(request=i, member=j, key=stream_key(seed, r.key, j),
                                      max_new=r.max_new_tokens, cache_len=pre.length, rope=pre.next_rope))
                logits = None if pre.logits is None else pre.logits.unsqueeze(0).expand(len(members), -1)
                toks, lps = self._choose(logits, [s.key for s in live[first:]], [0] * len(members), sampling, bias)
                pre.pending -= len(members)
                if pre.pending == 0:
                    del prefixes[i]
                take(list(range(first, first + len(members))), toks, lps)

    def _decode_step(self, live: list[_Live], slab, sampling, bias) -> tuple[list[int], list[float]]:
        n = len(live)
        dev = self.stage.device
        need = max(s.cache_len for s in live) + 1
        if self._graphs is not None:  # few distinct shapes to capture: powers of two
            span = min(slab.capacity, max(_SPAN_ALIGN, _bucket(need, 1 << 62)))
        else:
            span = min(slab.capacity, -(-need // _SPAN_ALIGN) * _SPAN_ALIGN)
        tokens = torch.tensor([s.tokens[-1] for s in live], dtype=torch.long, device=dev)
        cache_pos = torch.tensor([s.cache_len for s in live], dtype=torch.long, device=dev)
        rope_pos = torch.tensor([s.rope for s in live], dtype=torch.long, device=dev)
        slab.attend(torch.arange(n, device=dev), cache_pos)
        logits = None
        if self._graphs is not None:
            try:
                logits = self._graphs.run(self.stage, slab, tokens, cache_pos, rope_pos, span)
            except RuntimeError as e:  # a capture this torch/driver refuses: run eagerly from now on
                warnings.warn(f"rollout engine: CUDA graph capture failed ({e}); decoding without graphs")
                self._graphs, self.graphs_on = None, False
        if logits is None:
            logits = self.stage.decode(tokens, cache_pos, rope_pos, slab, span)
        keys = [s.key for s in live]
        steps = [len(s.tokens) for s in live]
        for s in live:
            s.cache_len += 1
            s.rope += 1
        return self._choose(logits, keys, steps, sampling, bias)


def _packed_positions(model, prompts: list[Tensor], grid: Optional[Tensor], video_grid: Optional[Tensor],
                      seconds: Optional[Tensor]) -> tuple[Tensor, list[int]]:
    """M-RoPE positions ``[3, T]`` of prompts packed back to back (each restarting at 0), HF's rule."""
    from m2mega.models.qwen25vl.rope_index import get_rope_index_packed

    c = model.cfg
    pos, deltas = get_rope_index_packed(
        prompts, grid, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, spatial_merge_size=c.vision.spatial_merge_size,
        video_grid_thw=video_grid, second_per_grid_ts=seconds, tokens_per_second=c.vision.tokens_per_second)
    return pos.to(prompts[0].device), deltas
