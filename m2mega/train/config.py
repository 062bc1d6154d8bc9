"""One training configuration for SFT and GRPO: dataclass sections (:mod:`.config_schema`), YAML in,
``--section.key=value`` flags.

::

    cfg = load_config("examples/qwen25vl_7b/sft.yaml", ["--parallel.tp=4", "--schedule.train_iters", "100"])
    print(to_yaml(cfg))          # printed in full at start; the same YAML is saved with every checkpoint

Every key is checked: an unknown key is an error that names it (with the closest known key), a value of
the wrong type names the key and the expected type, and cross-field rules (warmup shorter than the decay,
global batch divisible by micro batch x data-parallel size, ...) are checked in :func:`validate` so a bad
run fails before it builds a model. Defaults are the CPU demo's; ``examples/qwen25vl_7b/*.yaml`` hold the
7B values next to the paper's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Sequence

import yaml

from m2mega.runtime.cli import UsageError

from .config_schema import (  # the sections, defined apart and re-exported here
    REWARD_SWITCHES,
    CheckpointConfig,
    DataConfig,
    GPTShapeConfig,
    GRPOConfig,
    KernelsConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    SFTConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "GPTShapeConfig",
    "ParallelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "DataConfig",
    "SFTConfig",
    "GRPOConfig",
    "KernelsConfig",
    "TrainConfig",
    "REWARD_SWITCHES",
    "from_dict",
    "to_dict",
    "to_yaml",
    "load_config",
    "apply_overrides",
    "validate",
    "num_microbatches",
]


class ConfigError(UsageError):
    """A configuration problem; the message names the offending key."""


# ----------------------------------------------------------------------------------------- coercion


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a flag) to ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                f = float(value)  # "1e3" style integers
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: expected a mapping, could not parse {value!r}: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in this module, not in the config


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            raise _unknown(key, names)
        tp = hints[k]
        kwargs[k] = _build(tp, v, key + ".") if _is_section(tp) else _coerce(v, tp, key)
    return cls(**kwargs)


def from_dict(data: dict | None) -> TrainConfig:
    """Build and validate a config from a nested mapping (as read from YAML)."""
    cfg = _build(TrainConfig, data or {}, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, TrainConfig) and cfg.model.family != "gpt":
        d["model"].pop("gpt", None)  # read by the gpt family only: a saved config shows what the run used
    return d


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------- overrides


def _split_flags(flags: Sequence[str]) -> list[tuple[str, str]]:
    """``--a.b=v`` or ``--a.b v`` -> [("a.b", "v")]."""
    out, i = [], 0
    flags = list(flags)
    while i < len(flags):
        f = flags[i]
        if not f.startswith("--") or len(f) <= 2:
            raise ConfigError(f"expected a '--section.key=value' flag, got {f!r}")
        body = f[2:]
        if "=" in body:
            k, v = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(flags):
                raise ConfigError(f"flag --{body} has no value")
            k, v = body, flags[i + 1]
            i += 2
        out.append((k.replace("-", "_"), v))
    return out


def apply_overrides(data: dict, flags: Sequence[str]) -> dict:
    """Apply ``--section.key=value`` flags to a nested mapping (values parsed as YAML scalars)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for key, raw in _split_flags(flags):
        parts = key.split(".")
        cls: Any = TrainConfig
        node = data
        for depth, p in enumerate(parts):
            hints = typing.get_type_hints(cls)
            path = ".".join(parts[: depth + 1])
            if p not in hints:
                raise _unknown(path, [f.name for f in dataclasses.fields(cls)])
            tp = hints[p]
            last = depth == len(parts) - 1
            if _is_section(tp):
                if last:
                    raise ConfigError(f"'{path}' is a section; set one of its keys (--{path}.<key>=...)")
                sub = node.get(p)
                node[p] = dict(sub) if isinstance(sub, dict) else {}
                node, cls = node[p], tp
            else:
                if not last:
                    raise _unknown(path + "." + parts[depth + 1], [])
                try:
                    value = yaml.safe_load(raw) if raw.strip() else raw
                except yaml.YAMLError:
                    value = raw
                if typing.get_origin(tp) is not dict and isinstance(value, (dict, list)):
                    value = raw  # e.g. a path that looks like flow YAML stays a string
                node[p] = value
    return data


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional) + ``--section.key=value`` flags -> validated :class:`TrainConfig`."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    try:
        return from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


# ----------------------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Cross-field rules. With ``world_size`` also the layout rules that need it (divisibility)."""
    m, p, o, s, c, lg, d, g = (cfg.model, cfg.parallel, cfg.optimizer, cfg.schedule, cfg.checkpoint,
                               cfg.logging, cfg.data, cfg.grpo)  # fmt: skip
    _check(m.recompute_num_layers >= 1, f"model.recompute_num_layers must be >= 1, got {m.recompute_num_layers}")
    for name in ("hidden_dropout", "attention_dropout"):
        _check(0.0 <= getattr(m, name) < 1.0, f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    _check(p.tp >= 1 and p.pp >= 1, f"parallel.tp and parallel.pp must be >= 1, got tp={p.tp} pp={p.pp}")
    _check(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
    _check(not p.overlap_param_gather or p.use_distributed_optimizer,
           "parallel.overlap_param_gather needs parallel.use_distributed_optimizer")
    _check(p.timeout_s > 0, f"parallel.timeout_s must be > 0, got {p.timeout_s}")
    _check(o.lr >= 0 and 0 <= o.min_lr <= o.lr, f"need 0 <= optimizer.min_lr ({o.min_lr}) <= optimizer.lr ({o.lr})")
    # No LLM recipe trains above 1e-2; lr > 1 is a typo (1e30 blows weights up to finite 1e30s).
    _check(o.lr <= 1.0, f"optimizer.lr {o.lr} > 1 is outside any sane range (a typo? e.g. 1e-5)")
    _check(o.max_skipped_steps >= 0, f"optimizer.max_skipped_steps must be >= 0, got {o.max_skipped_steps}")
    _check(0 <= o.lr_warmup_init <= o.lr, f"optimizer.lr_warmup_init {o.lr_warmup_init} must be in [0, lr]")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _check(0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optimizer.adam_beta1/adam_beta2 must be in [0, 1)")
    _check(o.adam_eps > 0, f"optimizer.adam_eps must be > 0, got {o.adam_eps}")
    _check(o.clip_grad >= 0, f"optimizer.clip_grad must be >= 0, got {o.clip_grad}")
    _check(o.optimizer == "adam" or not p.use_distributed_optimizer,
           "optimizer.optimizer 'sgd' needs parallel.use_distributed_optimizer=false (megatron's distributed "
           "optimizer supports Adam only)")
    _check(s.train_iters >= 1, f"schedule.train_iters must be >= 1, got {s.train_iters}")
    _check(s.micro_batch_size >= 1 and s.global_batch_size >= 1, "schedule batch sizes must be >= 1")
    _check(s.global_batch_size % s.micro_batch_size == 0,
           f"schedule.global_batch_size {s.global_batch_size} is not divisible by "
           f"schedule.micro_batch_size {s.micro_batch_size}")
    _check(s.seq_length >= 2, f"schedule.seq_length must be >= 2, got {s.seq_length}")
    decay = s.lr_decay_iters if s.lr_decay_iters is not None else s.train_iters
    _check(decay >= 1, f"schedule.lr_decay_iters must be >= 1, got {decay}")
    _check(0 <= s.lr_warmup_iters < decay,
           f"schedule.lr_warmup_iters ({s.lr_warmup_iters}) must be < the decay length ({decay})")
    _check(c.save_interval >= 0 and c.keep_last >= 0 and c.save_threads >= 1,
           "checkpoint.save_interval/keep_last must be >= 0 and checkpoint.save_threads >= 1")
    _check(lg.log_interval >= 1, f"logging.log_interval must be >= 1, got {lg.log_interval}")
    _check(lg.peak_tflops is None or lg.peak_tflops > 0, f"logging.peak_tflops must be > 0, got {lg.peak_tflops}")
    from .metrics_sink import wandb_missing_error

    _check(wandb_missing_error(cfg) is None, wandb_missing_error(cfg) or "")
    _check(d.source != "packed" or d.train_prefix, "data.source 'packed' needs data.train_prefix")
    _check(not c.save_hf or m.family == "qwen25vl",
           f"checkpoint.save_hf writes an HF Qwen2.5-VL model; model.family {m.family!r} has no HF form")
    _check(d.source != "synthetic" or m.family == "gpt",
           f"data.source 'synthetic' (random tokens) is for the gpt test family; model.family {m.family!r} trains "
           f"on data.source 'packed'")
    _check(d.num_workers >= 0 and d.num_buckets >= 1, "data.num_workers must be >= 0, data.num_buckets >= 1")
    _check(cfg.sft.eval_interval >= 0 and cfg.sft.eval_iters >= 1, "sft.eval_interval >= 0, sft.eval_iters >= 1")
    _check(g.group_size >= 2, f"grpo.group_size must be >= 2 (advantages are group-relative), got {g.group_size}")
    _check(g.prompts_per_step >= 1, f"grpo.prompts_per_step must be >= 1, got {g.prompts_per_step}")
    _check(g.temperature > 0, f"grpo.temperature must be > 0, got {g.temperature}")
    _check(0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}")
    _check(g.max_new_tokens >= 1, f"grpo.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    _check(0 <= g.clip_low < 1 and g.clip_high >= 0,
           f"grpo clip range: need 0 <= clip_low < 1, clip_high >= 0, got {g.clip_low}, {g.clip_high}")
    _check(0 <= g.beta_min <= g.beta_max and g.beta >= 0,
           f"grpo: need 0 <= beta_min ({g.beta_min}) <= beta_max ({g.beta_max}) and beta >= 0")
    _check(g.sigma > 0 and g.adv_eps > 0, "grpo.sigma and grpo.adv_eps must be > 0")
    _check(g.ednm_lambda >= 0 and g.ednm_gamma >= 0, "grpo.ednm_lambda and grpo.ednm_gamma must be >= 0")
    _check(g.updates_per_rollout >= 1, f"grpo.updates_per_rollout must be >= 1, got {g.updates_per_rollout}")
    _check(g.max_refill_rounds >= 0, f"grpo.max_refill_rounds must be >= 0, got {g.max_refill_rounds}")
    _check(g.rollout_batch >= 1 and g.rollout_kv_tokens >= 0,
           f"grpo.rollout_batch must be >= 1 and grpo.rollout_kv_tokens >= 0, got {g.rollout_batch}, "
           f"{g.rollout_kv_tokens}")
    _check(not g.dynamic_sampling or g.drop_zero_variance,
           "grpo.dynamic_sampling refills degenerate groups, so it needs grpo.drop_zero_variance: true")
    _check(g.dual_clip is None or g.dual_clip > 1, f"grpo.dual_clip must be > 1 or null, got {g.dual_clip}")
    _check(g.max_no_signal_steps >= 0, f"grpo.max_no_signal_steps must be >= 0, got {g.max_no_signal_steps}")
    _check(g.eval_interval >= 0 and g.eval_samples >= 0,
           f"grpo.eval_interval and grpo.eval_samples must be >= 0, got {g.eval_interval}, {g.eval_samples}")
    _check(not g.eval_interval or bool(g.eval_prefix),
           "grpo.eval_interval > 0 needs grpo.eval_prefix (preprocessed held-out RL prompts)")
    for task, over in g.reward_overrides.items():
        _check(isinstance(over, dict), f"grpo.reward_overrides.{task} must be a mapping, got {over!r}")
    try:  # the reward module owns its own field checks; surface them as config errors here
        from m2mega.rewards import RewardConfig
    except ImportError:
        RewardConfig = None
    bad = sorted(set(g.eval_reward) - set(REWARD_SWITCHES))
    _check(not bad, f"grpo.eval_reward: unknown key(s) {bad}; reward switches: {', '.join(REWARD_SWITCHES)}")
    if RewardConfig is not None:
        checks = (("grpo reward settings", g.reward_config_dict), ("grpo.eval_reward", g.eval_reward_config_dict))
        for key, rc in checks:
            try:
                RewardConfig.from_dict(rc())
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
    from .families import get_model_family  # the family registry imports model code only when asked

    try:
        family = get_model_family(m.family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if family.validate is not None:
        family.validate(cfg)  # the family's real shape against TP/PP/sequence length
    if world_size is not None:
        mp = p.tp * p.pp
        _check(world_size % mp == 0, f"world size {world_size} is not divisible by tp x pp = {p.tp} x {p.pp}")
        dp = world_size // mp
        _check(s.global_batch_size % (s.micro_batch_size * dp) == 0,
               f"schedule.global_batch_size {s.global_batch_size} is not divisible by micro_batch_size "
               f"{s.micro_batch_size} x data-parallel size {dp}")
        _check(cfg.mode != "grpo" or g.prompts_per_step % dp == 0,
               f"grpo.prompts_per_step {g.prompts_per_step} is not divisible by data-parallel size {dp}")


def num_microbatches(cfg: TrainConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    s = cfg.schedule
    return s.global_batch_size // (s.micro_batch_size * dp_size)


# ----------------------------------------------------------------------------------------- --print-config


def _field_help(cls: type) -> dict[str, str]:
    """Each field's comment in the dataclass source (the comment lines above it and the one after it):
    the code's comments are the one place the keys are documented, so --print-config reads them there."""
    import inspect

    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier() and not text.startswith(("def ", "@", '"""')):
            after = text.split("  # ", 1)[1].strip() if "  # " in text else ""
            out[name] = " ".join(p for p in (*above, after) if p)
        above = []
    return out


def describe_config(cls: type = None, prefix: str = "") -> str:
    """Every key as ``section.key: default  # help``, sections in order (``--print-config``)."""
    cls = cls or TrainConfig
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            lines.append(f"\n# {prefix}{f.name}")
            lines.append(describe_config(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = helps.get(f.name, "")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{prefix}{f.name}: {shown}  ({_type_name(tp)})" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)


def add_print_config_flag(parser) -> None:
    """``--print-config``: print every key with its default, type and meaning, then exit (no heavy imports)."""
    import argparse

    class _Print(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(describe_config().lstrip("\n"))
            parser.exit()

    parser.add_argument("--print-config", action=_Print, nargs=0, default=argparse.SUPPRESS,
                        help="print every config key (section.key: default (type)  # meaning) and exit")
