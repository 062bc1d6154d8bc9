"""The megatron-core training loop, shared by SFT and GRPO.

Two layers:

* :class:`Trainer` owns the pieces every stage needs: the model chunks (DDP-wrapped), megatron optimizer
  and LR scheduler, checkpoint save/resume, non-finite step skipping, metrics (TensorBoard, progress line).
  Its :meth:`Trainer.train_step` runs one optimizer step over any ``forward_step`` through
  ``get_forward_backward_func()`` (1F1B under pipeline parallelism). A GRPO step is
  ``rollout -> score -> trainer.train_step(iter(micro_batches), grpo_forward_step)``: the custom loss lives
  in its ``forward_step``; optimizer, checkpointing and logging are reused as they are, and
  :meth:`Trainer.register_state` adds e.g. a KL-schedule or sampler state to every checkpoint.
* :meth:`Trainer.fit` is the one driver loop: resume, then steps of a :class:`StepSource` (SFT's
  :class:`m2mega.train.sft.SFTSteps`, GRPO's :class:`m2mega.train.grpo_runner.GRPORunner`) until ``schedule.train_iters``,
  with the source's evaluation hook, periodic checkpoints, progress and TensorBoard. A source makes its
  optimizer updates through :meth:`Trainer.train_step` and logs through :meth:`Trainer.say` /
  :meth:`Trainer.log_scalars`; it never touches the trainer's internals.

Conventions (megatron's): ``forward_step(data_iterator, model) -> (output, loss_func)``; with
``calculate_per_token_loss`` (set by :func:`training_transformer_overrides`) ``loss_func(output)`` returns
``(loss_sum, num_loss_tokens, report)`` and megatron divides the gradients by the global number of loss
tokens, so the step minimises the per-token mean over the whole global batch however it is split into
micro-batches and data-parallel ranks. ``report`` values are tensors: shape ``[2]`` = (numerator,
denominator) reported as their ratio, shape ``[1]`` = a count reported as its sum; both are summed over
micro-batches and data-parallel ranks. The key ``num_tokens`` (processed tokens) drives tokens/s and MFU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from m2mega.kernels import KernelConfig, set_kernel_config
from m2mega.runtime import device, seed_everything
from m2mega.runtime.cli import RunFailed

from .checkpoint import (
    LoadedCheckpoint,
    load_checkpoint,
    load_model_weights,
    pick_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, num_microbatches, validate
from .optim import grads_are_finite, setup_model_and_optimizer
from .preflight import preflight_checkpoints
from .progress import Progress

__all__ = [
    "StepResult",
    "TrainSummary",
    "Trainer",
    "StepSource",
    "ModelProvider",
    "ForwardStep",
    "DataProvider",
    "TrainingDiverged",
]

log = logging.getLogger(__name__)

ModelProvider = Callable[[TrainConfig], "torch.nn.Module | list[torch.nn.Module]"]
ForwardStep = Callable[[Iterator, torch.nn.Module], tuple]
# data_provider(cfg, split) -> iterable of micro-batches for this rank ("train" | "valid"); the train
# loader should have state_dict()/load_state_dict() so a resumed run continues at the same sample.
DataProvider = Callable[[TrainConfig, str], Optional[Iterable]]

PEAK_TFLOPS_CUDA_DEFAULT = 989.0  # H100 SXM dense bf16


class TrainingDiverged(RunFailed):
    """``optimizer.max_skipped_steps`` steps in a row had non-finite gradients."""


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


class StepSource(Protocol):
    """What :meth:`Trainer.fit` drives. ``data_loader`` (or None) is saved with every checkpoint and restored
    on resume (``state_dict``/``load_state_dict``)."""

    data_loader: Any

    def on_start(self, trainer: "Trainer") -> None:
        """After resume, before the first step (e.g. a legend, the first held-out point)."""

    def run_step(self, trainer: "Trainer") -> Sequence[StepResult]:
        """One step of the source: one or more optimizer updates through ``trainer.train_step``."""

    def should_evaluate(self, before: int, after: int, end: int) -> bool:
        """Whether to evaluate after a step that moved the iteration from ``before`` to ``after``."""

    def evaluate(self, trainer: "Trainer") -> Optional[dict]:
        """The evaluation hook; a returned dict becomes :attr:`TrainSummary.eval_metrics`."""

    def on_end(self, trainer: "Trainer", summary: "TrainSummary") -> None:
        """After the last step and the final save."""


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
        set_kernel_config(KernelConfig(**dataclasses.asdict(cfg.kernels)))  # read by every fused-kernel call
        self.iteration = 0
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.last_checkpoint: Optional[str] = None
        # The newest checkpoint saved while steps were finite: keep_last rotation never deletes it.
        self.last_good_checkpoint: Optional[str] = None
        self._states: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self._writer = None
        self._progress: Optional[Progress] = None
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
            self.say(f"resumed from {path} at iteration {ck.iteration} (optimizer: {ck.loaded_optimizer}, "
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
            self.log_scalars(out, self.iteration, "eval/")
            self.say(f"eval @ {self.iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def _reduce_reports(self, reports: list, raw: bool = False) -> dict:
        """Sum report tensors over micro-batches (last stage) and DP ranks; share them with every rank."""

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
                flat = flat.to(device())
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

    def advance_to(self, iteration: int) -> None:
        """Move the iteration counter forward without an update: a GRPO step whose planned updates had no
        data still counts them, so ``schedule.train_iters`` and the LR/KL schedules stay aligned."""
        if iteration < self.iteration:
            raise ValueError(f"cannot move the iteration back from {self.iteration} to {iteration}")
        self.iteration = iteration

    # ------------------------------------------------------------------ the loop

    def fit(self, source: StepSource, *, stop_at: Optional[int] = None) -> TrainSummary:
        """Resume if a checkpoint exists, then run ``source``'s steps to ``schedule.train_iters`` (or
        ``stop_at``, for tests and staged runs), evaluating when the source asks and saving every
        ``checkpoint.save_interval`` iterations (and at the end with ``checkpoint.save_at_end``)."""
        t_start = time.perf_counter()
        cfg, ck = self.cfg, self.cfg.checkpoint
        resumed = self.resume(source.data_loader)
        if self.rank == 0 and cfg.model.init_from and resumed is None:
            self.say(f"model initialised from {describe_checkpoint(cfg.model.init_from)}")
        start = self.iteration
        end = min(cfg.schedule.train_iters, stop_at) if stop_at is not None else cfg.schedule.train_iters
        summary = TrainSummary(start_iteration=start, iterations=0)
        self.start_progress(cfg.schedule.train_iters)
        try:
            source.on_start(self)
            while self.iteration < end:
                before = self.iteration
                for res in source.run_step(self):
                    summary.losses.append(res.loss)
                summary.iterations += self.iteration - before
                if source.should_evaluate(before, self.iteration, end):
                    out = source.evaluate(self)
                    if out is not None:
                        summary.eval_metrics = out
                if ck.save_dir and ck.save_interval and self.iteration // ck.save_interval > before // ck.save_interval:
                    self.save(source.data_loader)
            if ck.save_dir and ck.save_at_end and summary.iterations > 0:
                self.save(source.data_loader)
            source.on_end(self, summary)
        finally:
            summary.skipped_steps = self.skipped_steps
            summary.last_checkpoint = self.last_checkpoint
            summary.wall_time_s = time.perf_counter() - t_start
        return summary

    # ------------------------------------------------------------------ logging

    def say(self, text: str) -> None:
        """A line for the user (rank 0 calls it), printed above the progress bar when there is one."""
        if self._progress is not None:
            self._progress.write(text)
        elif self.cfg.logging.progress != "none":
            print(text, flush=True)

    def log_scalars(self, scalars: dict[str, float], iteration: int, prefix: str = "") -> None:
        """``prefix + name`` scalars to TensorBoard / W&B (rank 0; no-op without a metrics sink).
        Non-finite values are skipped (TensorBoard would draw them as gaps anyway)."""
        if self._writer is None:
            return
        for k, v in scalars.items():
            if math.isfinite(float(v)):
                self._writer.add_scalar(prefix + k, float(v), iteration)

    def _now(self) -> float:
        if device().type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _peak_flops(self) -> Optional[float]:
        tf = self.cfg.logging.peak_tflops
        if tf is None:
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
            self.say(f"iteration {res.iteration}: non-finite gradients, step skipped "
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
            self._progress = Progress(self.cfg.logging.progress, total, self.iteration,
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
