"""Self-describing checkpoints: the HF files that make a megatron checkpoint exportable and loadable alone.

Every Qwen2.5-VL checkpoint m2mega writes (training saves, conversions) holds, beside the megatron files,
the HF ``config.json`` of the architecture it holds, the tokenizer files the data was tokenized with and a
``preprocessor_config.json`` with the pixel bounds preprocessing used. ``mcore-to-hf`` then needs nothing
but the checkpoint directory, a later stage can take its architecture from ``model.init_from`` alone, and
a moved checkpoint still describes itself (copies, not references).

Sources, in order of truth: the architecture's own ``config.json`` when the run took its shape from one
(``model.preset`` / ``model.init_from``; copied verbatim, so HF-only fields survive), else the preset's
config written by :meth:`Qwen25VLConfig.to_hf_dict`; the dataset's tokenizer (checked against the data's
ids when it was resolved); the image-processor config of the checkpoint the run started from, else one
built from the dataset's pixel bounds.
"""

from __future__ import annotations

import json
import os

from m2mega.convert.hf_io import copy_sidecar_files, image_processor_config

from .config import TrainConfig

__all__ = ["write_hf_files", "export_final_hf"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")


def _dtype_name(cfg: TrainConfig) -> str:
    from .optim import resolve_dtype

    return str(resolve_dtype(cfg)).replace("torch.", "")


def write_hf_files(cfg: TrainConfig, out_dir: str) -> list[str]:
    """Write the HF sidecar files of ``cfg``'s model into ``out_dir`` (rank 0, before the checkpoint is
    published). Families other than qwen25vl have no HF form: nothing is written."""
    if cfg.model.family != "qwen25vl":
        return []
    from . import vlm

    written: list[str] = []
    src = vlm.arch_source(cfg)
    if src.endswith(".json") or os.path.isdir(src):
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        written += copy_sidecar_files(src_dir, out_dir)  # config.json, generation/preprocessor configs, tokenizer
    if "config.json" not in written:
        hf = vlm.arch_from_config(cfg).to_hf_dict()
        hf["torch_dtype"] = _dtype_name(cfg)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
        written.append("config.json")
    meta: dict = {}
    if cfg.data.train_prefix:
        from m2mega.data.dataset_meta import dataset_tokenizer_path, read_dataset_meta

        meta = read_dataset_meta(cfg.data.train_prefix)
        tok = dataset_tokenizer_path(cfg.data.train_prefix, meta, cfg.data.tokenizer)
        if os.path.isdir(tok):  # the data's tokenizer is the one the weights were trained with
            written += copy_sidecar_files(tok, out_dir, only=_TOKENIZER_FILES)
    if meta.get("config"):  # the pixel bounds the model was trained with, over those it started from
        pc = meta["config"]
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(image_processor_config(pc["min_pixels"], pc["max_pixels"]), f, indent=2)
        written.append("preprocessor_config.json")
    return sorted(set(written))


def export_final_hf(cfg: TrainConfig, checkpoint: str | None) -> str | None:
    """``checkpoint.save_hf``: rank 0 exports the run's last checkpoint to ``save_dir/hf_<iter dir>`` once the
    training job's process groups are shut down (the export rebuilds the model at TP1 in a fresh process).
    Returns the HF directory (None on other ranks, or when nothing was saved)."""
    if not cfg.checkpoint.save_hf or not checkpoint or cfg.model.family != "qwen25vl":
        return None
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    import subprocess
    import sys

    out = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "hf_" + os.path.basename(checkpoint))
    if os.path.isdir(out):  # a re-run that ended at the same iteration replaces its export
        import shutil

        shutil.rmtree(out)
    # A fresh process: the export builds a one-rank TP1 runtime of its own, which must not inherit this
    # job's torchrun rendezvous (RANK, WORLD_SIZE, MASTER_*, TORCHELASTIC_*) or its torch.distributed state.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
    code = ("import json, sys; from m2mega.convert import convert_mcore_to_hf; "
            "r = convert_mcore_to_hf(sys.argv[1], sys.argv[2]); print(json.dumps({'tensors': r['tensors'], "
            "'dtype': r['dtype']}))")
    proc = subprocess.run([sys.executable, "-c", code, checkpoint, out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint.save_hf: exporting {checkpoint} to {out} failed:\n{proc.stderr[-2000:]}")
    print(f"HF export: {out} {proc.stdout.strip().splitlines()[-1]}", flush=True)
    return out
