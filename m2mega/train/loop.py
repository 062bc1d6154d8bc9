"""The generic megatron-core training loop, shared by SFT and (later) GRPO.

Two layers:

* :class:`Trainer` owns the pieces every stage needs: the model chunks (DDP-wrapped), megatron optimizer
  and LR scheduler, checkpoint save/resume, non-finite step skipping, metrics (TensorBoard, progress line).
  Its :meth:`Trainer.train_step` runs one optimizer step over any ``forward_step`` through
  ``get_forward_backward_func()`` (1F1B under pipeline parallelism). A GRPO step is
  ``rollout -> score -> trainer.train_step(iter(micro_batches), grpo_forward_step)``: the custom loss lives
  in its ``forward_step``; optimizer, checkpointing and logging are reused as they are, and
  :meth:`Trainer.register_state` adds e.g. a KL-schedule or sampler state to every checkpoint.
* :func:`train` is the SFT-style driver: resume, then ``train_iters`` steps of ``train_step`` over the
  data provider's loader with periodic validation and checkpoints.

Conventions (megatron's): ``forward_step(data_iterator, model) -> (output, loss_func)``; with
``calculate_per_token_loss`` (set by :func:`training_transformer_overrides`) ``loss_func(output)`` returns
``(loss_sum, num_loss_tokens, report)`` and megatron divides the gradients by the global number of loss
tokens, so the step minimises the per-token mean over the whole global batch however it is split into
micro-batches and data-parallel ranks. ``report`` values are tensors: shape ``[2]`` = (numerator,
denominator) reported as their ratio, shape ``[1]`` = a count reported as its sum; both are summed over
micro-batches and data-parallel ranks. The key ``num_tokens`` (processed tokens) drives tokens/s and MFU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .checkpoint import (
    LoadedCheckpoint,
    check_model_config,
    check_save_dir,
    find_latest,
    load_checkpoint,
    load_model_weights,
    pick_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, num_microbatches, validate
from .optim import grads_are_finite, resolve_dtype, setup_model_and_optimizer

__all__ = [
    "StepResult",
    "TrainSummary",
    "Trainer",
    "train",
    "training_transformer_overrides",
    "seed_everything",
    "ModelProvider",
    "ForwardStep",
    "DataProvider",
    "TrainingDiverged",
    "preflight_checkpoints",
    "preflight",
]

log = logging.getLogger(__name__)

ModelProvider = Callable[[TrainConfig], "torch.nn.Module | list[torch.nn.Module]"]
ForwardStep = Callable[[Iterator, torch.nn.Module], tuple]
# data_provider(cfg, split) -> iterable of micro-batches for this rank ("train" | "valid"); the train
# loader should have state_dict()/load_state_dict() so a resumed run continues at the same sample.
DataProvider = Callable[[TrainConfig, str], Optional[Iterable]]

PEAK_TFLOPS_CUDA_DEFAULT = 989.0  # H100 SXM dense bf16


class TrainingDiverged(RuntimeError):
    """``optimizer.max_skipped_steps`` steps in a row had non-finite gradients."""


def preflight(cfg: TrainConfig, *, prefixes: Sequence[tuple[str, Optional[str]]] = ()) -> None:
    """Everything a run can check before process groups and models exist, so a command line fails in
    seconds with one message: the config's rules (with torchrun's ``WORLD_SIZE``), the preprocessed
    datasets it will read (``prefixes``: extra ``(flag, PREFIX)`` pairs), ``model.init_from`` and its
    checkpoints (:func:`preflight_checkpoints`)."""
    import os

    from m2mega.runtime.cli import require_paths, require_prefixes

    ws = os.environ.get("WORLD_SIZE")
    validate(cfg, int(ws) if ws and ws.isdigit() else None)
    d = cfg.data
    data = [("data.train_prefix", d.train_prefix), ("data.valid_prefix", d.valid_prefix)]
    if cfg.mode == "grpo" and cfg.grpo.eval_interval:
        data.append(("grpo.eval_prefix", cfg.grpo.eval_prefix))
    if cfg.mode == "grpo" and not d.train_prefix:
        raise ConfigError("data.train_prefix must name the preprocessed RL prompts (tools/preprocess_data.py)")
    require_prefixes([*(data if d.source == "packed" or cfg.mode == "grpo" else []), *prefixes])
    require_paths([("model.init_from", cfg.model.init_from)])
    preflight_checkpoints(cfg)


def preflight_checkpoints(cfg: TrainConfig) -> None:
    """What the run's checkpoints must satisfy, checked before any model is built: ``save_dir`` belongs to
    this run (:func:`check_save_dir`) and the checkpoint it resumes from, and ``model.init_from``, were
    saved with this config's architecture (:func:`check_model_config`)."""
    c = cfg.checkpoint
    check_save_dir(cfg)
    root = c.load_dir or c.save_dir
    found = find_latest(root) if c.resume and root else None
    if found is not None:
        check_model_config(found[1], cfg)
    elif cfg.model.init_from:
        check_model_config(resolve_checkpoint(cfg.model.init_from), cfg)


def training_transformer_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig fields the training stack needs; every model provider applies them."""
    dtype = resolve_dtype(cfg)
    m, p = cfg.model, cfg.parallel
    out: dict = {
        "tensor_model_parallel_size": p.tp,
        "pipeline_model_parallel_size": p.pp,
        "sequence_parallel": p.sequence_parallel,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "calculate_per_token_loss": True,
        # Free pipeline-stage outputs once sent (keeps only their graph); megatron's training default.
        "deallocate_pipeline_outputs": p.pp > 1,
    }
    if m.recompute == "selective":
        out["recompute_granularity"] = "selective"
    elif m.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform",
                   recompute_num_layers=m.recompute_num_layers)
    return out


@dataclass
class StepResult:
    iteration: int  # the iteration this step completed (1-based)
    metrics: dict[str, float]  # reduced report values (e.g. "lm loss"), identical on every rank
    lr: float
    grad_norm: Optional[float]
    skipped: bool
    num_tokens: int  # processed tokens in the global batch (from the report's num_tokens, else 0)
    step_time_s: float

    @property
    def loss(self) -> Optional[float]:
        for k in ("lm loss", "loss"):
            if k in self.metrics:
                return self.metrics[k]
        return None


@dataclass
class TrainSummary:
    start_iteration: int
    iterations: int
    losses: list[Optional[float]] = field(default_factory=list)  # per step run in this call
    skipped_steps: int = 0
    last_checkpoint: Optional[str] = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0


class _Progress:
    """Rank-0 progress line: tqdm (or tqdm.rich), a plain log line every log_interval, or nothing."""

    def __init__(self, kind: str, total: int, initial: int, log_interval: int) -> None:
        self.kind, self.log_interval, self.bar = kind, log_interval, None
        if kind in ("tqdm", "rich"):
            if kind == "rich":
                from tqdm.rich import tqdm
            else:
                from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, iteration: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.kind == "plain" and iteration % self.log_interval == 0:
            print(f"iter {iteration}: {text}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.kind != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Model + optimizer + scheduler + checkpointing + logging for one run (see module docstring).

    Call after ``m2mega.runtime.init(tp, pp)``. ``model_provider(cfg)`` builds this rank's model chunk
    (or list of virtual-pipeline chunks) applying :func:`training_transformer_overrides`.
    ``flops_per_token(cfg)``: training FLOPs per processed token for the MFU estimate.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_provider: ModelProvider,
        *,
        flops_per_token: Optional[Callable[[TrainConfig], float]] = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("call m2mega.runtime.init(tp, pp) before building a Trainer")
        if ps.get_tensor_model_parallel_world_size() != cfg.parallel.tp or (
            ps.get_pipeline_model_parallel_world_size() != cfg.parallel.pp
        ):
            raise ValueError(
                f"config asks for TP{cfg.parallel.tp}/PP{cfg.parallel.pp} but the runtime was initialised with "
                f"TP{ps.get_tensor_model_parallel_world_size()}/PP{ps.get_pipeline_model_parallel_world_size()}"
            )
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        validate(cfg, self.world_size)
        self.cfg = cfg
        self.dp_size = ps.get_data_parallel_world_size()
        self.num_microbatches = num_microbatches(cfg, self.dp_size)
        preflight_checkpoints(cfg)
        seed_everything(cfg.seed)  # the same seed builds the same weights, whatever ran before
        chunks = model_provider(cfg)
        chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        if cfg.model.init_from:
            load_model_weights(cfg.model.init_from, chunks)
        self.model, self.optimizer, self.scheduler = setup_model_and_optimizer(cfg, chunks)
        self.flops_per_token = flops_per_token
        self.iteration = 0
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.last_checkpoint: Optional[str] = None
        # The newest checkpoint saved while steps were finite: keep_last rotation never deletes it.
        self.last_good_checkpoint: Optional[str] = None
        self._states: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self._writer = None
        self._progress: Optional[_Progress] = None
        if self.rank == 0:  # TensorBoard and/or W&B (logging.*) behind one add_scalar; None if neither
            from .metrics_sink import open_metrics_sink

            self._writer = open_metrics_sink(cfg)

    # ------------------------------------------------------------------ state and checkpoints

    def register_state(self, name: str, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        """Add ``get()`` to every checkpoint's common state and hand it to ``set`` on resume."""
        self._states[name] = (get, set)

    def _extra(self) -> dict:
        extra = {"skipped_steps": self.skipped_steps, "consecutive_skipped": self.consecutive_skipped,
                 "consumed_samples": self.iteration * self.cfg.schedule.global_batch_size}
        extra["registered"] = {k: g() for k, (g, _) in self._states.items()}
        return extra

    def save(self, data_loader: Any = None) -> str:
        c = self.cfg.checkpoint
        if not c.save_dir:
            raise ValueError("checkpoint.save_dir is not set")
        data_state = data_loader.state_dict() if hasattr(data_loader, "state_dict") else None
        self.last_checkpoint = save_checkpoint(
            c.save_dir, self.iteration, self.model, self.optimizer, self.scheduler,
            cfg=self.cfg, data_state=data_state, extra=self._extra(),
            protect=[self.last_good_checkpoint] if self.last_good_checkpoint and self.consecutive_skipped else (),
        )
        if self.consecutive_skipped == 0:
            self.last_good_checkpoint = self.last_checkpoint
        return self.last_checkpoint

    def resume(self, data_loader: Any = None) -> Optional[LoadedCheckpoint]:
        """Load the newest complete checkpoint of ``checkpoint.load_dir`` (else ``save_dir``), if any."""
        c = self.cfg.checkpoint
        root = c.load_dir or c.save_dir
        if not c.resume or not root:
            return None
        # Rank 0 picks, everyone follows: ranks must not disagree if a save lands meanwhile.
        found = [pick_checkpoint(root) if self.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return None
        _, path = found[0]
        ck = load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                             load_optimizer=c.load_optimizer, load_rng=c.load_rng,
                             optimizer_format=c.optimizer_format)
        self.iteration = ck.iteration
        self.skipped_steps = int(ck.extra.get("skipped_steps", 0))
        self.consecutive_skipped = int(ck.extra.get("consecutive_skipped", 0))
        if self.consecutive_skipped == 0:
            self.last_good_checkpoint = path
        for name, value in (ck.extra.get("registered") or {}).items():
            if name in self._states:
                self._states[name][1](value)
        if data_loader is not None:
            if ck.data_state is not None and hasattr(data_loader, "load_state_dict"):
                data_loader.load_state_dict(ck.data_state)
            elif ck.iteration > 0:
                log.warning("data loader position not restored (%s has no data state or the loader no "
                            "load_state_dict): the resumed run re-reads data from its start", path)
        self.last_checkpoint = path
        if self.rank == 0:
            self._say(f"resumed from {path} at iteration {ck.iteration} (optimizer: {ck.loaded_optimizer}, "
                      f"rng: {ck.loaded_rng})")
        return ck

    # ------------------------------------------------------------------ steps

    @property
    def lr(self) -> float:
        for g in self.optimizer.param_groups:
            return float(g["lr"])
        return float("nan")

    def train_step(
        self,
        data_iterator: Iterator | list[Iterator],
        forward_step: ForwardStep,
        *,
        num_microbatches: Optional[int] = None,
    ) -> StepResult:
        """One optimizer step. A step whose gradients are non-finite on any rank is skipped on all ranks:
        weights, optimizer state and LR schedule stay as they were; the iteration still advances (its data
        is consumed) and ``skipped_steps`` counts it."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n_mb = num_microbatches or self.num_microbatches
        t0 = self._now()
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=n_mb,
            seq_length=self.cfg.schedule.seq_length,
            micro_batch_size=self.cfg.schedule.micro_batch_size,
            forward_only=False,
        )
        lr = self.lr
        grad_norm = None
        skipped = not grads_are_finite(self.model)
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok  # only a dynamic loss scaler (fp16) reports failure; we run bf16/fp32
            if ok:
                self.scheduler.step(increment=1)
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skipped += 1
        else:
            self.consecutive_skipped = 0
        self.iteration += 1
        metrics = self._reduce_reports(reports)
        num_tokens = int(metrics.pop("num_tokens", 0))
        res = StepResult(self.iteration, metrics, lr, None if grad_norm is None else float(grad_norm),
                         skipped, num_tokens, self._now() - t0)
        self._log_train(res)
        limit = self.cfg.optimizer.max_skipped_steps
        if limit and self.consecutive_skipped >= limit:
            # Every rank saw the same (all-reduced) skip decisions, so every rank stops here together.
            raise TrainingDiverged(
                f"the run has diverged: {self.consecutive_skipped} steps in a row (up to iteration "
                f"{self.iteration}) had non-finite gradients (optimizer.max_skipped_steps={limit}); the last "
                f"checkpoint saved before that is {self.last_good_checkpoint or 'none'}. Lower optimizer.lr or "
                f"check the data, then resume from it")
        return res

    @torch.no_grad()
    def evaluate(self, data_iterator: Iterator | list[Iterator], forward_step: ForwardStep,
                 num_steps: int) -> dict[str, float]:
        """Forward-only passes over ``num_steps`` global batches; report values reduced as in training."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.model:
            chunk.eval()
        acc: dict[str, list[float]] = {}
        try:
            for _ in range(num_steps):
                reports = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=data_iterator, model=self.model,
                    num_microbatches=self.num_microbatches, seq_length=self.cfg.schedule.seq_length,
                    micro_batch_size=self.cfg.schedule.micro_batch_size, forward_only=True,
                )
                for k, v in self._reduce_reports(reports, raw=True).items():
                    a = acc.setdefault(k, [0.0, 0.0])
                    a[0] += v[0]
                    a[1] += v[1]
        finally:
            for chunk in self.model:
                chunk.train()
        out = {k: (v[0] / v[1] if v[1] else v[0]) for k, v in acc.items() if k != "num_tokens"}
        if self.rank == 0:
            if self._writer is not None:
                for k, v in out.items():
                    self._writer.add_scalar(f"eval/{k}", v, self.iteration)
            self._say(f"eval @ {self.iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def _reduce_reports(self, reports: list, raw: bool = False) -> dict:
        """Sum report tensors over micro-batches (last stage) and DP ranks; share them with every rank."""
        from megatron.core import parallel_state as ps

        pp_group = ps.get_pipeline_model_parallel_group()
        payload = None
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            sums: dict[str, torch.Tensor] = {}
            for rep in reports or []:
                for k, v in rep.items():
                    v = torch.as_tensor(v).detach().float().reshape(-1)
                    if v.numel() not in (1, 2):
                        raise ValueError(f"report value {k!r} must have 1 (count) or 2 (num, den) elements, "
                                         f"got shape {tuple(v.shape)}")
                    sums[k] = sums[k] + v if k in sums else v.clone()
            keys = sorted(sums)
            if keys:
                flat = torch.cat([sums[k] if sums[k].numel() == 2 else torch.cat([sums[k], sums[k].new_zeros(1)])
                                  for k in keys])
                kinds = [sums[k].numel() for k in keys]
                flat = flat.to(_report_device())
                if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
                    dist.all_reduce(flat, group=ps.get_data_parallel_group())
                vals = flat.view(-1, 2).cpu().tolist()
                payload = {k: (v[0], v[1] if n == 2 else 0.0) for k, v, n in zip(keys, vals, kinds)}
            else:
                payload = {}
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [payload]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
            payload = box[0]
        if raw:
            return payload
        return {k: (num / den if den else num) for k, (num, den) in payload.items()}

    # ------------------------------------------------------------------ logging

    def _now(self) -> float:
        if torch.cuda.is_available():
            from m2mega.runtime import cpu

            if not cpu.is_active():
                torch.cuda.synchronize()
        return time.perf_counter()

    def _peak_flops(self) -> Optional[float]:
        tf = self.cfg.logging.peak_tflops
        if tf is None:
            from m2mega.runtime import device

            tf = PEAK_TFLOPS_CUDA_DEFAULT if device().type == "cuda" else None
        return None if tf is None else tf * 1e12

    def throughput(self, res: StepResult) -> tuple[Optional[float], Optional[float]]:
        """(tokens/s, MFU) of a step; MFU needs flops_per_token and a peak (logging.peak_tflops)."""
        if res.step_time_s <= 0 or res.num_tokens <= 0:
            return None, None
        tps = res.num_tokens / res.step_time_s
        peak = self._peak_flops()
        if self.flops_per_token is None or peak is None:
            return tps, None
        return tps, self.flops_per_token(self.cfg) * tps / (self.world_size * peak)

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.write(text)
        elif self.cfg.logging.progress != "none":
            print(text, flush=True)

    def _log_train(self, res: StepResult) -> None:
        if self.rank != 0:
            return
        tps, mfu = self.throughput(res)
        if self._writer is not None and res.iteration % self.cfg.logging.log_interval == 0:
            w, it = self._writer, res.iteration
            for k, v in res.metrics.items():
                w.add_scalar(f"train/{k}", v, it)
            w.add_scalar("train/lr", res.lr, it)
            if res.grad_norm is not None:
                w.add_scalar("train/grad_norm", res.grad_norm, it)
            w.add_scalar("train/skipped_steps", self.skipped_steps, it)
            w.add_scalar("train/step_time_s", res.step_time_s, it)
            if tps is not None:
                w.add_scalar("train/tokens_per_s", tps, it)
            if mfu is not None:
                w.add_scalar("train/mfu", mfu, it)
        if res.skipped:
            self._say(f"iteration {res.iteration}: non-finite gradients, step skipped "
                      f"(weights and optimizer state unchanged; {self.skipped_steps} skipped so far)")
        parts = [f"loss {res.loss:.4f}" if res.loss is not None and math.isfinite(res.loss) else "loss -"]
        parts.append(f"lr {res.lr:.2e}")
        if res.grad_norm is not None:
            parts.append(f"gn {res.grad_norm:.3f}")
        if tps is not None:
            parts.append(f"{tps:,.0f} tok/s")
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.3g}%")
        if self.skipped_steps:
            parts.append(f"skipped {self.skipped_steps}")
        if self._progress is not None:
            self._progress.update(res.iteration, " | ".join(parts))

    def start_progress(self, total: int) -> None:
        if self.rank == 0 and self._progress is None:
            self._progress = _Progress(self.cfg.logging.progress, total, self.iteration,
                                       self.cfg.logging.log_interval)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def describe_checkpoint(path: str) -> str:
    """``path`` as the checkpoint it resolves to, with its iteration when it is a training save."""
    import os
    import re

    resolved = resolve_checkpoint(path)
    m = re.fullmatch(r"iter_(\d+)", os.path.basename(resolved.rstrip(os.sep)))
    return f"{resolved} (iteration {int(m.group(1))})" if m else f"{resolved} (a converted checkpoint)"


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _report_device() -> torch.device:
    from m2mega.runtime import device

    return device()


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
    """Resume if a checkpoint exists, then train to ``schedule.train_iters`` (or ``stop_at``, for tests and
    staged runs), validating every ``sft.eval_interval`` and saving every ``checkpoint.save_interval``."""
    t_start = time.perf_counter()
    own = trainer is None
    trainer = trainer or Trainer(cfg, model_provider, flops_per_token=flops_per_token)
    loader = data_provider(cfg, "train")
    if loader is None:
        raise ValueError("data_provider returned no train loader")
    resumed = trainer.resume(loader)
    if trainer.rank == 0 and cfg.model.init_from and resumed is None:
        trainer._say(f"model initialised from {describe_checkpoint(cfg.model.init_from)}")
    start = trainer.iteration
    end = min(cfg.schedule.train_iters, stop_at) if stop_at is not None else cfg.schedule.train_iters
    summary = TrainSummary(start_iteration=start, iterations=0)
    if trainer.rank == 0 and cfg.logging.progress != "none":
        print(f"training iterations {start} -> {end} (global batch {cfg.schedule.global_batch_size}, "
              f"{trainer.num_microbatches} micro-batches x {cfg.schedule.micro_batch_size} per DP rank, "
              f"DP{trainer.dp_size} TP{cfg.parallel.tp} PP{cfg.parallel.pp})", flush=True)
    trainer.start_progress(cfg.schedule.train_iters)
    ck = cfg.checkpoint
    it = iter(loader)
    try:
        while trainer.iteration < end:
            res = trainer.train_step(it, forward_step)
            summary.losses.append(res.loss)
            summary.iterations += 1
            if cfg.sft.eval_interval and trainer.iteration % cfg.sft.eval_interval == 0:
                valid = data_provider(cfg, "valid")
                if valid is not None:
                    summary.eval_metrics = trainer.evaluate(iter(valid), forward_step, cfg.sft.eval_iters)
            if ck.save_dir and ck.save_interval and trainer.iteration % ck.save_interval == 0:
                trainer.save(loader)
        if ck.save_dir and ck.save_at_end and summary.iterations > 0:
            trainer.save(loader)
    finally:
        summary.skipped_steps = trainer.skipped_steps
        summary.last_checkpoint = trainer.last_checkpoint
        summary.wall_time_s = time.perf_counter() - t_start
        if own:
            trainer.close()
    return summary
