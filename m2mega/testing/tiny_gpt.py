"""The test stand-ins: a tiny Qwen2.5-shaped megatron-core GPTModel (RMSNorm, SwiGLU, QKV bias, GQA, RoPE)
and a learnable synthetic token task, registered as ``model.family: gpt`` and ``data.source: synthetic``.

They let the trainer, checkpoints and every parallel layout be tested without vision, tokenizer or data
files; the real model is ``m2mega.models.qwen25vl`` and the real data the packed THD loader. Default sizes are
deliberately odd (hidden 48, ffn 88, vocab 130) so shape bugs that a power-of-two model would hide show up.
The trainer finds this module through the family/data-source registries (``m2mega.train.families``) when a
config names them; nothing in the product imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from m2mega.runtime import device
from m2mega.train.config import ConfigError, GPTShapeConfig, TrainConfig
from m2mega.train.families import register_data_source, register_model_family
from m2mega.train.optim import training_transformer_overrides

__all__ = ["GPTShapeConfig", "SFTBatch", "SyntheticSFTLoader", "build_gpt", "build_tiny_gpt", "gpt_model_provider",
           "gpt_flops_per_token", "validate_gpt", "synthetic_data_provider"]


class _RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that also runs under sequence parallelism.

    megatron's local-spec norm (``WrappedTorchNorm``) refuses sequence parallelism because its weight
    gradient is then a partial sum per TP rank; marking the weight ``sequence_parallel`` makes
    ``finalize_model_grads`` all-reduce it over TP, which is all TE's norm does differently.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def build_gpt(shape: GPTShapeConfig, *, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
              **transformer_overrides):
    """This rank's stage (TP/PP from megatron's parallel_state) of the Qwen2.5-shaped GPTModel ``shape``.
    Full weights are initialised on CPU and then sliced, so every TP layout starts from the same weights."""

    g = shape
    over = {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "use_cpu_initialization": True, **transformer_overrides}
    tcfg = TransformerConfig(
        num_layers=g.num_layers,
        hidden_size=g.hidden_size,
        num_attention_heads=g.num_attention_heads,
        num_query_groups=g.num_query_groups,
        ffn_hidden_size=g.ffn_hidden_size,
        kv_channels=g.hidden_size // g.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        perform_initialization=True,
        **over,
    )
    layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = _RMSNorm
    layer.submodules.pre_mlp_layernorm = _RMSNorm
    block = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(tcfg), layer_norm=_RMSNorm)
    return GPTModel(
        tcfg,
        block,
        vocab_size=g.vocab_size,
        max_sequence_length=g.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not g.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=g.rotary_base,
    )


def build_tiny_gpt(shape: GPTShapeConfig = GPTShapeConfig(), *, dtype: torch.dtype = torch.float32):
    """:func:`build_gpt` outside a training config (the parallel-parity tests), fp32 or bf16, no dropout."""
    return build_gpt(shape, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)


def gpt_model_provider(cfg: TrainConfig):
    """The ``gpt`` family's provider: :func:`build_gpt` of ``cfg.model.gpt`` with the trainer's settings."""
    over = training_transformer_overrides(cfg)
    # CPU: initialise full weights then slice, so any TP layout starts from the same weights.
    over["use_cpu_initialization"] = device().type == "cpu"
    m = cfg.model
    return build_gpt(m.gpt, hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                     **over).to(device())


@dataclass
class SFTBatch:
    """A padded (BSHD) micro-batch: every tensor is ``[B, S]``."""
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: torch.device | str) -> "SFTBatch":
        return SFTBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


BOS, SEP, FIRST_FREE = 1, 2, 3


class SyntheticSFTLoader:
    """Deterministic SFT token rows with a learnable assistant part (the ``synthetic`` data source).

    Row = ``BOS prompt SEP answer``: the prompt is uniform random tokens; each answer token is a fixed
    function (a seeded permutation ``succ``) of the token before it, so the assistant targets are learnable
    while the prompt is noise; ``loss_mask`` covers the answer only. Sample ``i`` depends only on
    ``(seed, i)``. The loader position is a global sample count (megatron's ``consumed_samples``): each
    micro-batch slot takes ``mbs x dp`` consecutive samples, this rank the ``dp_rank``-th ``mbs`` of them,
    so global batch ``k`` is samples ``[k*gbs, (k+1)*gbs)`` for any data-parallel size, and a run resumed
    at another DP size continues with the same samples.
    """

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, first_sample: int = 0) -> None:
        if vocab_size <= FIRST_FREE + 1:
            raise ValueError(f"vocab_size {vocab_size} too small for the synthetic task")
        self.vocab_size, self.seq_length, self.mbs = vocab_size, seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.first_sample = first_sample  # held-out streams start far from the training stream
        g = torch.Generator().manual_seed(seed)
        self.succ = FIRST_FREE + torch.randperm(vocab_size - FIRST_FREE, generator=g)
        self.next_sample = 0

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [S+1], answer mask [S+1]) of global sample ``i``."""
        s = self.seq_length
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first_sample + i)
        plen = int(torch.randint(max(1, s // 4), max(2, s // 2), (1,), generator=g))
        toks = torch.empty(s + 1, dtype=torch.long)
        toks[0] = BOS
        toks[1 : 1 + plen] = torch.randint(FIRST_FREE, self.vocab_size, (plen,), generator=g)
        toks[1 + plen] = SEP
        toks[2 + plen] = int(torch.randint(FIRST_FREE, self.vocab_size, (1,), generator=g))
        for t in range(3 + plen, s + 1):
            toks[t] = self.succ[toks[t - 1] - FIRST_FREE]
        answer = torch.zeros(s + 1, dtype=torch.bool)
        answer[3 + plen :] = True  # the first answer token is random too: only its successors are targets
        return toks, answer

    def batch(self, first: int) -> SFTBatch:
        """This rank's micro-batch of the slot starting at global sample ``first``."""
        base = first + self.dp_rank * self.mbs
        rows = [self.sample(base + b) for b in range(self.mbs)]
        toks = torch.stack([r[0] for r in rows])
        ans = torch.stack([r[1] for r in rows])
        pos = torch.arange(self.seq_length).unsqueeze(0).expand(self.mbs, -1).contiguous()
        return SFTBatch(tokens=toks[:, :-1].contiguous(), labels=toks[:, 1:].contiguous(),
                        loss_mask=ans[:, 1:].float().contiguous(), position_ids=pos)

    def __iter__(self) -> Iterator[SFTBatch]:
        while True:
            b = self.batch(self.next_sample)
            self.next_sample += self.mbs * self.dp_size
            yield b

    def state_dict(self) -> dict:
        return {"next_sample": self.next_sample, "seed": self.seed, "seq_length": self.seq_length,
                "vocab_size": self.vocab_size, "first_sample": self.first_sample}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = {k: (state.get(k), mine[k]) for k in mine if k != "next_sample" and state.get(k) != mine[k]}
        if diff:
            raise ValueError(f"cannot resume the synthetic loader: settings differ (saved, now): {diff}")
        self.next_sample = int(state["next_sample"])


def gpt_flops_per_token(cfg: TrainConfig) -> float:
    """Training FLOPs per token of the GPT family: 3x forward (4x with full recompute).

    Forward per token: 2 x (QKV + output projection + gated MLP) weights per layer, attention scores and
    values 2 x 2 x h x (S/2) (causal: average context S/2), and the output layer 2 x h x V.
    """
    g, s = cfg.model.gpt, cfg.schedule.seq_length
    h, L, f, v = g.hidden_size, g.num_layers, g.ffn_hidden_size, g.vocab_size
    kv = h // g.num_attention_heads * g.num_query_groups
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * f + 2 * 2 * h * (s / 2)
    fwd = L * per_layer + 2 * h * v
    return (4.0 if cfg.model.recompute == "full" else 3.0) * fwd


def validate_gpt(cfg: TrainConfig) -> None:
    """Shape rules of the gpt family (``model.gpt``) against the parallel layout and sequence length."""
    g, p = cfg.model.gpt, cfg.parallel

    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "vocab_size", "max_position_embeddings"):  # fmt: skip
        check(getattr(g, name) >= 1, f"model.gpt.{name} must be >= 1, got {getattr(g, name)}")
    check(g.hidden_size % g.num_attention_heads == 0,
          f"model.gpt.hidden_size {g.hidden_size} is not divisible by model.gpt.num_attention_heads "
          f"{g.num_attention_heads}")
    check(g.num_attention_heads % g.num_query_groups == 0,
          f"model.gpt.num_attention_heads {g.num_attention_heads} is not divisible by model.gpt.num_query_groups "
          f"{g.num_query_groups}")
    check(g.num_attention_heads % p.tp == 0 and g.num_query_groups % p.tp == 0,
          f"parallel.tp={p.tp} must divide model.gpt.num_attention_heads ({g.num_attention_heads}) and "
          f"model.gpt.num_query_groups ({g.num_query_groups})")
    check(g.num_layers >= p.pp, f"model.gpt.num_layers {g.num_layers} < parallel.pp {p.pp}")
    check(g.vocab_size % p.tp == 0, f"model.gpt.vocab_size {g.vocab_size} is not divisible by parallel.tp {p.tp} "
                                    f"(the output layer is split by vocabulary)")
    check(cfg.schedule.seq_length <= g.max_position_embeddings,
          f"schedule.seq_length {cfg.schedule.seq_length} > model.gpt.max_position_embeddings "
          f"{g.max_position_embeddings}")


def synthetic_data_provider(cfg: TrainConfig, split: str, dp_rank: int, dp_size: int) -> SyntheticSFTLoader:
    """``data.source: synthetic``: the same task (seed) for both splits, disjoint samples for validation."""
    first = 0 if split == "train" else 1 << 40
    return SyntheticSFTLoader(cfg.model.gpt.vocab_size, cfg.schedule.seq_length, cfg.schedule.micro_batch_size,
                              dp_rank=dp_rank, dp_size=dp_size, seed=cfg.data.seed, first_sample=first)


register_model_family("gpt", gpt_model_provider, gpt_flops_per_token, validate_gpt)
register_data_source("synthetic", synthetic_data_provider)
