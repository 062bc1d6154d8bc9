"""The sections of m2mega's training configuration: one dataclass per YAML section, each field's comment
its documentation (``--print-config`` reads them). Loading, flags and cross-field checks live in
:mod:`m2mega.train.config`, which re-exports these names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = [
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
]


@dataclass
class GPTShapeConfig:
    """Shape of the ``gpt`` family: a Qwen2.5-shaped megatron-core GPTModel that tests use as a small,
    vision-free stand-in. Qwen2.5-VL takes its shape from ``model.preset`` / ``model.init_from`` instead."""

    num_layers: int = 4  # transformer layers
    hidden_size: int = 48  # model width
    num_attention_heads: int = 6  # query heads
    num_query_groups: int = 2  # key/value heads (GQA)
    ffn_hidden_size: int = 88  # SwiGLU inner width
    vocab_size: int = 130  # vocabulary (random-token data uses all of it)
    max_position_embeddings: int = 256  # longest sequence
    rotary_base: float = 1_000_000.0  # RoPE theta
    untie_embeddings: bool = True  # separate input and output embeddings, as Qwen2.5-7B


@dataclass
class ModelConfig:
    # "qwen25vl": Qwen2.5-VL (m2mega.models); "gpt": the vision-free GPTModel stand-in of the tests.
    family: str = "qwen25vl"
    # qwen25vl architecture: a preset (tiny, 3b, 7b, 32b, 72b), an HF config.json or a directory holding
    # one. Unset: the config.json of model.init_from (checkpoints m2mega writes carry theirs).
    preset: Optional[str] = None
    init_from: Optional[str] = None  # a checkpoint (iter dir or save root) whose weights initialise the run
    hidden_dropout: float = 0.0  # dropout after attention and MLP (Qwen2.5 trains without)
    attention_dropout: float = 0.0  # dropout on attention probabilities
    # Activation recompute: "selective" recomputes core attention only, "full" whole layers.
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1  # layers per recompute chunk ("full", method "uniform")
    freeze_vision: bool = False  # parameters under vision_prefix get no gradient and no optimizer state
    vision_prefix: str = "vision_model."  # parameter-name prefix of the vision tower (freeze_vision)
    gpt: GPTShapeConfig = field(default_factory=GPTShapeConfig)  # family "gpt" only


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (data-parallel = world / (tp x pp))
    sequence_parallel: bool = False  # needs tp > 1
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap the gradient all-reduce with backward
    overlap_param_gather: bool = False  # needs the distributed optimizer
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo without
    timeout_s: float = 1800.0  # process-group timeout (seconds)
@dataclass
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"  # adam = AdamW (decoupled weight decay)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5  # learning rate at the end of the decay
    lr_warmup_init: float = 0.0  # learning rate at step 0 of the warmup
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam epsilon
    sgd_momentum: float = 0.9  # SGD momentum (optimizer: sgd)
    clip_grad: float = 1.0  # global L2 norm; 0 disables clipping
    # This many steps in a row with non-finite gradients (each skipped) stop the run with an error: it has
    # diverged, and further steps would only save checkpoints of a broken model. 0: never stop.
    max_skipped_steps: int = 10
    # "auto": bf16 on GPU, fp32 on CPU. Master weights and grads stay fp32 either way.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class ScheduleConfig:
    train_iters: int = 100  # optimizer steps (GRPO: rollout steps x updates_per_rollout)
    micro_batch_size: int = 1  # rows per micro-batch (a THD-packed micro-batch is one row)
    global_batch_size: int = 1  # micro_batch_size x data-parallel size x micro-batches per step
    seq_length: int = 64  # tokens per packed row (THD) / longest prompt + response
    lr_warmup_iters: int = 0  # linear warmup steps
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup, to optimizer.min_lr
@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None  # checkpoint root (iter_XXXXXXX dirs and 'latest'); unset: no checkpoints
    save_interval: int = 0  # iterations between saves; 0: only at the end (when save_at_end)
    save_at_end: bool = True  # save after the last step
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted after a save); 0 keeps all
    load_dir: Optional[str] = None  # resume from here; None: from save_dir
    resume: bool = True  # continue from the newest complete checkpoint if there is one
    load_optimizer: bool = True  # restore optimizer state on resume
    load_rng: bool = True  # restore RNG state on resume (same layout only)
    # A resumed run must keep the LR schedule it was saved with (changed lr/warmup/decay is an error)
    # unless this is set: then the config's schedule replaces the checkpoint's at the saved step count.
    override_scheduler: bool = False
    # Distributed-optimizer state layout: "dp_reshardable" (any DP size; same TP/PP) or
    # "fully_reshardable" (any layout; needs TE/apex FusedAdam in megatron-core 0.16.1).
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    save_threads: int = 2  # writer processes per rank
    # At the end of training, also write the last checkpoint as an HF model directory
    # (save_dir/hf_iter_XXXXXXX: safetensors + config, tokenizer, image processor), as mcore-to-hf does.
    save_hf: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 1  # steps between log lines
    tensorboard_dir: Optional[str] = None  # TensorBoard event files; unset: no TensorBoard
    # Weights & Biases beside/instead of TensorBoard (rank 0; same scalars; needs `pip install wandb`):
    # the project turns it on; run name defaults to run_name; mode online/offline/disabled, unset: WANDB_MODE.
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None  # W&B run name (default: run_name)
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None  # W&B mode (default: WANDB_MODE or online)
    progress: Literal["tqdm", "rich", "plain", "none"] = "tqdm"  # progress display on rank 0
    # Peak dense FLOP/s of one device in TFLOP/s for the MFU estimate (H100 SXM bf16: 989);
    # None: 989 on CUDA, no MFU on CPU.
    peak_tflops: Optional[float] = None


@dataclass
class DataConfig:
    # packed: PREFIX.bin/.idx from tools/preprocess_data.py; synthetic: random token batches (gpt family only)
    source: Literal["packed", "synthetic"] = "packed"
    train_prefix: Optional[str] = None  # PREFIX of PREFIX.bin / PREFIX.idx from tools/preprocess_data.py
    valid_prefix: Optional[str] = None  # preprocessed validation data (sft.eval_interval)
    # The tokenizer (HF directory or SentencePiece model) when it is no longer where preprocessing found it;
    # unset: the one recorded in PREFIX.meta.json. Checked against the ids the data was tokenized with.
    tokenizer: Optional[str] = None
    # Paper switch: "curriculum" keeps the preprocessed ascending-difficulty order, "shuffle" reshuffles
    # every epoch, "bucket_shuffle" shuffles inside difficulty buckets (easy buckets first).
    order: Literal["curriculum", "shuffle", "bucket_shuffle"] = "curriculum"
    num_buckets: int = 10  # difficulty buckets (order: bucket_shuffle)
    num_workers: int = 0  # loader worker processes
    seed: int = 1234  # data order seed (shuffle orders)
@dataclass
class SFTConfig:
    eval_interval: int = 0  # iterations between validation passes; 0: none
    eval_iters: int = 1  # global batches per validation pass


# The GRPOConfig fields that define the reward (reward_config_dict), which grpo.eval_reward may override.
REWARD_SWITCHES = ("numeric_reward", "ednm_lambda", "ednm_gamma", "format_weight", "repetition_penalty",
                   "repetition_weight", "reward_overrides", "custom_reward_function")


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8  # global: prompts per optimizer step (each with group_size rollouts)
    group_size: int = 8  # G
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling
    max_new_tokens: int = 1024  # paper: completion length limit 1024
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # upper clip (clip-higher: > clip_low)
    # KL to the frozen ref_policy (k3 estimator): "cosine" anneals beta_max -> beta_min (paper Eq. 7),
    # "constant" uses beta.
    kl_schedule: Literal["cosine", "constant"] = "cosine"
    beta: float = 0.001  # KL weight (kl_schedule: constant)
    beta_min: float = 0.0  # KL weight at the end (cosine, Eq. 7)
    beta_max: float = 0.001  # KL weight at the start (cosine, Eq. 7)
    # Advantage weighting: "dynamic" w = sigma * acc * (1 - acc) per prompt group (paper Eq. 6).
    advantage_weighting: Literal["dynamic", "static"] = "dynamic"
    sigma: float = 4.0  # 4.0 makes the peak weight (acc = 0.5) exactly 1
    adv_eps: float = 1e-6  # added to the group std of rewards
    drop_zero_variance: bool = True  # groups whose rollouts all score the same carry no signal
    # Dynamic sampling (DAPO): while fewer than prompts_per_step groups are informative, roll out more
    # prompts (up to max_refill_rounds extra rounds); needs drop_zero_variance.
    dynamic_sampling: bool = False
    max_refill_rounds: int = 2  # extra rollout rounds per step (dynamic_sampling)
    dual_clip: Optional[float] = None  # dual-clip bound c > 1 for negative advantages; None: off
    # Spatial numeric answers: "ednm" smooth reward R = gamma * exp(-lambda * rel. error) (paper Eq. 9)
    # or "binary" exact match.
    numeric_reward: Literal["ednm", "binary"] = "ednm"
    ednm_lambda: float = 2.0  # EDNM decay (numeric_reward: ednm)
    ednm_gamma: float = 1.0  # EDNM scale
    format_weight: float = 0.1  # weight of the <think>/<answer> format reward
    repetition_penalty: bool = False  # n-gram repetition penalty (the paper's failure mode)
    repetition_weight: float = 0.5  # weight of the repetition penalty
    reward_overrides: dict = field(default_factory=dict)  # {task: {TaskRewardConfig field: value}}
    custom_reward_function: Optional[str] = None  # "path/to/file.py:fn" (verl convention), all tasks
    updates_per_rollout: int = 1  # optimizer steps on each batch of rollouts
    # pi_old of the ratio: "recompute" (the training forward's log-probs: the policy's own, detached, with one
    # update per rollout step; a forward-only pass before the first of several) or "rollout" (the sampler's
    # log-probs: no extra pass, and the ratio also corrects for train/rollout numerical mismatch).
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    rollout_batch: int = 256  # rollout engine: sequences decoded together (KV-cache slots)
    rollout_kv_tokens: int = 0  # rollout engine: KV-cache tokens it may hold (0: half the free GPU memory)
    # A step whose groups all scored uniformly makes no update (warned, counted); this many such steps in a
    # row stop the run with an error (the data is too easy/hard for the policy, or the reward is broken). 0: never.
    max_no_signal_steps: int = 20
    # Held-out validation curve: every eval_interval rollout steps (0: off) score eval_prefix's prompts
    # (preprocessed RL rows) greedily, plus eval_samples sampled answers per prompt (mean@k / pass@k; 0: none).
    eval_prefix: Optional[str] = None
    eval_interval: int = 0  # rollout steps between held-out validations (0: off)
    eval_samples: int = 0  # sampled answers per held-out prompt (mean@k / pass@k)
    # Held-out scoring (the curve above, grpo --eval-prefix, m2mega.eval.run) with these reward switches in
    # place of the training reward's, e.g. {ednm_lambda: 2.0}: runs trained on different rewards are then
    # compared on one (tools/ablate.py sets the baseline's). Empty: score with the training reward.
    eval_reward: dict = field(default_factory=dict)
    def uses_kl(self) -> bool:
        """Whether the KL term is ever non-zero (then the frozen ref_policy is needed)."""
        return (self.beta_max if self.kl_schedule == "cosine" else self.beta) > 0

    def reward_config_dict(self) -> dict:
        """The ``m2mega.rewards.RewardConfig.from_dict`` input these switches describe."""
        out: dict = {
            "default": {
                "format_weight": self.format_weight,
                "repetition_penalty": self.repetition_penalty,
                "repetition_weight": self.repetition_weight,
                **({"custom_function": self.custom_reward_function} if self.custom_reward_function else {}),
            },
            "spatial": {
                "numeric": self.numeric_reward,
                "ednm_lambda": self.ednm_lambda,
                "ednm_gamma": self.ednm_gamma,
            },
        }
        for task, over in self.reward_overrides.items():
            out.setdefault(task, {}).update(over)
        return out

    def eval_reward_config_dict(self) -> dict:
        """:meth:`reward_config_dict` of held-out scoring: the training switches with ``eval_reward``'s."""
        if not self.eval_reward:
            return self.reward_config_dict()
        return dataclasses.replace(self, **self.eval_reward, eval_reward={}).reward_config_dict()


@dataclass
class KernelsConfig:
    """The fused Triton kernels (GRPO log-probs and loss): ``m2mega.kernels.KernelConfig``, set by the Trainer."""

    use_torch: bool = False  # run their plain-torch counterparts (debugging; materialises T x V logits)
    check_inputs: bool = True  # validate target ids against the vocabulary (one device->host sync per call)
    bwd_slab_bytes: int = 256 * 2**20  # memory budget of the log-prob backward's recomputed logits slab


@dataclass
class TrainConfig:
    run_name: str = "m2mega"  # a name for logs (TensorBoard / W&B run)
    mode: Literal["sft", "grpo"] = "sft"  # which entry point this config is for
    seed: int = 1234  # weights init, dropout and sampling seed
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
