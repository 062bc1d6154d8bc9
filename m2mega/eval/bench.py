"""Score a checkpoint on one of the paper's eight benchmarks, as the benchmark's authors score it:

    torchrun --nproc-per-node=N -m m2mega.eval.bench --benchmark mathvista --data annot_testmini.json \
        --checkpoint CKPT [--model-config grpo.yaml] [--out gens.jsonl] [--max-new-tokens K] [--limit K]

The model (family, preset, TP/PP) comes from ``--model-config`` (a training YAML; default: the
checkpoint's own ``config.yaml``) and the prompt format (tokenizer, system prompt, pixel bounds) from the
preprocessing metadata of that config's ``data.train_prefix``: the policy sees benchmark prompts exactly
as it saw training prompts. Greedy decoding; ranks beyond TP x PP are data-parallel replicas that split
the samples. Rank 0 prints the headline number and its sub-scores and writes every generation with its
score to ``--out`` (JSONL). Benchmarks and file formats: docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["generate_responses", "main", "load_judge"]

_NAMES = ("mathvista", "mathvision", "mathverse", "dynamath", "wemath", "logicvista", "cvbench", "vsibench")


def load_judge(spec: str) -> Callable[[str, str, str], bool]:
    """``module.path:function`` or ``path/to/file.py:function`` -> the function."""
    import importlib
    import importlib.util

    mod_name, sep, fn = spec.rpartition(":")
    if not sep or not mod_name or not fn:
        raise ValueError(f"--judge {spec!r}: expected module:function or file.py:function")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"--judge {spec!r}: no file {mod_name}")
        s = importlib.util.spec_from_file_location("m2mega_bench_judge", mod_name)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    if not callable(getattr(mod, fn, None)):
        raise ValueError(f"--judge {spec!r}: {mod_name} has no function {fn!r}")
    return getattr(mod, fn)


def _resolve_model(checkpoint: str, model_config: Optional[str], overrides: Sequence[str]):
    """(training config, weights path or None for the seeded random init)."""
    from m2mega.train.checkpoint import find_latest
    from m2mega.train.config import load_config

    ckpt = None if checkpoint == "none" else checkpoint
    if model_config is not None:
        return load_config(model_config, overrides), ckpt
    if ckpt is None:
        raise ValueError("--checkpoint none (random init) needs --model-config")
    if not os.path.isfile(os.path.join(ckpt, "config.yaml")):
        found = find_latest(ckpt)
        if found is None or not os.path.isfile(os.path.join(found[1], "config.yaml")):
            raise FileNotFoundError(f"{checkpoint}: no checkpoint with a config.yaml (or pass --model-config)")
        ckpt = found[1]
    return load_config(os.path.join(ckpt, "config.yaml"), overrides), ckpt


def _preprocess_config(cfg):
    """The training data's preprocessing settings, so benchmark prompts match training prompts."""
    from m2mega.data.dataset_meta import dataset_tokenizer_path, read_dataset_meta
    from m2mega.data.preprocess import PreprocessConfig

    if not cfg.data.train_prefix:
        raise ValueError("the model config sets no data.train_prefix: its PREFIX.meta.json gives the tokenizer, "
                         "system prompt and pixel bounds the benchmark prompts are preprocessed with")
    meta = read_dataset_meta(cfg.data.train_prefix)
    pc = meta["config"]
    tok_path = dataset_tokenizer_path(cfg.data.train_prefix, meta, cfg.data.tokenizer)
    return PreprocessConfig.like(pc, tokenizer_type=meta["tokenizer_type"], tokenizer_model=tok_path)


def _write_rows(items, work: str) -> str:
    """The items as m2mega RL rows (JSONL), image bytes written to files, a video item's video part before
    its images; returns the JSONL path."""
    os.makedirs(os.path.join(work, "img"), exist_ok=True)
    path = os.path.join(work, "prompts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            content = [{"type": "video", **it.video}] if it.video else []
            for k, img in enumerate(it.images):
                if isinstance(img, bytes):
                    p = os.path.join(work, "img", f"{i}_{k}" + (".png" if img[:4] == b"\x89PNG" else ".jpg"))
                    with open(p, "wb") as g:
                        g.write(img)
                    img = p
                content.append({"type": "image", "image": os.path.abspath(img)})
            content.append({"type": "text", "text": it.text})
            # the reward fields are placeholders: the benchmark's own scorer grades the responses
            f.write(json.dumps({"id": str(i), "messages": [{"role": "user", "content": content}], "answer": "n/a",
                                "task": "benchmark", "answer_type": "text"}, ensure_ascii=False) + "\n")
    return path


def generate_responses(items, cfg, checkpoint: Optional[str], *, work_dir: str, max_new_tokens: int,
                       batch_size: int = 8, progress: bool = True, desc: str = "generate") -> Optional[list]:
    """Greedy responses to ``items`` (collective: call on every rank after ``m2mega.runtime.init``).
    Rank 0 gets ``[(response or None when preprocessing rejected the prompt), ...]`` in item order,
    the other ranks None. Data-parallel replicas each generate a strided shard of the prompts."""
    import shutil
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from m2mega.data.preprocess import preprocess
    from m2mega.rewards import RewardConfig
    from m2mega.train import vlm

    from m2mega.rl.prompts import prefix_prompts, stop_token_ids
    from m2mega.rl.validation import evaluate_prompts
    from m2mega.train.families import load_policy

    rank = dist.get_rank()
    pre = _preprocess_config(cfg)
    box = [tempfile.mkdtemp(prefix="bench.", dir=work_dir) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one folder every rank can read (same filesystem as work_dir)
    work = box[0]
    prefix = os.path.join(work, "prompts")
    if rank == 0:
        preprocess([_write_rows(items, work)], prefix, pre, reject_file=prefix + ".rejects.jsonl")
    dist.barrier()
    model = load_policy(cfg, checkpoint)
    tok = vlm.tokenizer_from_prefix(prefix)
    prompts = prefix_prompts(prefix)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    shard = prompts[dp_rank::dp]
    samples: list = []
    bar = tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress or rank != 0, file=sys.stderr)
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            chunk = shard[start : start + batch_size]
            evaluate_prompts(model, chunk, lambda ids: tok.decode(ids, skip_special_tokens=True), RewardConfig(),
                             eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_id,
                             max_new_tokens=max_new_tokens, batch_size=len(chunk), greedy=True, samples=samples)
            bar.update(min(len(chunk) * dp, bar.total - bar.n))  # the replicas advance in step
    bar.close()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [(s[0], s[2]) for s in samples])
    if rank != 0:
        return None
    shutil.rmtree(work, ignore_errors=True)  # every rank has read the prompts (the gather was collective)
    by_id = {pid: text for part in gathered for pid, text in part}
    return [by_id.get(str(i)) for i in range(len(items))]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2mega.eval.bench", description=__doc__.split("\n")[0],
                                epilog="Any other --section.key=value overrides the model config.")
    p.add_argument("--benchmark", required=True, choices=_NAMES)
    p.add_argument("--data", required=True, help="the benchmark's released file or folder (see docs/eval.md)")
    p.add_argument("--checkpoint", required=True, help="checkpoint or save root ('none': random init, needs --model-config)")
    p.add_argument("--model-config", help="training YAML (default: the checkpoint's config.yaml)")
    p.add_argument("--out", help="per-sample generations + scores, JSONL (default: bench_<benchmark>.jsonl)")
    p.add_argument("--summary-json", help="also write the aggregate scores here")
    p.add_argument("--max-new-tokens", type=int, help="default: the config's grpo.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch per replica")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: the config's)")
    p.add_argument("--pp", type=int, help="pipeline parallel size (default: the config's)")
    p.add_argument("--limit", type=int, help="only the first K samples (a smoke run; scores are not official)")
    p.add_argument("--frames-dir", help="VSI-Bench: extracted video frames, FRAMES/<dataset>/<scene_name>/*.jpg")
    p.add_argument("--video-dir", help="VSI-Bench: the release's videos, VIDEOS/<dataset>/<scene_name>.mp4, fed as "
                   "videos (2 fps, at most --num-frames frames)")
    p.add_argument("--num-frames", type=int, default=32, help="VSI-Bench: frames sampled per video")
    p.add_argument("--prompt-field", default="query_wo", help="MathVerse: which prompt field to use")
    p.add_argument("--judge", help="MathVerse: module:function or file.py:function, judge(question, answer, response) -> bool")
    p.add_argument("--no-progress", action="store_true")
    args, overrides = p.parse_known_args(argv)
    if args.judge and args.benchmark != "mathverse":
        p.error("--judge applies to --benchmark mathverse only")

    from m2mega.runtime.cli import report

    from .benchmarks import get, mathverse, score_all

    spec = get(args.benchmark)
    try:  # inputs first: a bad file or flag fails in seconds, before process groups and the model
        items = spec.load(args.data, frames_dir=args.frames_dir, video_dir=args.video_dir, num_frames=args.num_frames,
                          prompt=args.prompt_field)
        scorer = mathverse.make_score(load_judge(args.judge)) if args.judge else None
        cfg, ckpt = _resolve_model(args.checkpoint, args.model_config, overrides)
        _preprocess_config(cfg)
    except (ValueError, FileNotFoundError) as e:  # BenchDataError and ConfigError are ValueErrors
        return report(str(e))

    import dataclasses

    import torch.distributed as dist

    import m2mega.runtime as rt
    if args.limit:
        items = items[: args.limit]
    par = dataclasses.replace(cfg.parallel, tp=args.tp or cfg.parallel.tp, pp=args.pp or cfg.parallel.pp)
    cfg = dataclasses.replace(cfg, parallel=par)
    out = args.out or f"bench_{spec.name}.jsonl"
    rt.init_from_config(cfg)
    try:
        responses = generate_responses(
            items, cfg, ckpt, work_dir=os.path.dirname(os.path.abspath(out)),
            max_new_tokens=args.max_new_tokens or cfg.grpo.max_new_tokens, batch_size=args.batch_size,
            progress=not args.no_progress, desc=spec.name)
        if dist.get_rank() == 0:
            rejected = sum(r is None for r in responses)
            if spec.name in ("mathvision", "mathverse"):  # free-form answers go through math_equal's worker
                from m2mega.rewards.sandbox import warm_up

                warm_up()
            scored, agg = score_all(spec, items, [r or "" for r in responses], score=scorer)
            with open(out, "w", encoding="utf-8") as f:
                for rec, r, it in zip(scored, responses, items):
                    f.write(json.dumps({**rec, "prompt": it.text, "rejected": r is None}, ensure_ascii=False,
                                       default=str) + "\n")
            agg["rejected_prompts"] = rejected
            head = agg[spec.headline]
            print(f"# {spec.name} on {args.data} ({len(items)} samples, checkpoint {ckpt or 'random init'})")
            print(f"{spec.name} {spec.headline}: {head:.4f} (= {100 * head:.1f}%)")
            for k, v in agg.items():
                if k != spec.headline:
                    print(f"  {k}: {_fmt(v)}")
            print(f"generations: {out}", flush=True)
            if rejected:
                print(f"warning: {rejected} prompt(s) rejected by preprocessing (too long / unreadable image) "
                      "were scored as wrong", file=sys.stderr)
            if args.summary_json:
                with open(args.summary_json, "w") as f:
                    json.dump({"benchmark": spec.name, "headline": spec.headline, "data": args.data,
                               "checkpoint": ckpt, "scores": agg}, f, indent=1)
    finally:
        rt.shutdown()
    return 0


if __name__ == "__main__":
    from m2mega.runtime.cli import run_main

    sys.exit(run_main(main))
