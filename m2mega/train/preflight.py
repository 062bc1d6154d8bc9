"""Checks a run makes before process groups and models exist, so a command line fails in seconds with one
message: the config's rules, the datasets it reads, and the checkpoints it resumes from or starts at."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from m2mega.convert.layout import find_latest, resolve_checkpoint
from m2mega.runtime.cli import require_paths, require_prefixes

from .checkpoint_checks import check_model_config, check_save_dir
from .config import ConfigError, TrainConfig, validate

__all__ = ["preflight", "preflight_checkpoints"]


def preflight(cfg: TrainConfig, *, prefixes: Sequence[tuple[str, Optional[str]]] = ()) -> None:
    """Everything a run can check before process groups and models exist, so a command line fails in
    seconds with one message: the config's rules (with torchrun's ``WORLD_SIZE``), the preprocessed
    datasets it will read (``prefixes``: extra ``(flag, PREFIX)`` pairs), ``model.init_from`` and its
    checkpoints (:func:`preflight_checkpoints`)."""
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
