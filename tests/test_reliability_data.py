"""Inputs that cannot stall or corrupt a job (issue 14, items 3, 4 and 7): a huge line is rejected before
tokenisation, a killed preprocessing run leaves no temporary files, a damaged dataset fails when opened
(naming the file), a lone surrogate is a reject code, EXIF orientation is applied, safetensors errors
name the shard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from m2mega.data.preprocess import preprocess
from m2mega.testing.sample_files import write_sample_jsonl
from test_preprocess import TOOL, _cfg, data, tok_dir  # noqa: F401 (fixtures)


def _row(i: int, text: str) -> dict:
    return {"id": f"r{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}],
            "answer": "1", "task": "math", "answer_type": "number", "difficulty": 0.5}


def test_a_50mb_line_is_rejected_before_tokenisation(tmp_path, tok_dir):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(_row(0, "short question")) + "\n")
        f.write(json.dumps(_row(1, "x" * 50_000_000)) + "\n")  # one pre-token: BPE on it runs for minutes
        f.write(json.dumps(_row(2, "another question")) + "\n")
    t0 = time.perf_counter()
    res = preprocess([str(path)], str(tmp_path / "out" / "ds"), _cfg(tok_dir, seq_length=512))
    took = time.perf_counter() - t0
    assert res.accepted == 2 and res.reject_reasons == {"too_long": 1}
    reject = json.loads(open(res.reject_file).readline())
    assert reject["line"] == 2 and reject["reason"].startswith("too_long: at least")
    assert took < 30, f"a 50 MB line took {took:.1f}s to reject"


def test_the_early_length_bound_never_exceeds_the_real_token_count(tok_dir):
    from m2mega.data.preprocess import _max_token_chars
    from m2mega.data.tokenizer import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    longest = _max_token_chars(tok)
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij klmnop\n\t.,;:!?0123456789é中文🙂") + ["    ", "the ", "<|im_end|>"]
    for n in (1, 7, 64, 300, 2000):
        for _ in range(5):
            text = "".join(rng.choice(alphabet, size=n))
            assert -(-len(text) // longest) <= len(tok.encode(text)), (text, longest)


def _tool_cmd(tmp_path, tok_dir, workers: int) -> tuple[list[str], object]:
    path = str(tmp_path / "in.jsonl")
    write_sample_jsonl(path, 800, seed=1, n_images=4, image_sides=(300, 400))
    out = tmp_path / "out"
    (tmp_path / "rej").mkdir()
    return [TOOL, "--input", path, "--output-prefix", str(out / "ds"), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", tok_dir, "--no-progress", "--chunk-size", "2", "--workers", str(workers),
            "--reject-file", str(tmp_path / "rej" / "rejects.jsonl")], out


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            pass
    return kids


def _reached(point: str, proc, out) -> bool:
    """staging: the staging directory exists (the run starts; the pool is not yet there); pool: a pool
    worker was forked (the parent is inside Pool(), running at-fork hooks); shards: shards were appended to
    the temporary output .bin (it and the reject file are being written)."""
    names = os.listdir(out) if out.is_dir() else []
    staging = any(n.startswith(".") and ".tmp" in n for n in names)
    if point == "staging":
        return staging
    if point == "pool":
        return staging and bool(_children(proc.pid))
    try:
        return any(".tmp" in n and n.endswith(".bin") and os.path.getsize(out / n) > 0 for n in names)
    except OSError:  # renamed or removed meanwhile
        return False


def _assert_stopped_clean(proc, tmp_path, out, sig, code: int) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    left = [n for d in (out, tmp_path / "rej") if d.is_dir() for n in os.listdir(d)]
    assert left == [], f"{sig.name} left {left}"
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    msg = "interrupted (SIGINT)" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert err.strip().splitlines()[-1] == f"error: {msg}; temporary files removed", err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig, workers, point", [
    (signal.SIGINT, 2, "staging"), (signal.SIGINT, 2, "pool"), (signal.SIGTERM, 2, "pool"),
    (signal.SIGINT, 2, "shards"), (signal.SIGTERM, 1, "shards"), (signal.SIGINT, 1, "staging"),
])
def test_a_terminated_run_leaves_no_temporary_files(tmp_path, tok_dir, sig, workers, point):
    cmd, out = _tool_cmd(tmp_path, tok_dir, workers)
    proc = subprocess.Popen([sys.executable] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # startup alone takes seconds on a loaded machine
    while proc.poll() is None and time.time() < deadline and not _reached(point, proc, out):
        time.sleep(0.002)
    assert proc.poll() is None, f"run ended before reaching {point}: make the input bigger"
    assert _reached(point, proc, out), f"the run did not reach {point} in 120 s"
    proc.send_signal(sig)
    _assert_stopped_clean(proc, tmp_path, out, sig, 128 + sig)


# A signal that arrives while the pool forks is handled inside an at-fork hook (logging's _releaseLock),
# where CPython drops the exception: the run went on to the end with exit 0. Raising the signal from a
# fork hook hits that window on every run, whatever the machine's load.
_SIGNAL_IN_FORK_HOOK = (
    "import os, runpy, signal, sys\n"
    "sig = int(sys.argv.pop(1))\n"
    "os.register_at_fork(before=lambda: os.kill(os.getpid(), sig))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_pool_forks_stops_the_run(tmp_path, tok_dir, sig):
    cmd, out = _tool_cmd(tmp_path, tok_dir, 2)
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_IN_FORK_HOOK, str(int(sig))] + cmd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _assert_stopped_clean(proc, tmp_path, out, sig, 128 + sig)


def test_help_answers_fast():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert proc.returncode == 0 and "--output-prefix" in proc.stdout
    assert took < 2.0, f"--help took {took:.2f}s"
    assert "megatron" not in subprocess.run(
        [sys.executable, "-X", "importtime", TOOL, "--help"], capture_output=True, text=True).stderr


def test_a_lone_surrogate_is_a_reject_code_not_a_bug(tmp_path, tok_dir):
    path = tmp_path / "s.jsonl"
    good = json.dumps(_row(0, "fine"))
    bad = good.replace('"fine"', '"broken \\ud800 text"')
    path.write_text(good + "\n" + bad + "\n")
    res = preprocess([str(path)], str(tmp_path / "out" / "ds"), _cfg(tok_dir))
    assert res.reject_reasons == {"bad_unicode": 1}
    reason = json.loads(open(res.reject_file).readline())["reason"]
    assert reason == "bad_unicode: lone UTF-16 surrogate at $.messages[0].content (character 7) (not valid Unicode)"


@pytest.mark.parametrize("suffix, match", [
    (".bin", r"ds\.bin is truncated or damaged: \d+ bytes, its index .*ds\.idx needs \d+"),
    (".strings.bin", r"ds\.strings\.bin is truncated or damaged"),
])
def test_a_damaged_dataset_fails_when_opened(tmp_path, tok_dir, data, suffix, match):
    from m2mega.data.indexed import IndexedSamples
    from m2mega.data.loader import PromptDataset

    path, _ = data
    prefix = str(tmp_path / "ds")
    preprocess([path], prefix, _cfg(tok_dir))
    IndexedSamples(prefix)  # intact: opens
    f = prefix + suffix
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 3)
    with pytest.raises(ValueError, match=match):
        IndexedSamples(prefix)
    with pytest.raises(ValueError, match=match):
        PromptDataset(prefix, 1)


def test_exif_orientation_is_applied_as_transformers_does(tmp_path):
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from m2mega.data.images import load_image, smart_resize

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (60, 150, 3), dtype=np.uint8)  # stored landscape
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "rotated.jpg")
    img.save(path, exif=exif, quality=95)
    ours = load_image(path)
    ref = hf_load_image(path)  # transformers: exif_transpose, then RGB
    h, w = smart_resize(ref.height, ref.width, 56 * 56, 28 * 28 * 1280)
    assert ours.shape[0] > ours.shape[1], "the image is still stored sideways"
    np.testing.assert_array_equal(ours, np.asarray(ref.resize((w, h), resample=Image.BICUBIC)))


def test_safetensors_errors_name_the_shard(tmp_path):
    import torch
    from safetensors.torch import save_file

    from m2mega.convert.hf_io import hf_weight_files, load_hf_tensors, read_hf_headers

    save_file({"a": torch.ones(4), "b": torch.zeros(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.ones(8)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    files = hf_weight_files(tmp_path)
    assert set(read_hf_headers(files)) == {"a", "b", "c"}
    bad = tmp_path / "model-00002-of-00002.safetensors"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated inside its header
    with pytest.raises(ValueError, match=r"safetensors shard .*model-00002-of-00002\.safetensors: "):
        read_hf_headers(files)
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors"):
        load_hf_tensors(files, ["c"])
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(bad, single / "model.safetensors")
    with pytest.raises(ValueError, match=r"single/model\.safetensors"):
        hf_weight_files(single)
