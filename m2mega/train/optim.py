"""Model wrapping, optimizer and LR schedule: megatron-core's own DDP, optimizer and scheduler.

``setup_model_and_optimizer(cfg, chunks)`` turns the model chunks a provider built into:

* (bf16) ``Float16Module`` -> megatron ``DistributedDataParallel`` (fp32 grad buffers, bucketed
  all-reduce or, with the distributed optimizer, reduce-scatter),
* ``get_megatron_optimizer`` (AdamW or SGD; ``DistributedOptimizer`` shards fp32 master weights and
  optimizer state across data-parallel ranks when ``parallel.use_distributed_optimizer``), global-norm
  gradient clipping (``optimizer.clip_grad``), no weight decay on biases and 1-D parameters,
* ``OptimizerParamScheduler``: linear warmup from ``lr_warmup_init`` then cosine/linear/constant decay to
  ``min_lr``.

Precision: ``optimizer.precision="auto"`` is bf16 on CUDA and fp32 on CPU. In bf16 the model computes in
bf16 while master weights, gradients (``grad_reduce_in_fp32``) and Adam state are fp32.

Which combinations run on CPU/gloo under :mod:`m2mega.runtime` is recorded in ``docs/training.md``:
megatron-core 0.16.1 checks ``param.type() == 'torch.cuda.FloatTensor'`` in its optimizers and in
``clip_grad_by_total_norm_fp32``; :mod:`m2mega.runtime.cpu` reports CPU tensors as ``torch.cuda.*`` types
for those checks.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from .config import TrainConfig

__all__ = [
    "resolve_dtype",
    "freeze_parameters",
    "wrap_model",
    "build_optimizer",
    "build_scheduler",
    "setup_model_and_optimizer",
    "grads_are_finite",
    "training_transformer_overrides",
]

log = logging.getLogger(__name__)


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    """Compute dtype of the model: bf16 on GPU, fp32 on CPU unless ``optimizer.precision`` says otherwise."""
    prec = cfg.optimizer.precision
    if prec == "auto":
        from m2mega.runtime import device

        return torch.bfloat16 if device().type == "cuda" else torch.float32
    return torch.bfloat16 if prec == "bf16" else torch.float32


def freeze_parameters(model_chunks: Sequence[torch.nn.Module], prefixes: Sequence[str]) -> int:
    """Set ``requires_grad=False`` on parameters whose name starts with one of ``prefixes``.

    Must run before :func:`wrap_model`: megatron's DDP allocates grad buffers (and the optimizer state)
    only for parameters that require grad, so frozen ones cost no gradient or optimizer memory.
    Returns the number of frozen elements on this rank.
    """
    frozen = 0
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if any(name.startswith(pre) for pre in prefixes):
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def wrap_model(cfg: TrainConfig, model_chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """Float16Module (bf16) + megatron DDP around each chunk; installs the grad-sync hooks megatron's
    schedules call (no_sync, finalize_model_grads, grad/param sync for overlap)."""

    p = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # Non-finite gradients are detected by the loop and the step is skipped (grads_are_finite);
        # megatron's own check raises instead, which would kill a long run over one bad batch.
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        config = chunk.config
        if config.bf16 or config.fp16:
            # Float16Module casts the whole module (also norms that megatron creates in fp32) so that
            # every parameter the optimizer sees is 16-bit: mixed groups break its state-dict mapping.
            chunk = Float16Module(config, chunk)
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first virtual-pipeline chunk overlaps its grad reduce with backward.
                disable_bucketing=i > 0,
            )
        )
    config = wrapped[0].config
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if p.overlap_grad_reduce:
        config.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    if p.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in wrapped]
        if len(wrapped) == 1:
            config.param_sync_func = config.param_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(cfg: TrainConfig, ddp_chunks: Sequence[torch.nn.Module]):
    """megatron-core optimizer for the DDP-wrapped chunks (see module docstring)."""
    o, c = cfg.optimizer, cfg.checkpoint
    if (
        cfg.parallel.use_distributed_optimizer
        and c.optimizer_format == "fully_reshardable"
        and USING_PYTORCH_OPTIMIZER
    ):
        raise RuntimeError(
            "checkpoint.optimizer_format='fully_reshardable' with the distributed optimizer needs "
            "Transformer Engine or apex FusedAdam: megatron-core 0.16.1 cannot load that format with the "
            "torch AdamW fallback (per-parameter 'step' state). Use 'dp_reshardable'."
        )
    dtype = resolve_dtype(cfg)
    ocfg = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(ocfg, list(ddp_chunks))
    # megatron's schedules scale the loss before backward through this hook (1.0 in bf16/fp32).
    ddp_chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: TrainConfig, optimizer):
    """Warmup + cosine/linear/constant LR schedule (megatron's OptimizerParamScheduler), per iteration."""
    s, o = cfg.schedule, cfg.optimizer
    decay = s.lr_decay_iters if s.lr_decay_iters is not None else s.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr_warmup_init,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        # A resumed run follows the schedule it was started with; a changed schedule in the config is an
        # error (see checkpoint.load_checkpoint) rather than a silent jump in the LR curve, unless
        # checkpoint.override_scheduler adopts the config's schedule.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=cfg.checkpoint.override_scheduler,
    )


def setup_model_and_optimizer(cfg: TrainConfig, model_chunks: Sequence[torch.nn.Module]):
    """Freeze (optional) -> wrap -> optimizer -> scheduler. Returns ``(ddp_chunks, optimizer, scheduler)``."""
    if cfg.model.freeze_vision:
        frozen = freeze_parameters(model_chunks, [cfg.model.vision_prefix])
        has_vision = any(
            n.startswith(cfg.model.vision_prefix) for c in model_chunks for n, _ in c.named_parameters()
        )
        # Only the first pipeline stage holds the vision tower; elsewhere there is nothing to freeze.
        first_stage = _is_first_stage()
        if first_stage and not has_vision:
            raise ValueError(
                f"model.freeze_vision is set but no parameter name starts with model.vision_prefix "
                f"'{cfg.model.vision_prefix}' on the first pipeline stage (model.family='{cfg.model.family}')"
            )
        log.info("froze %d vision parameters (prefix %s)", frozen, cfg.model.vision_prefix)
    ddp_chunks = wrap_model(cfg, model_chunks)
    optimizer = build_optimizer(cfg, ddp_chunks)
    scheduler = build_scheduler(cfg, optimizer)
    return ddp_chunks, optimizer, scheduler


def _is_first_stage() -> bool:
    return ps.is_pipeline_first_stage(ignore_virtual=True)


@torch.no_grad()
def grads_are_finite(ddp_chunks: Sequence[torch.nn.Module], group=None) -> bool:
    """True when every gradient on every rank is finite (one scalar all-reduce).

    Reads the DDP grad buffers after the reduce (each rank's buffer holds its reduced shard plus its own
    local grads, so a non-finite value anywhere reaches at least one rank's check) and takes the MIN over
    ``group`` (default: the whole world, so all pipeline stages and TP ranks agree to skip together).
    """
    bufs = [b.grad_data for c in ddp_chunks for b in list(c.buffers) + list(getattr(c, "expert_parallel_buffers", []))]
    device = bufs[0].device if bufs else _grad_device(ddp_chunks)
    # One fused reduction per buffer and a single host sync for the whole check.
    finite = torch.stack([torch.isfinite(g).all() for g in bufs]).all() if bufs else torch.tensor(True)
    flag = finite.to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0)


def _grad_device(ddp_chunks) -> torch.device:
    for chunk in ddp_chunks:
        for buf in chunk.buffers:
            return buf.grad_data.device
    from m2mega.runtime import device

    return device()


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
