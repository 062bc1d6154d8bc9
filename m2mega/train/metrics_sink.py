"""Where training metrics go: TensorBoard and/or Weights & Biases behind one ``add_scalar``.

The trainer (and the GRPO runner through ``trainer._writer``) logs through one :class:`MetricsSink` on
rank 0. It has the subset of ``torch.utils.tensorboard.SummaryWriter``'s interface the stack uses
(``add_scalar``, ``add_text``, ``flush``, ``close``), so every call site writes the same scalar names to
both backends: ``logging.tensorboard_dir`` turns TensorBoard on, ``logging.wandb_project`` turns W&B on.

W&B is optional (``pip install wandb``): :func:`wandb_missing_error` is what config validation reports
when the key is set without it. ``logging.wandb_mode`` (``online`` / ``offline`` / ``disabled``) wins over
the ``WANDB_MODE`` environment variable; unset, W&B's own default applies (``WANDB_MODE``, else online).
Offline runs are written under ``WANDB_DIR`` (default ``./wandb``) and uploaded later with
``wandb sync``. The run's config is the full training config, so runs are comparable by any key.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional, Protocol

__all__ = ["MetricsSink", "open_metrics_sink", "wandb_missing_error"]


class _Backend(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...
    def add_text(self, tag: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _WandbBackend:
    """One W&B run; one history row per iteration.

    Every row carries ``iteration`` as its x-axis (``define_metric``): W&B's own ``step`` must only grow,
    and the trainer and GRPO runner log an iteration's scalars in several calls (train, eval, rollout).
    Scalars are collected per iteration and written when the next iteration's first scalar arrives, or
    at ``flush`` / ``close``.
    """

    def __init__(self, project: str, run_name: Optional[str], mode: Optional[str], config: dict) -> None:
        import wandb

        self._run = wandb.init(project=project, name=run_name, mode=mode, config=config)
        self._run.define_metric("iteration")
        self._run.define_metric("*", step_metric="iteration")
        self._row: dict[str, float] = {}
        self._row_iteration: Optional[int] = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._row_iteration is not None and int(step) != self._row_iteration:
            self.flush()
        self._row_iteration = int(step)
        self._row[tag] = float(value)

    def add_text(self, tag: str, text: str, step: int) -> None:
        pass  # the config text TensorBoard gets is the run's config in W&B (wandb.init(config=...))

    def flush(self) -> None:
        if self._row and self._run is not None:
            self._run.log({**self._row, "iteration": self._row_iteration})
        self._row, self._row_iteration = {}, None

    def close(self) -> None:
        """Finish the run; on return its offline ``run-*.wandb`` log is complete on disk."""
        if self._run is not None:
            import wandb

            self.flush()
            self._run.finish()
            self._run = None
            # finish() only tells wandb-core the run is over (a message it does not wait on); the run's
            # transaction log is flushed and closed later, by the service, at worst at interpreter exit
            # (or never, after os._exit / a kill, or in a multiprocessing child). teardown() waits for the
            # service to close every stream and exit. Skipped when another run (not ours) is still active.
            if wandb.run is None:
                wandb.teardown()


class MetricsSink:
    """Fans each scalar out to every configured backend (TensorBoard's ``SummaryWriter``, W&B)."""

    def __init__(self, backends: list[_Backend]) -> None:
        self.backends = backends

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        for b in self.backends:
            b.add_scalar(tag, value, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        for b in self.backends:
            b.add_text(tag, text, step)

    def flush(self) -> None:
        for b in self.backends:
            b.flush()

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def _wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def wandb_missing_error(cfg) -> Optional[str]:
    """The one-line error for ``logging.wandb_project`` set while wandb is not installed, else None."""
    if cfg.logging.wandb_project and not _wandb_installed():
        return (f"logging.wandb_project={cfg.logging.wandb_project!r} needs the wandb package, which is not "
                f"installed (pip install wandb, or unset logging.wandb_project)")
    return None


def open_metrics_sink(cfg) -> Optional[MetricsSink]:
    """The sink for ``cfg.logging`` (call on rank 0 only), or None when neither backend is configured.

    The config is recorded once: as text in TensorBoard, as the run config in W&B.
    """
    from .config import ConfigError, to_dict, to_yaml

    lg = cfg.logging
    backends: list[_Backend] = []
    if lg.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        backends.append(SummaryWriter(lg.tensorboard_dir))
    if lg.wandb_project:
        err = wandb_missing_error(cfg)
        if err:
            raise ConfigError(err)
        backends.append(_WandbBackend(lg.wandb_project, lg.wandb_run_name or cfg.run_name, lg.wandb_mode,
                                      to_dict(cfg)))
    if not backends:
        return None
    sink = MetricsSink(backends)
    sink.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)
    return sink
