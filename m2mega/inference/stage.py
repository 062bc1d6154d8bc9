"""Inference-only forward of this rank's stage of m2mega's Qwen2.5-VL language model, for the rollout engine.

It computes what megatron's ``TransformerLayer`` stack computes in eval mode (RMSNorm -> QKV with bias ->
rotary -> attention -> output projection -> residual -> RMSNorm -> SwiGLU MLP -> residual, then the final
norm and the output layer), reading the same parameters, but on token-major ``[n, hidden]`` activations
and with attention over the engine's :class:`~m2mega.inference.kv_cache.KVSlab`:

- **prefill** (:meth:`LMStage.prefill`): distinct prompts packed back to back (THD) with causal attention
  inside each prompt (``segment_attention``, the training path's packed kernel); returns every layer's
  keys/values so the group's slots can copy them, and the logits of each prompt's last token only;
- **decode** (:meth:`LMStage.decode`): one new token per live slot; its key/value is written at the slot's
  length and attention reads the slot's prefix of the slab with the slab's running mask.

Why not megatron's own inference path: it keeps ``[seq, batch, heads, dim]`` caches that its attention
reorders on every step, rebuilds masks and rotary embeddings of the whole sequence each step, and its layer
modules cost far more Python per token than the arithmetic of a small model. The output is checked against
the training forward (``tests/test_rollout_engine.py``: logits of a teacher-forced sequence).

TP: the local shards of the column-parallel linears are used as they are; the row-parallel outputs are
all-reduced over the TP group and the vocab-parallel logits all-gathered, like megatron's layers do. PP:
each stage runs its own layers; activations ``[n, hidden]`` go to the next stage with megatron's inference
p2p helpers. Sequence parallelism does not apply (token-major activations are never split). TP larger than
the number of KV heads: QKV is gathered over TP and each rank keeps a replica of its KV head (megatron's
rule), see ``LMStage._replicated_qkv``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from m2mega.runtime.cpu import plain_dispatch

from .cascade import CascadeKV
from .fused_decode import FusedDecodeWeights
from .kv_cache import KVSlab, RotaryTable

__all__ = ["LMStage"]


class _Layer:
    __slots__ = ("ln1", "wqkv", "bqkv", "wproj", "bproj", "ln2", "wfc1", "bfc1", "wfc2", "bfc2", "t")

    def __init__(self, layer) -> None:
        att, mlp = layer.self_attention, layer.mlp
        self.ln1 = layer.input_layernorm.weight
        self.wqkv, self.bqkv = att.linear_qkv.weight, att.linear_qkv.bias
        self.wproj, self.bproj = att.linear_proj.weight, att.linear_proj.bias
        self.ln2 = layer.pre_mlp_layernorm.weight
        self.wfc1, self.bfc1 = mlp.linear_fc1.weight, mlp.linear_fc1.bias
        self.wfc2, self.bfc2 = mlp.linear_fc2.weight, mlp.linear_fc2.bias
        self.t: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None  # [in, out] copies (LMStage.pack_weights)


def _linear(x: Tensor, w: Tensor, wt: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
    # ``wt`` (when packed): ``w.t().contiguous()``. MKL's skinny fp32 GEMM on CPU ran 13-35% faster
    # reading B as [in, out] than as a transposed [out, in] view (8-32 rows, 2-core AMD EPYC; equal at 1
    # row; bit-identical results there), and a decode step's matmuls are most of its time.
    if wt is None:
        return F.linear(x, w, b)
    return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)


def _rms(x: Tensor, w: Tensor, eps: float, fused: bool) -> Tensor:
    # The model's RMSNorm (layer_specs.RMSNorm) with its backend picked once instead of per call, and no
    # no-op casts for fp32 (each torch call costs microseconds here).
    if fused:
        return w * F.rms_norm(x, (x.shape[-1],), None, eps)
    if x.dtype == torch.float32:
        if x.device.type == "cpu":
            # torch's CPU rms_norm runs the same ops in the same order, (x * rsqrt(mean(x^2) + eps)) * w,
            # in one call instead of five (bit-identical: tests/test_rollout_engine.py).
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rope(t: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    # megatron's _apply_rotary_pos_emb_bshd (non-interleaved): t * cos + cat(-x2, x1) * sin, written as
    # t * cos + roll(t) * [-sin, sin] (the sign moves onto the table; the products are bit-identical).
    return t * cos + t.roll(t.shape[-1] // 2, dims=-1) * sin_signed


class LMStage:
    """This rank's language-model stage of an (unwrapped) m2mega ``Qwen25VLModel``, inference only."""

    def __init__(self, model) -> None:
        from megatron.core import parallel_state as ps

        from m2mega.runtime.backends import Environment, select_backends

        cfg = model.config
        lm = model.language_model
        self.model, self.lm = model, lm
        self.first, self.last = bool(model.pre_process), bool(model.post_process)
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.heads = cfg.num_attention_heads // self.tp
        # TP larger than the KV heads (a multiple of them, as the model config requires): each rank holds a
        # replica of one KV head, as megatron's SelfAttention does (see _replicated_qkv).
        self.kv_rep = max(1, self.tp // cfg.num_query_groups)
        if self.kv_rep > 1 and self.tp % cfg.num_query_groups:
            raise ValueError(f"rollout engine: TP={self.tp} is not a multiple of the {cfg.num_query_groups} KV heads")
        self.groups = max(1, cfg.num_query_groups // self.tp)
        self.qpg = self.heads // self.groups
        if self.kv_rep > 1:
            rank = ps.get_tensor_model_parallel_rank()
            full = cfg.num_attention_heads // cfg.num_query_groups  # query heads of one KV head
            self._rep_group, self._rep_width = rank // self.kv_rep, (full + 2) * cfg.kv_channels
            j = rank % self.kv_rep  # this rank's slice of its group's query heads, then the group's k and v
            self._rep_select = [*range(j * self.heads, (j + 1) * self.heads), full, full + 1]
        self.head_dim = cfg.kv_channels
        self.hidden = cfg.hidden_size
        self.eps = cfg.layernorm_epsilon
        self.act = cfg.activation_func
        self.scale = 1.0 / (self.head_dim ** 0.5)
        self.vocab = model.vocab_size
        self.layers = [_Layer(layer) for layer in lm.decoder.layers]
        p = next(iter(lm.parameters()))
        self.device, self.dtype = p.device, p.dtype
        if self.kv_rep > 1:
            self._rep_select = torch.tensor(self._rep_select, device=self.device)
        # Decode attention as two batched matmuls instead of SDPA (see decode; True on CPU).
        self.matmul_attention = self.device.type == "cpu"
        self.fused_norm = select_backends(Environment.of(p), self.dtype).rms_norm == "torch_fused"
        self.final_ln = lm.decoder.final_layernorm.weight if self.last else None
        self.out_w = model.output_weight() if self.last else None
        self.out_t: Optional[Tensor] = None  # [hidden, vocab shard] copy of out_w (pack_weights)
        self.rotary = RotaryTable(lm.rotary_pos_emb.inv_freq, cfg.mrope_section, dtype=self.dtype,
                                  device=self.device)
        # Decode steps on a KV slab through m2mega._C.lm_decode_cpu (the engine decides: use_fused_decode);
        # its weight list is built by pack_weights, like the [in, out] copies it reads.
        self.fused_decode = False
        self._fused: Optional[FusedDecodeWeights] = None

    # ------------------------------------------------------------------ pieces
    def pack_weights(self) -> None:
        """On CPU, copy this stage's LM matmul weights as ``[in, out]`` (see :func:`_linear`); elsewhere
        nothing. The engine packs at the start of every ``generate`` (weights change between GRPO steps, so
        the copies are taken from the live parameters each time) and unpacks at its end: one extra copy of
        the stage's LM weights while rollouts run, none otherwise."""
        if self.device.type != "cpu":
            return
        for L in self.layers:
            L.t = tuple(w.detach().t().contiguous() for w in (L.wqkv, L.wproj, L.wfc1, L.wfc2))
        if self.last:
            self.out_t = self.out_w.detach().t().contiguous()
        self._fused = FusedDecodeWeights(self) if self.fused_decode else None

    def unpack_weights(self) -> None:
        for L in self.layers:
            L.t = None
        self.out_t = None
        self._fused = None

    def new_slab(self, slots: int, capacity: int) -> KVSlab:
        return KVSlab(len(self.layers), slots, self.groups, capacity, self.head_dim, dtype=self.dtype,
                      device=self.device)

    def new_cascade(self, slots: int, blocks: int, prefix_cap: int, suffix_cap: int) -> CascadeKV:
        return CascadeKV(len(self.layers), slots, blocks, self.groups, prefix_cap, suffix_cap, self.head_dim,
                         dtype=self.dtype, device=self.device)

    def _embed(self, ids: Tensor) -> Tensor:
        emb = self.lm.embedding.word_embeddings
        if self.tp == 1:
            return F.embedding(ids, emb.weight)
        return emb(ids[None])[0]  # masks out-of-shard ids and all-reduces over TP

    def _reduce(self, x: Tensor) -> Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _replicated_qkv(self, qkv: Tensor) -> Tensor:
        """TP > KV heads: this rank's column shard of QKV ``[n, width / TP]`` -> its own ``[n, (heads + 2) *
        head_dim]`` in the per-group ``[q.., k, v]`` layout. The shards split a KV group's ``[q.., k, v]``
        block between ranks, so (as megatron's ``get_query_key_value_tensors``) the full QKV is gathered,
        the rank's group taken, and within it the rank's query heads plus the (replicated) key and value."""
        parts = [torch.empty_like(qkv) for _ in range(self.tp)]
        dist.all_gather(parts, qkv.contiguous(), group=self.tp_group)
        w = self._rep_width
        grp = torch.cat(parts, dim=-1)[:, self._rep_group * w:(self._rep_group + 1) * w]
        return grp.reshape(qkv.shape[0], -1, self.head_dim).index_select(1, self._rep_select).reshape(qkv.shape[0], -1)

    def _logits(self, x: Tensor) -> Tensor:
        x = _rms(x, self.final_ln, self.eps, self.fused_norm)
        logits = _linear(x, self.out_w, self.out_t, None)
        if self.tp_group is not None:
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits[:, : self.vocab].float()

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Callable[[int, Tensor, Tensor, Tensor], Tensor]
                ) -> Tensor:
        n = x.shape[0]
        g, qpg, d = self.groups, self.qpg, self.head_dim
        for li, L in enumerate(self.layers):
            wt = L.t or (None, None, None, None)
            h = _rms(x, L.ln1, self.eps, self.fused_norm)
            qkv = _linear(h, L.wqkv, wt[0], L.bqkv)
            if self.kv_rep > 1:
                qkv = self._replicated_qkv(qkv)
            qkv = qkv.view(n, g, qpg + 2, d)  # megatron's per-group [q.., k, v] layout
            qk = _rope(qkv[:, :, : qpg + 1], cos, sin)  # queries and key of each group in one go
            q, k, v = qk[:, :, :qpg], qk[:, :, qpg], qkv[:, :, qpg + 1]  # [n, g, qpg, d], [n, g, d], [n, g, d]
            o = attend(li, q, k, v)  # [n, heads * d]
            o = self._reduce(_linear(o, L.wproj, wt[1], None))
            if L.bproj is not None:
                o = o + L.bproj
            x = x + o
            h = _rms(x, L.ln2, self.eps, self.fused_norm)
            f = _linear(h, L.wfc1, wt[2], L.bfc1)
            a, b = f.chunk(2, dim=-1)
            f = self._reduce(_linear(self.act(a) * b, L.wfc2, wt[3], None))
            if L.bfc2 is not None:
                f = f + L.bfc2
            x = x + f
        return x

    def _recv(self, n: int) -> Tensor:
        from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_

        buf = torch.empty(n, self.hidden, dtype=self.dtype, device=self.device)
        recv_from_prev_pipeline_rank_(buf)
        return buf

    def _send(self, x: Tensor) -> None:
        from megatron.core.inference.communication_utils import send_to_next_pipeline_rank

        send_to_next_pipeline_rank(x.contiguous())

    # ------------------------------------------------------------------ prefill
    def prefill(self, ids: Tensor, positions: Tensor, lengths: list[int], pixel_values: Optional[Tensor],
                image_grid_thw: Optional[Tensor], pixel_values_videos: Optional[Tensor] = None,
                video_grid_thw: Optional[Tensor] = None) -> tuple[Optional[Tensor], list[Tensor], list[Tensor]]:
        """``ids [T]``: prompts packed back to back (``lengths``), M-RoPE ``positions [3, T]``, the images
        (and videos) of all of them in order. Returns (logits of each prompt's last token ``[P, vocab]`` on
        the last stage, else None; keys and values per layer ``[T, kv_heads, head_dim]``)."""
        T = ids.numel()
        if self.first:
            x = self._embed(ids)
            if pixel_values is not None or pixel_values_videos is not None:  # the vision tower: once per prompt
                # The CPU runtime's dispatch mode costs microseconds per torch call, a third of this tiny
                # tower's time; it passes no device literals (tests/test_rollout_engine.py runs it so).
                with plain_dispatch(self.device):
                    x = self.model._splice_vision(x[:, None], ids[None], pixel_values, image_grid_thw,
                                                  pixel_values_videos, video_grid_thw)[:, 0]
        else:
            x = self._recv(T)
        with plain_dispatch(self.device):
            return self._prefill_layers(x, positions, lengths)

    def _prefill_layers(self, x: Tensor, positions: Tensor, lengths: list[int]
                        ) -> tuple[Optional[Tensor], list[Tensor], list[Tensor]]:
        from m2mega.models.qwen25vl.attention import segment_attention

        T = x.shape[0]
        cos, sin = self.rotary.lookup_3d(positions)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
        keys: list[Tensor] = []
        values: list[Tensor] = []

        def attend(li, q, k, v):
            keys.append(k)
            values.append(v)
            out = segment_attention(q.reshape(T, self.heads, self.head_dim), k, v, cu, max(lengths), causal=True,
                                    scale=self.scale)
            return out.reshape(T, -1)

        x = self._layers(x, cos, sin, attend)
        if not self.last:
            self._send(x)
            return None, keys, values
        return self._logits(x[cu[1:].long() - 1]), keys, values

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: Tensor, cache_pos: Tensor, rope_pos: Tensor, slab: KVSlab | CascadeKV, span: int
               ) -> Optional[Tensor]:
        """One token per slot ``0..n-1``: ``tokens [n]`` go to cache positions ``cache_pos [n]`` with rotary
        positions ``rope_pos [n]``; attention reads slab columns ``0..span-1`` (>= every slot's length).
        The caller has set the mask column of each new position. Returns logits ``[n, vocab]`` (last stage)."""
        n = tokens.numel()
        x = self._embed(tokens) if self.first else self._recv(n)
        # The fused kernel (KV slab only) also applies the final norm and output layer on the last stage.
        fused = self._fused is not None and isinstance(slab, KVSlab)
        if fused:
            x = self._fused.decode(self, x, cache_pos, rope_pos, slab, span)
        else:
            x = self._decode_layers(x, cache_pos, rope_pos, slab, span)
        if not self.last:
            self._send(x)
            return None
        return x[:, : self.vocab] if fused else self._logits(x)

    def _decode_layers(self, x: Tensor, cache_pos: Tensor, rope_pos: Tensor, slab: KVSlab | CascadeKV,
                       span: int) -> Tensor:
        """The torch path of a decode step's layers (the fused kernel's reference)."""
        n = x.shape[0]
        cos, sin = self.rotary.lookup(rope_pos)
        if isinstance(slab, CascadeKV):  # span unused: the plan reads each prefix and suffix to its end
            plan = slab.plan(cache_pos)

            def attend(li, q, k, v):
                return slab.attention(li, q, k, v, plan, self.scale).reshape(n, -1)
        else:
            attend = self._slab_attend(slab, cache_pos, n, span)
        return self._layers(x, cos, sin, attend)

    def _slab_attend(self, slab: KVSlab, cache_pos: Tensor, n: int, span: int):
        """A decode step's per-layer attention on the KV slab: writes the step's keys and values at
        ``cache_pos`` and attends slab columns ``0..span-1``."""
        g, d = self.groups, self.head_dim
        # Row (slot i, group j, position p) of a layer's slab viewed as [slots * g * cap, d]: one index for
        # every layer's key and value writes (index_copy_ is several times cheaper than index_put_ here).
        rows = torch.arange(n * g, device=cache_pos.device).view(n, g)
        where = (rows * slab.capacity + cache_pos[:, None]).view(-1)
        mask = slab.mask[:n, None, None, :span]  # [n, 1, 1, span]
        cpu = self.matmul_attention

        def attend(li, q, k, v):
            kc, vc = slab.k[li], slab.v[li]  # [slots, g, cap, d]
            kc.view(-1, d).index_copy_(0, where, k.reshape(n * g, d))
            vc.view(-1, d).index_copy_(0, where, v.reshape(n * g, d))
            # GQA without copying keys: a group's query heads are the "query positions" of its KV head.
            kv, vv = kc[:n, :, :span], vc[:n, :, :span]
            if cpu:
                # On CPU, SDPA's flash kernel pays its blocking overhead (~9 us) per (slot, KV head) for
                # these 1-8-row queries; two batched matmuls around the same masked softmax made a decode
                # step 4-16% faster at 12-32 rows (measured on 2 cores, 1 and 2 threads).
                s = torch.matmul(q, kv.transpose(-1, -2)).mul_(self.scale).add_(mask)
                o = torch.matmul(torch.softmax(s, -1), vv)
            else:
                o = F.scaled_dot_product_attention(q, kv, vv, attn_mask=mask, scale=self.scale)
            return o.reshape(n, -1)

        return attend
