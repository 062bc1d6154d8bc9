"""The GPU check in one go: run by ``benchmarks/gpu_suite.sh`` (which installs the wheels and builds the
extension first). Parts run in order of value, each a subprocess with its own time cap, so one slow part
cannot starve the rest; the suite as a whole keeps to ``--budget`` seconds (8 minutes by default, on one
H100/H200). Writes ``benchmarks/results/<device>.json``: date, device, versions, and per part its
status (ok / failed / timeout / skipped, with the reason), wall time, exit code, output tail and parsed
results.

    python benchmarks/gpu_suite.py                # on the GPU machine (via gpu_suite.sh)
    python benchmarks/gpu_suite.py --dry-run      # same driver on CPU at tiny sizes (CI: tests/test_gpu_suite.py)

Parts: ``gpu_tests`` (``pytest -m gpu``: kernels vs reference on the tensor-core path, CUDA vision pack ==
CPU), ``kernels_T4096`` / ``kernels_T16384`` (``pytest benchmarks/test_kernels_benchmark.py
--benchmark-only``: eager, torch.compile, Liger, ours), ``vision_pack`` (CUDA vs CPU extension vs HF),
``model`` (bench_model.py: 7B shape cut to 12 LM layers, packed 8k THD with images: tokens/s, MFU),
``grpo_step`` (bench_grpo_step.py: one small GRPO step split into rollout / log-prob / update),
``rollout`` (``python -m m2mega.inference.bench_rollout``: rollout engine vs static batching vs HF).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@dataclass
class Part:
    name: str
    cmd: list[str]
    cap_s: int  # its own time cap
    why: str  # what it checks, for the JSON
    outputs: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # a file that must exist, else the part is skipped


def parts(out: Path, dry: bool) -> list[Part]:
    # -P: no cwd on sys.path, or the repo's kernels/ shadows the PyPI 'kernels' that transformers imports.
    py = [sys.executable, "-P"]
    kernels_bench = [*py, "-m", "pytest", str(BENCH / "test_kernels_benchmark.py"), "-q", "-p", "no:cacheprovider",
                     "--benchmark-enable", "--benchmark-only", "--benchmark-columns=min,median,max,rounds"]
    gpu_tests = [*py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}"]
    if dry:  # the files holding the gpu-marked tests: collecting all of tests/ costs more than the run here
        gpu_tests += [str(ROOT / "tests" / f) for f in
                      ("test_fused_linear_logprob.py", "test_fused_grpo_loss.py", "test_vision_pack.py")]
    else:
        gpu_tests += [str(ROOT / "tests")]
    ps = [Part("gpu_tests", gpu_tests, 60 if dry else 90, "pytest -m gpu: kernels vs reference (bf16/fp32, "
               "tensor-core path), CUDA vision pack == CPU extension", {"junit": out / "gpu_tests.xml"})]
    for T in ([37] if dry else [4096, 16384]):
        rows = out / f"kernels_T{T}.jsonl"
        ps.append(Part(f"kernels_T{T}", kernels_bench + [f"--benchmark-json={out / f'kernels_T{T}.json'}"],
                       60 if dry else 120, f"fused log-prob / GRPO loss vs eager, torch.compile, Liger at T={T}",
                       {"rows": rows, "benchmark_json": out / f"kernels_T{T}.json"},
                       env={"M2MEGA_BENCH_TOKENS": str(T), "M2MEGA_BENCH_ROWS": str(rows)}))
    vp = [*py, str(BENCH / "bench_vision_pack.py"), "--json", str(out / "vision_pack.json")]
    vp += (["--num-images", "4", "--min-side", "32", "--max-side", "96", "--rounds", "1", "--torch-ref-rounds", "0"]
           if dry else ["--num-images", "128", "--rounds", "3", "--torch-ref-rounds", "0"])
    ps.append(Part("vision_pack", vp, 60 if dry else 45, "vision packing: CUDA vs CPU extension vs HF processor",
                   {"json": out / "vision_pack.json"}))
    bm = [*py, str(BENCH / "bench_model.py"), "--out", str(out / "model.json")]
    bm += ["--device", "cpu", "--tiny", "--no-peer", "--iters", "1", "--warmup", "0"] if dry else ["--device", "cuda"]
    ps.append(Part("model", bm, 60 if dry else 90, "Qwen2.5-VL 7B shape cut, packed 8k THD with images: "
                   "tokens/s, MFU, HF peer loss", {"json": out / "model.json"}))
    gs = BENCH / "bench_grpo_step.py"
    ps.append(Part("grpo_step", [*py, str(gs), "--out", str(out / "grpo_step.json")] + (["--device", "cpu"] if dry else []),
                   60 if dry else 45, "one small GRPO step: rollout / log-prob / update seconds",
                   {"json": out / "grpo_step.json"}, needs=str(gs)))
    ro = [*py, "-m", "m2mega.inference.bench_rollout", "--json", str(out / "rollout.json")]
    ro += (["--layers", "1", "--prompts", "2", "--image-prompts", "1", "--image-size", "56", "56", "--prompt-len",
            "8", "12", "--group", "2", "--new-tokens", "4", "--repeats", "1", "--modes", "greedy"] if dry else
           ["--shape", "7b", "--layers", "4", "--device", "cuda", "--dtype", "bf16", "--prompts", "16",
            "--image-prompts", "8", "--image-size", "448", "448", "--prompt-len", "200", "400", "--group", "8",
            "--new-tokens", "256", "--eos-every", "2000", "--repeats", "2"])
    ps.append(Part("rollout", ro, 60 if dry else 150, "GRPO rollouts, 7B shape cut to 4 LM layers, G=8: static "
                   "generate() vs the rollout engine vs HF generate (tokens/s, prefill/decode, memory)",
                   {"json": out / "rollout.json"}))
    return ps


def _versions() -> dict:
    v = {"python": platform.python_version()}
    for mod in ("torch", "triton", "megatron.core", "transformers", "liger_kernel", "flash_attn", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            v[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - record why, the suite goes on
            v[mod] = f"not installed ({type(e).__name__})"
    try:
        import torch

        v["cuda"] = torch.version.cuda
        v["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        v["nvcc"] = f"not found ({type(e).__name__})"
    return v


def _device_name(dry: bool) -> str:
    import torch

    if not dry and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu (dry run)"


def _parse(part: Part) -> dict:
    """Whatever the part left behind, even after a timeout (the kernel rows are written one per line)."""
    res: dict = {}
    for key, path in part.outputs.items():
        if not path.exists():
            continue
        if path.suffix == ".jsonl":
            res[key] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".xml":
            m = re.search(r'<testsuite [^>]*', path.read_text())
            if m:
                res[key] = {k: int(v) for k, v in re.findall(r'(tests|failures|errors|skipped)="(\d+)"', m.group(0))}
        elif key != "benchmark_json":  # pytest-benchmark's file is large: the rows above summarise it
            res[key] = json.loads(path.read_text())
    return res


def run_part(part: Part, budget_left: float, log) -> dict:
    rec = {"why": part.why, "command": " ".join(part.cmd), "cap_s": part.cap_s}
    if part.needs and not Path(part.needs).exists():
        return rec | {"status": "skipped", "reason": f"{Path(part.needs).relative_to(ROOT)} is not in this checkout"}
    cap = min(part.cap_s, int(budget_left))
    if budget_left < 10:
        return rec | {"status": "skipped", "reason": f"suite budget exhausted ({budget_left:.0f} s left)"}
    env = {**os.environ, **part.env}
    env.pop("TRITON_INTERPRET", None)  # the conftests set it again where there is no GPU
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(part.cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        rc, status = None, "timeout"
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-4000:]
    rec.update(status=status, rc=rc, seconds=round(time.perf_counter() - t0, 1), output_tail=tail,
               results=_parse(part))
    log(f"gpu_suite: {part.name:<16} {status:<8} {rec['seconds']:7.1f} s (cap {cap} s)")
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the driver itself")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 420; dry run 240)")
    ap.add_argument("--only", nargs="*", help="run only these parts (others: skipped)")
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/<device>.json)")
    ap.add_argument("--setup-log", type=Path, help="gpu_suite.sh's install/build log, recorded in the JSON")
    args = ap.parse_args(argv)
    dry = args.dry_run
    budget = args.budget or (240.0 if dry else 420.0)
    device = _device_name(dry)
    if not dry and device.startswith("cpu"):
        sys.exit("gpu_suite: no CUDA device here (use --dry-run on CPU)")
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out_json = args.out or (BENCH / "results" / f"{slug}.json")
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))  # raw outputs; the JSON embeds what they say
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "dry_run": dry,
        "host": platform.node(),
        "versions": _versions(),
        "budget_s": budget,
        "raw_outputs": str(work),
        "parts": {},
    }
    if args.setup_log and args.setup_log.exists():
        report["setup_log_tail"] = args.setup_log.read_text()[-4000:]
    t0 = time.perf_counter()
    for part in parts(work, dry):
        if args.only and part.name not in args.only:
            report["parts"][part.name] = {"status": "skipped", "reason": "not in --only"}
            continue
        report["parts"][part.name] = run_part(part, budget - (time.perf_counter() - t0), print)
        out_json.write_text(json.dumps(report, indent=1) + "\n")  # after every part: a killed suite keeps them
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["skipped"] = {k: v.get("reason") for k, v in report["parts"].items() if v["status"] == "skipped"}
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_suite: wrote {out_json} ({report['seconds']} s)")
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
