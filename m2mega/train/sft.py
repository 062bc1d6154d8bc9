"""Cold-start SFT entry point: ``python -m m2mega.train.sft --config sft.yaml [--section.key=value ...]``.

Masked next-token loss: the model returns the per-token cross entropy of ``labels`` (``labels[t]`` is the
token after ``tokens[t]``); ``loss_mask`` keeps only assistant targets (the preprocessor sets it on the
assistant content and its ``<|im_end|>``), and the loss is the mean over the global batch's assistant tokens
(megatron's ``calculate_per_token_loss``), so packing and micro-batch splits do not reweight samples.

Model families (``model.family``) and data sources (``data.source``) are registries so the Qwen2.5-VL model
and the packed THD loader plug in without touching the loop:

* ``register_model_family("qwen25vl", provider, flops_per_token)``; ``"gpt"`` (megatron-core ``GPTModel``,
  Qwen2.5-shaped: RMSNorm, SwiGLU, QKV bias, GQA, RoPE) is built in and is what the tests train.
* ``data.source: synthetic`` yields :class:`SFTBatch` (``[B, S]`` rows of a learnable token task),
  ``data.source: packed`` yields ``m2mega.data.loader.MicroBatch`` (THD: ``tokens [T]``,
  ``position_ids [3, T]``, ``cu_seqlens``, ``pixel_values``, ``image_grid_thw``): :func:`sft_forward_step`
  passes the packing as ``PackedSeqParams(qkv_format="thd")`` and the images to the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional


def build_parser() -> argparse.ArgumentParser:
    """The command line. Defined above the torch/megatron imports so ``--help`` does not wait for them."""
    parser = argparse.ArgumentParser(
        prog="python -m m2mega.train.sft",
        description="Cold-start SFT on megatron-core. Any config key can be overridden: --section.key=value",
    )
    parser.add_argument("--config", help="YAML config (see examples/tiny/ or examples/qwen25vl_7b/sft.yaml)")
    from m2mega.train.config import add_print_config_flag  # config.py imports no torch: --help stays fast

    add_print_config_flag(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_known_args()  # --help / usage errors answer here, before ~5-10 s of imports

import torch  # noqa: E402

from .config import ConfigError, TrainConfig, load_config, num_microbatches, to_yaml  # noqa: E402
from .loop import TrainSummary, train, training_transformer_overrides  # noqa: E402

__all__ = [
    "SFTBatch",
    "SyntheticSFTLoader",
    "ModelFamily",
    "register_model_family",
    "get_model_family",
    "gpt_model_provider",
    "gpt_flops_per_token",
    "masked_next_token_loss",
    "sft_forward_step",
    "sft_data_provider",
    "run_sft",
    "main",
]


# ----------------------------------------------------------------------------------------- loss


def masked_next_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """``(loss_sum, num_targets, report)`` for megatron's per-token-loss schedules.

    ``per_token_loss``: the model's cross entropy per position (any shape); ``loss_mask``: same numel,
    1 on assistant targets. Returns the *sum* over targets: megatron divides by the global target count.
    """
    mask = loss_mask.reshape(-1).to(torch.float32)
    losses = per_token_loss.reshape(-1).to(torch.float32)
    if losses.numel() != mask.numel():
        raise ValueError(f"loss has {losses.numel()} positions but loss_mask has {mask.numel()}")
    loss_sum = (losses * mask).sum()
    count = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}
    return loss_sum, count, report


# ----------------------------------------------------------------------------------------- data


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
    """Deterministic SFT token rows with a learnable assistant part, for the GPT stand-in and tests.

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


def sft_data_provider(cfg: TrainConfig, split: str):
    """``data.source`` -> this data-parallel rank's loader for ``split`` ("train" | "valid")."""
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    d, s = cfg.data, cfg.schedule
    if d.source == "synthetic":
        # Same task (seed), disjoint samples for validation.
        first = 0 if split == "train" else 1 << 40
        return SyntheticSFTLoader(cfg.model.gpt.vocab_size, s.seq_length, s.micro_batch_size,
                                  dp_rank=dp_rank, dp_size=dp_size, seed=d.seed, first_sample=first)
    if d.source == "packed":
        prefix = d.train_prefix if split == "train" else d.valid_prefix
        if prefix is None:
            return None
        if s.micro_batch_size != 1:
            raise ValueError("data.source 'packed' packs samples into one row per micro-batch: "
                             f"set schedule.micro_batch_size=1 (got {s.micro_batch_size})")
        from m2mega.data.loader import PackedTHDDataset, THDLoader

        order = {"curriculum": "sequential"}.get(d.order, d.order)
        try:
            ds = PackedTHDDataset(prefix, s.seq_length, dp_rank=dp_rank, dp_size=dp_size, order=order,
                                  seed=d.seed, num_buckets=d.num_buckets, sft_only=True,
                                  pad_to_multiple_of=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
        except ValueError as e:
            raise ValueError(f"{split} data '{prefix}': {e} (SFT trains on rows that end with an assistant "
                             f"turn)") from e
        return THDLoader(ds, num_workers=d.num_workers)
    raise ValueError(f"unknown data.source {d.source!r}")


# ----------------------------------------------------------------------------------------- model


from .families import ModelFamily, get_model_family, register_model_family  # noqa: E402 (re-exported)


class _RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that also runs under sequence parallelism.

    megatron's local-spec norm (``WrappedTorchNorm``) refuses sequence parallelism because its weight
    gradient is then a partial sum per TP rank; marking the weight ``sequence_parallel`` makes
    ``finalize_model_grads`` all-reduce it over TP, which is all TE's norm does differently.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def gpt_model_provider(cfg: TrainConfig):
    """This rank's stage of a Qwen2.5-shaped megatron-core GPTModel built from ``cfg.model.gpt``."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from m2mega.runtime import device

    m, g = cfg.model, cfg.model.gpt
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
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        # CPU: initialise full weights then slice, so any TP layout starts from the same weights.
        use_cpu_initialization=device().type == "cpu",
        perform_initialization=True,
        **training_transformer_overrides(cfg),
    )
    layer = get_gpt_layer_local_spec()
    layer.submodules.input_layernorm = _RMSNorm
    layer.submodules.pre_mlp_layernorm = _RMSNorm
    block = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(tcfg), layer_norm=_RMSNorm)
    model = GPTModel(
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
    return model.to(device())


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


register_model_family("gpt", gpt_model_provider, gpt_flops_per_token, validate_gpt)


# ----------------------------------------------------------------------------------------- step


def _thd_model_inputs(batch) -> dict:
    """Model kwargs for a THD-packed ``m2mega.data.loader.MicroBatch`` (one row of concatenated samples)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch.cu_seqlens.to(torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=int(batch.max_seqlen), max_seqlen_kv=int(batch.max_seqlen))
    pos = batch.position_ids
    kwargs = {
        "input_ids": batch.tokens.unsqueeze(0),
        # M-RoPE ids [3, T] -> [3, 1, T] (one packed row)
        "position_ids": pos.unsqueeze(1) if pos.dim() == 2 else pos,
        "attention_mask": None,
        "labels": batch.labels.clamp_min(0).unsqueeze(0),
        "packed_seq_params": psp,
    }
    if getattr(batch, "pixel_values", None) is not None and batch.pixel_values.numel():
        kwargs["pixel_values"] = batch.pixel_values
        kwargs["image_grid_thw"] = batch.image_grid_thw
        meta = tuple(getattr(batch, k, None) for k in ("vision_cu_seqlens", "window_index", "cu_window_seqlens",
                                                        "rot_pos_ids"))
        if all(m is not None for m in meta):
            kwargs["vision_meta"] = meta  # the packing op already computed the vision tower's metadata
    return kwargs


def sft_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """megatron ``forward_step``: next micro-batch -> per-token CE -> masked sum (assistant tokens)."""
    from m2mega.runtime import device

    batch = next(data_iterator)
    batch = batch.to(device())
    if hasattr(batch, "cu_seqlens"):
        out = model(**_thd_model_inputs(batch))
    else:
        # Masked positions may carry ignore labels (-100); the mask zeroes them, the clamp keeps CE finite.
        out = model(batch.tokens, batch.position_ids, None, labels=batch.labels.clamp_min(0))
    num_tokens = torch.tensor([float(batch.num_tokens)])
    loss_mask = batch.loss_mask

    def loss_func(per_token_loss: torch.Tensor):
        loss_sum, count, report = masked_next_token_loss(per_token_loss, loss_mask)
        report["num_tokens"] = num_tokens
        return loss_sum, count, report

    return out, loss_func


# ----------------------------------------------------------------------------------------- entry


def run_sft(cfg: TrainConfig, *, stop_at: Optional[int] = None) -> TrainSummary:
    """Train with an initialised runtime (``m2mega.runtime.init``)."""
    fam = get_model_family(cfg.model.family)
    return train(cfg, fam.provider, sft_forward_step, sft_data_provider,
                 flops_per_token=fam.flops_per_token, stop_at=stop_at)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if cfg.mode != "sft":
        from m2mega.runtime.cli import UsageError

        raise UsageError(f"mode is {cfg.mode!r}; this entry point runs SFT")
    from .loop import preflight

    preflight(cfg)  # config, data paths, checkpoints: before process groups and the model

    import m2mega.runtime as rt

    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    info = rt.init(cfg.parallel.tp, cfg.parallel.pp, backend=backend, seed=cfg.seed,
                   timeout_s=cfg.parallel.timeout_s)
    try:
        if info.rank == 0:
            print(f"# m2mega SFT: world {info.world_size} = DP{info.dp} x TP{info.tp} x PP{info.pp} "
                  f"({info.backend}, {info.device}); micro-batches per step "
                  f"{num_microbatches(cfg, info.dp)}\n# config\n{to_yaml(cfg)}", flush=True)
        summary = run_sft(cfg)
        if info.rank == 0:
            last = next((l for l in reversed(summary.losses) if l is not None), None)
            print(f"done: {summary.iterations} iterations in {summary.wall_time_s:.1f}s, final loss "
                  f"{last if last is None else round(last, 4)}, skipped {summary.skipped_steps}, "
                  f"checkpoint {summary.last_checkpoint}", flush=True)
    finally:
        rt.shutdown()
    from .hf_files import export_final_hf

    export_final_hf(cfg, summary.last_checkpoint)  # checkpoint.save_hf: after the job's process groups are gone
    return 0


if __name__ == "__main__":
    from m2mega.runtime.cli import run_main

    sys.exit(run_main(main))
