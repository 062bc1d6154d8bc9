"""Sampled responses of a checkpoint on a JSONL of RL rows, written for ``tools/score_difficulty.py``
(the "--checkpoint" path of difficulty scoring)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch.distributed as dist
from megatron.core import parallel_state as ps

import m2mega.runtime as rt
from m2mega.data.dataset_meta import dataset_tokenizer_path
from m2mega.data.preprocess import PreprocessConfig, preprocess
from m2mega.rl.prompts import prefix_prompts, stop_token_ids
from m2mega.rl.rollout import generate_rollouts

from . import vlm
from .checkpoint import find_latest
from .config import load_config
from .families import load_policy

__all__ = ["write_rollouts"]


def write_rollouts(*, checkpoint: str, input_path: str, output_path: str, num_rollouts: int,
                   batch_prompts: int = 16) -> int:
    """Sample ``num_rollouts`` responses per RL row of ``input_path`` (JSONL) with a training checkpoint and
    write ``{"id", "responses"}`` lines to ``output_path`` (what ``tools/score_difficulty.py`` scores).

    The model, sampling settings and preprocessing (tokenizer, system prompt, pixel bounds) are the
    checkpoint's own (its ``config.yaml`` and its training data's ``meta.json``). Runs in this process at
    TP1 (or under torchrun: TP = world size). Rows the preprocessor rejects get no line (score_difficulty
    reports them as missing) and are listed in ``output_path + ".rejects.jsonl"``. Returns rows written."""
    ckpt = checkpoint
    if not os.path.isfile(os.path.join(ckpt, "config.yaml")):
        found = find_latest(checkpoint)
        if found is None:
            raise FileNotFoundError(f"{checkpoint}: no complete checkpoint with a config.yaml")
        ckpt = found[1]
    cfg = load_config(os.path.join(ckpt, "config.yaml"))
    meta_path = (cfg.data.train_prefix or "") + ".meta.json"
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    pc = meta["config"]
    tok_path = dataset_tokenizer_path(cfg.data.train_prefix, meta, cfg.data.tokenizer)
    pre = PreprocessConfig.like(pc, tokenizer_type=meta["tokenizer_type"], tokenizer_model=tok_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not ps.model_parallel_is_initialized():
        rt.init(world, 1, seed=cfg.seed)
    # The checkpoint may come from a TP>1 run with sequence parallelism, which megatron refuses at TP1.
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tp=world, pp=1, sequence_parallel=cfg.parallel.sequence_parallel and world > 1))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "prompts")
        if dist.get_rank() == 0:
            preprocess([input_path], prefix, pre, reject_file=output_path + ".rejects.jsonl")
        dist.barrier()
        model = load_policy(cfg, ckpt)
        tok = vlm.tokenizer_from_prefix(cfg.data.train_prefix, cfg.data.tokenizer)
        prompts = prefix_prompts(prefix)
        g = cfg.grpo
        n = 0
        out = open(output_path, "w", encoding="utf-8") if dist.get_rank() == 0 else None
        try:
            for start in range(0, len(prompts), batch_prompts):
                chunk = prompts[start : start + batch_prompts]
                r = generate_rollouts(model, chunk, group_size=num_rollouts, max_new_tokens=g.max_new_tokens,
                                      temperature=g.temperature, top_p=g.top_p,
                                      eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_id,
                                      seed=cfg.seed + start)
                for k, p in enumerate(chunk):
                    texts = [tok.decode(r.response_tokens[k * num_rollouts + j].tolist(), skip_special_tokens=True)
                             for j in range(num_rollouts)]
                    if out is not None:
                        out.write(json.dumps({"id": p.info.id, "responses": texts}, ensure_ascii=False) + "\n")
                    n += 1
        finally:
            if out is not None:
                out.close()
    return n
