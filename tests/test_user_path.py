"""The user's path through the whole stack, with the documented commands only (README "The user path"):

tiny HF Qwen2.5-VL (``save_pretrained``; head dim 10, M-RoPE 2/1/2: sizes no other test uses)
-> ``hf-to-mcore --tp 2`` -> own JSONL with images through ``preprocess_data.py``
-> SFT at TP2 + sequence parallelism (examples/tiny/sft.yaml, architecture from init_from's config.json)
-> difficulty of the RL rows from the SFT model's rollouts (``score_difficulty.py --checkpoint``), curriculum order
-> GRPO at TP2 + SP with at least one optimizer update (examples/tiny/grpo.yaml, a custom reward so that
   groups differ on a barely trained model)
-> ``mcore-to-hf`` pointed at the GRPO *save root* -> transformers ``from_pretrained`` -> greedy generation
   on image prompts, token for token equal to m2mega's own greedy output (``m2mega.eval.run``).

HF's own processor output (``AutoImageProcessor`` + ``AutoTokenizer`` loaded from the exported folder) is
also checked equal to what m2mega preprocessed: the exported folder alone reproduces the pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
    pytest.mark.slow,
    pytest.mark.multirank,
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 10

REWARD = '''
def score(data_source, solution_str, ground_truth, extra_info):
    """A deterministic score of the text that differs between sampled answers, so that groups carry a
    gradient on a barely trained model (verl's custom-reward signature)."""
    return (sum(map(ord, solution_str)) % 5) / 4
'''


def _run(args: list[str], cwd: str, log: str, timeout: int = 300) -> str:
    # as a user types it: without the Triton interpreter that tests/conftest.py turns on for the kernel
    # tests (under it the CPU GRPO runs the fused kernels' numpy interpreter instead of their torch path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    with open(log, "w") as f:
        f.write(out)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _torchrun(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", module,
            *args]


def _hf_prompt(system: str, text: str, n_image_tokens: int) -> str:
    # Qwen2.5-VL's chat template for one user turn with one image, as its processor renders it.
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n_image_tokens + f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


def test_hf_model_in_trained_model_out(tmp_path):
    w = tmp_path / "work"
    py = sys.executable
    logs = tmp_path / "logs"
    logs.mkdir()
    # 1. the user's HF model (here: tiny and random) and own data
    _run([py, "tools/make_tiny_hf_model.py", "--out", str(w / "hf"), "--seed", "3"], ROOT, logs / "hf.log")
    _run([py, "tools/convert_checkpoint.py", "hf-to-mcore", "--hf-dir", str(w / "hf"), "--out", str(w / "mcore"),
          "--tp", "2"], ROOT, logs / "convert.log")
    _run([py, "tools/make_synthetic_data.py", "--out", str(w / "data"), "--sft", "24", "--rl", "8", "--eval", "6",
          "--seed", "5", "--reasoning", "brief"], ROOT, logs / "data.log")
    for split in ("sft", "eval"):
        _run([py, "tools/preprocess_data.py", "--input", str(w / f"data/{split}.jsonl"), "--output-prefix",
              str(w / f"prep/{split}"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
              str(w / "hf"), "--seq-length", "1024", "--no-progress"], ROOT, logs / f"prep_{split}.log")
    # 2. SFT then GRPO, TP2 + sequence parallelism, with the shipped tiny configs (paths as flags)
    sft = _run(_torchrun("m2mega.train.sft", "--config", "examples/tiny/sft.yaml",
                         f"--model.init_from={w / 'mcore'}", f"--data.train_prefix={w / 'prep/sft'}",
                         f"--checkpoint.save_dir={w / 'ckpt_sft'}", "--logging.tensorboard_dir=null",
                         "--schedule.train_iters=3", "--schedule.lr_warmup_iters=1", "--schedule.global_batch_size=2",
                         "--grpo.max_new_tokens=12"),  # the sampling length difficulty scoring reads from the checkpoint
               ROOT, logs / "sft.log")
    assert "done: 3 iterations" in sft and "(a converted checkpoint)" in sft  # which init_from was loaded
    # difficulty from the SFT model's own rollouts (in-process TP1 on a TP2 + sequence-parallel checkpoint),
    # then the RL rows in curriculum order
    _run([py, "tools/score_difficulty.py", "--input", str(w / "data/rl.jsonl"), "--checkpoint", str(w / "ckpt_sft"),
          "--num-rollouts", "2", "--keep-trivial", "--output", str(w / "data/rl_scored.jsonl"), "--no-progress"],
         ROOT, logs / "difficulty.log")
    scored = [json.loads(line) for line in open(w / "data/rl_scored.jsonl")]
    assert len(scored) == 8 and all(0.0 <= r["difficulty"] <= 1.0 for r in scored)
    _run([py, "tools/preprocess_data.py", "--input", str(w / "data/rl_scored.jsonl"), "--output-prefix",
          str(w / "prep/rl"), "--order", "curriculum", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
          str(w / "hf"), "--seq-length", "1024", "--no-progress"], ROOT, logs / "prep_rl.log")
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD)
    grpo = _run(_torchrun("m2mega.train.grpo", "--config", "examples/tiny/grpo.yaml",
                          f"--model.init_from={w / 'ckpt_sft'}", f"--data.train_prefix={w / 'prep/rl'}",
                          f"--checkpoint.save_dir={w / 'ckpt_grpo'}", "--logging.tensorboard_dir=null",
                          "--schedule.train_iters=2", "--grpo.prompts_per_step=2", "--grpo.max_new_tokens=12",
                          f"--grpo.custom_reward_function={reward}:score"),
                ROOT, logs / "grpo.log")
    updates = re.search(r"GRPO done: .* (\d+) optimizer updates", grpo)
    assert updates and int(updates.group(1)) >= 1, grpo[-3000:]
    assert "iteration 3" in grpo or "iter_0000003" in grpo  # the SFT iteration GRPO started from is logged
    # 3. the trained model leaves as an HF model: the save root is enough (no hand-copied files)
    export = _run([py, "tools/convert_checkpoint.py", "mcore-to-hf", "--mcore-dir", str(w / "ckpt_grpo"),
                   "--out", str(w / "hf_out")], ROOT, logs / "export.log")
    summary = json.loads(next(line for line in export.splitlines() if line.startswith('{"out"')))
    assert summary["dtype"] == "float32" and "preprocessor_config.json" in summary["sidecar_files"]
    # checkpoint.save_hf (set in examples/tiny/grpo.yaml) wrote the same model at the end of training
    (saved_hf,) = [d for d in os.listdir(w / "ckpt_grpo") if d.startswith("hf_iter_")]
    # 4. m2mega's own greedy answers on the held-out image prompts
    _run(_torchrun("m2mega.eval.run", "--config", "examples/tiny/grpo.yaml", "--checkpoint", str(w / "ckpt_grpo"),
                   "--eval-prefix", str(w / "prep/eval"), f"--data.train_prefix={w / 'prep/rl'}",
                   "--max-new-tokens", str(NEW_TOKENS), "--samples-jsonl", str(w / "m2mega.jsonl")),
         ROOT, logs / "eval.log")
    ours = {r["id"]: r["response_ids"] for r in map(json.loads, open(w / "m2mega.jsonl"))}
    _compare_with_transformers(w, w / "hf_out", ours)
    _same_weights(w / "hf_out", w / "ckpt_grpo" / saved_hf)


def _compare_with_transformers(w, hf_dir, ours: dict) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from m2mega.data.dataset_meta import read_dataset_meta
    from m2mega.rl.prompts import prefix_prompts

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ip, tok = AutoImageProcessor.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(hf_dir))
    system = read_dataset_meta(str(w / "prep/eval"))["config"]["system_prompt"]
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    prompts = {p.info.id: p for p in prefix_prompts(str(w / "prep/eval"))}
    rows = [json.loads(line) for line in open(w / "data/eval.jsonl")]
    assert len(rows) == len(ours) == len(prompts) > 0
    for row in rows:
        content = row["messages"][0]["content"]
        image = Image.open(w / "data" / next(c["image"] for c in content if c["type"] == "image")).convert("RGB")
        text = next(c["text"] for c in content if c["type"] == "text")
        px = ip(images=[image], return_tensors="pt")
        n_img = int(px["image_grid_thw"].prod()) // ip.merge_size**2
        ids = tok(_hf_prompt(system, text, n_img), return_tensors="pt").input_ids
        # HF's preprocessing of the raw row == what m2mega stored for it
        assert torch.equal(ids[0], prompts[row["id"]].prompt_tokens), row["id"]
        assert torch.equal(px["pixel_values"], prompts[row["id"]].pixel_values.float()), row["id"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px["pixel_values"],
                                 image_grid_thw=px["image_grid_thw"], mm_token_type_ids=(ids == model.config.image_token_id).int(),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=sorted(stop))
        theirs = out[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(theirs) if t in stop), len(theirs))
        assert theirs[:cut] == ours[row["id"]], f"{row['id']}: HF {theirs[:cut]} != m2mega {ours[row['id']]}"


def _same_weights(a, b) -> None:
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, fn)))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    hf_cfg = json.load(open(os.path.join(b, "config.json")))
    assert hf_cfg.get("torch_dtype", hf_cfg.get("dtype")) == "float32"  # transformers 5 writes "dtype"
