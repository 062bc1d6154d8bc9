"""Checks a checkpoint must pass before a run uses it, each failing early with an error naming the flag,
field or tensor: a ``save_dir`` that belongs to another run, a changed model architecture (from the saved
``config.yaml``, before the model is built) and changed global tensor shapes (from ``.metadata``, before
any tensor is read)."""

from __future__ import annotations

import os

from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from m2mega.convert.checks import CorruptCheckpoint

from .config import ConfigError, TrainConfig, to_dict

__all__ = ["check_save_dir", "check_model_config", "check_global_shapes"]


def check_save_dir(cfg: TrainConfig) -> None:
    """A run may save into a ``save_dir`` that holds checkpoints only when it resumes from that directory:
    otherwise its saves would interleave with another run's (and ``keep_last`` would rotate one run's
    checkpoints out for the other's). Raises :class:`ConfigError` naming the flags."""
    c = cfg.checkpoint
    if not c.save_dir:
        return
    from .checkpoint import list_checkpoints

    found = list_checkpoints(c.save_dir)
    if not found:
        return
    resumes_here = c.resume and (not c.load_dir or os.path.abspath(c.load_dir) == os.path.abspath(c.save_dir))
    if not resumes_here:
        why = "checkpoint.resume=false" if not c.resume else f"checkpoint.load_dir={c.load_dir}"
        raise ConfigError(
            f"checkpoint.save_dir {c.save_dir} already holds checkpoints ({os.path.basename(found[-1][1])}, "
            f"{len(found)} in all) of another run, and this run does not resume from it ({why}): pick another "
            f"checkpoint.save_dir, delete them, or set checkpoint.resume=true to continue that run"
        )


# ModelConfig fields that do not change any parameter's shape (or whose change a load tolerates).
# ``preset`` only names where a qwen25vl architecture came from (a preset, or a config.json such as the one
# init_from carries): the architectures themselves are compared instead (_arch_diff).
_SHAPE_NEUTRAL = {"hidden_dropout", "attention_dropout", "recompute", "recompute_num_layers", "freeze_vision",
                  "vision_prefix", "init_from", "gpt.rotary_base", "gpt.max_position_embeddings", "preset"}


def _arch_diff(path: str, cfg: TrainConfig) -> dict:
    """qwen25vl: the architecture in the checkpoint's config.json against the one this config builds."""
    import dataclasses

    if cfg.model.family != "qwen25vl" or not os.path.isfile(os.path.join(path, "config.json")):
        return {}
    from m2mega.models.qwen25vl import Qwen25VLConfig

    from . import vlm

    saved, now = Qwen25VLConfig.from_hf(path), vlm.arch_from_config(cfg)
    out = {}
    for part in ("text", "vision"):
        a, b = dataclasses.asdict(getattr(saved, part)), dataclasses.asdict(getattr(now, part))
        out.update({f"{part}.{k}": (a[k], b.get(k)) for k in a
                    if k != "max_position_embeddings" and a[k] != b.get(k)})
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_model_config(path: str, cfg: TrainConfig) -> None:
    """Refuse, before the model is built, a checkpoint saved with another architecture: its ``config.yaml``
    ``model`` section against ``cfg.model``, every changed field named. Checkpoints without a
    ``config.yaml`` (converted from HF) are checked by tensor shapes at load time instead."""
    import yaml

    f = os.path.join(path, "config.yaml")
    if not os.path.isfile(f):
        return
    with open(f) as fh:
        try:
            saved = (yaml.safe_load(fh) or {}).get("model") or {}
        except yaml.YAMLError as e:
            raise CorruptCheckpoint(f, f"not valid YAML ({e})") from None
    saved, now = _flat(saved), _flat(to_dict(cfg)["model"])
    relevant = [k for k in sorted(now) if k in saved and k not in _SHAPE_NEUTRAL and now[k] is not None
                and (not k.startswith("gpt.") or now.get("family") == "gpt")]  # None: taken from the checkpoint
    diff = {f"model.{k}": (saved[k], now[k]) for k in relevant if saved[k] != now[k]}
    diff.update({f"architecture {k}": v for k, v in _arch_diff(path, cfg).items()})
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint {path} was saved with another model architecture ({listing}); set the "
                          f"config to the checkpoint's values or start from another checkpoint")


def check_global_shapes(path: str, sharded_sd: dict) -> None:
    """Every tensor the model asks for exists in ``path`` with the same global shape (read from the
    already-verified ``.metadata``), listed in one error rather than a megatron trace mid-load."""

    from m2mega.convert.checks import read_dcp_metadata

    saved = read_dcp_metadata(path).state_dict_metadata
    problems = []
    for sh in nested_values(sharded_sd):
        if not isinstance(sh, ShardedTensor) or sh.allow_shape_mismatch:
            continue
        if sh.key not in saved:
            problems.append(f"{sh.key!r} missing")
        elif tuple(getattr(saved[sh.key], "size", ())) != tuple(sh.global_shape):
            problems.append(f"{sh.key!r} saved {tuple(saved[sh.key].size)}, model {tuple(sh.global_shape)}")
    if problems:
        more = f" ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(f"checkpoint {path} does not fit this model (another architecture?): "
                          + "; ".join(problems[:10]) + more)
