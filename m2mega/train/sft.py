"""Cold-start SFT entry point: ``python -m m2mega.train.sft --config sft.yaml [--section.key=value ...]``.

Masked next-token loss: the model returns the per-token cross entropy of ``labels`` (``labels[t]`` is the
token after ``tokens[t]``); ``loss_mask`` keeps only assistant targets (the preprocessor sets it on the
assistant content and its ``<|im_end|>``), and the loss is the mean over the global batch's assistant tokens
(megatron's ``calculate_per_token_loss``), so packing and micro-batch splits do not reweight samples.

The model comes from the ``model.family`` registry (:mod:`m2mega.train.families`; ``qwen25vl``, or the
``gpt`` test stand-in). ``data.source: packed`` reads preprocessed ``.bin/.idx`` data as THD micro-batches
(:class:`m2mega.data.loader.MicroBatch`: ``tokens [T]``, ``position_ids [3, T]``, ``cu_seqlens``, images),
which :func:`m2mega.data.loader.model_inputs` turns into the model's arguments; other sources (the
``synthetic`` test stand-in, padded ``[B, S]`` rows) come from the data-source registry.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator, Optional


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
from megatron.core import parallel_state as ps  # noqa: E402

import m2mega.runtime as rt  # noqa: E402
from m2mega.data.loader import MicroBatch, PackedTHDDataset, THDLoader, model_inputs  # noqa: E402
from m2mega.runtime import device  # noqa: E402
from m2mega.runtime.cli import UsageError  # noqa: E402

from .config import TrainConfig, load_config, num_microbatches, to_yaml  # noqa: E402
from .families import get_data_source, get_model_family  # noqa: E402
from .loop import DataProvider, ForwardStep, ModelProvider, StepResult, Trainer, TrainSummary  # noqa: E402
from .preflight import preflight  # noqa: E402

__all__ = [
    "masked_next_token_loss",
    "sft_forward_step",
    "sft_data_provider",
    "SFTSteps",
    "train",
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


def sft_data_provider(cfg: TrainConfig, split: str):
    """``data.source`` -> this data-parallel rank's loader for ``split`` ("train" | "valid")."""
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    d, s = cfg.data, cfg.schedule
    if d.source == "packed":
        prefix = d.train_prefix if split == "train" else d.valid_prefix
        if prefix is None:
            return None
        if s.micro_batch_size != 1:
            raise ValueError("data.source 'packed' packs samples into one row per micro-batch: "
                             f"set schedule.micro_batch_size=1 (got {s.micro_batch_size})")
        order = {"curriculum": "sequential"}.get(d.order, d.order)
        try:
            ds = PackedTHDDataset(prefix, s.seq_length, dp_rank=dp_rank, dp_size=dp_size, order=order,
                                  seed=d.seed, num_buckets=d.num_buckets, sft_only=True,
                                  pad_to_multiple_of=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
        except ValueError as e:
            raise ValueError(f"{split} data '{prefix}': {e} (SFT trains on rows that end with an assistant "
                             f"turn)") from e
        return THDLoader(ds, num_workers=d.num_workers)
    return get_data_source(d.source)(cfg, split, dp_rank, dp_size)


# ----------------------------------------------------------------------------------------- step


def sft_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """megatron ``forward_step``: next micro-batch -> per-token CE -> masked sum (assistant tokens)."""
    batch = next(data_iterator)
    batch = batch.to(device())
    if isinstance(batch, MicroBatch):
        out = model(**model_inputs(batch))
    else:  # the padded [B, S] rows of a test data source
        # Masked positions may carry ignore labels (-100); the mask zeroes them, the clamp keeps CE finite.
        out = model(batch.tokens, batch.position_ids, None, labels=batch.labels.clamp_min(0))
    num_tokens = torch.tensor([float(batch.num_tokens)])
    loss_mask = batch.loss_mask

    def loss_func(per_token_loss: torch.Tensor):
        loss_sum, count, report = masked_next_token_loss(per_token_loss, loss_mask)
        report["num_tokens"] = num_tokens
        return loss_sum, count, report

    return out, loss_func


# ----------------------------------------------------------------------------------------- the step source


class SFTSteps:
    """The step source of loss-on-targets training (SFT): one optimizer step per global batch of the data
    provider's train loader, forward-only validation every ``sft.eval_interval`` iterations."""

    def __init__(self, cfg: TrainConfig, forward_step: ForwardStep, data_provider: DataProvider) -> None:
        self.cfg, self.forward_step, self.data_provider = cfg, forward_step, data_provider
        self.data_loader = data_provider(cfg, "train")
        if self.data_loader is None:
            raise ValueError("data_provider returned no train loader")
        self._it: Optional[Iterator] = None

    def on_start(self, trainer: Trainer) -> None:
        cfg = self.cfg
        if trainer.rank == 0 and cfg.logging.progress != "none":
            print(f"training iterations {trainer.iteration} -> {cfg.schedule.train_iters} (global batch "
                  f"{cfg.schedule.global_batch_size}, {trainer.num_microbatches} micro-batches x "
                  f"{cfg.schedule.micro_batch_size} per DP rank, DP{trainer.dp_size} TP{cfg.parallel.tp} "
                  f"PP{cfg.parallel.pp})", flush=True)
        self._it = iter(self.data_loader)  # after resume restored the loader's position

    def run_step(self, trainer: Trainer) -> list[StepResult]:
        return [trainer.train_step(self._it, self.forward_step)]

    def should_evaluate(self, before: int, after: int, end: int) -> bool:
        n = self.cfg.sft.eval_interval
        return bool(n) and after // n > before // n

    def evaluate(self, trainer: Trainer) -> Optional[dict]:
        valid = self.data_provider(self.cfg, "valid")
        return None if valid is None else trainer.evaluate(iter(valid), self.forward_step, self.cfg.sft.eval_iters)

    def on_end(self, trainer: Trainer, summary: TrainSummary) -> None:
        pass


def train(
    cfg: TrainConfig,
    model_provider: ModelProvider,
    forward_step: ForwardStep,
    data_provider: DataProvider,
    *,
    flops_per_token: Optional[Callable[[TrainConfig], float]] = None,
    trainer: Optional[Trainer] = None,
    stop_at: Optional[int] = None,
) -> TrainSummary:
    """SFT-style training: :meth:`Trainer.fit` over :class:`SFTSteps` (builds and closes the
    trainer unless one is given)."""
    own = trainer is None
    trainer = trainer or Trainer(cfg, model_provider, flops_per_token=flops_per_token)
    try:
        return trainer.fit(SFTSteps(cfg, forward_step, data_provider), stop_at=stop_at)
    finally:
        if own:
            trainer.close()


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
        raise UsageError(f"mode is {cfg.mode!r}; this entry point runs SFT")
    preflight(cfg)  # config, data paths, checkpoints: before process groups and the model

    info = rt.init_from_config(cfg)
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
