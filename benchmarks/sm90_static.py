"""Static Hopper (sm_90a) check of every GPU kernel, on a machine without a GPU.

Triton compiles ahead of time for a named target: each ``@triton.jit`` kernel of ``kernels/`` is
specialised exactly as its launch would specialise it (the JIT's own binder on the launch's arguments,
pointers standing in as ``MockTensor``) and compiled with ``target=GPUTarget("cuda", 90, 32)``, at every
autotune config, both dtypes, H=3584, V=152064/TP for TP in {1, 2, 4, 8} (ranks 0 and 1: the vocab
offset changes the integer specialisation), T in {4096, 16384} and every backward vocab chunk; the GRPO
kernels at every flag combination and both aggregations (the aggregation is applied on the host, in
``_finish``: both map to the same binaries, which the JSON shows). ``ptxas -v --gpu-name sm_90a`` on the
PTX then gives registers, spill bytes and stack; Triton's metadata gives the dynamic shared memory; the
PTX shows whether the tile loop runs on tensor cores (``wgmma.mma_async`` / ``mma.sync``). ptxas runs
twice: Triton's bundled one (it builds the cubin a GPU run loads) and the CUDA toolkit's (13.0 here).
``csrc/*.cu`` go through ``nvcc -Xptxas -v`` with setup.py's flags.

    python benchmarks/sm90_static.py                 # full sweep -> benchmarks/results/sm90_static.json
    python benchmarks/sm90_static.py --subset ci     # one representative config per kernel (the CI test)

Lives in benchmarks/ (not m2mega/kernels/) because it is a build-time check that needs ptxas/nvcc and
imports no training code; the roofline beside it (``roofline.py``) is what the benchmarks use too.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sm90_static.json"
# H100 SXM: 228 KB of shared memory per SM, at most 227 KB (232448 bytes) opt-in dynamic per block.
SMEM_LIMIT = 227 * 1024
PRODUCTION = {"T": (4096, 16384), "H": 3584, "V": 152064, "TP": (1, 2, 4, 8)}
# Kernels whose spills fail the check: everything on the bf16 performance path and the GRPO loss. The exact
# fp32 path (DOT_MODE=1, FMA, a debugging/parity dtype) is recorded but only warned about.
HOT_DTYPES = ("bf16",)

__all__ = ["Case", "autotune_configs", "triton_cases", "compile_case", "parse_ptxas", "nvcc_report", "run", "check",
           "warnings"]


@dataclass
class Case:
    kernel: str
    dtype: str
    fn: object  # JITFunction
    args: tuple
    kwargs: dict
    meta: dict = field(default_factory=dict)  # config, flags and shape, for the JSON


# ------------------------------------------------------------------------------------------------- cases


def _modules():
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        raise RuntimeError("sm90_static compiles real kernels: run it in a process without TRITON_INTERPRET=1")
    from m2mega.kernels import _grpo_loss_triton as gk
    from m2mega.kernels import _linear_logprob_triton as tk

    return tk, gk


def _mock(dtype):
    from triton.runtime.jit import MockTensor

    return MockTensor(dtype)


def _config_meta(cfg) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _logprob_cases(tk, subset: str) -> list[Case]:
    import torch

    from m2mega.kernels.config import KernelConfig
    from m2mega.kernels.fused_linear_logprob import _vocab_chunks

    H = PRODUCTION["H"]
    cases = []
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fp32 = dtype == torch.float32
        x, f32, i64 = _mock(dtype), _mock(torch.float32), _mock(torch.int64)
        lt = tk._logits_configs(fp32)
        mm = tk._logits_configs(fp32, tk._MM_NAMES)
        if subset == "ci":  # the first (preferred) config of each kernel, one shape, rank 1 of TP 2
            lt, mm = lt[:1], mm[:1]
            shapes = [(4096, 2, 1)]
        else:
            shapes = [(T, tp, r) for T in PRODUCTION["T"] for tp in PRODUCTION["TP"] for r in ((0, 1) if tp > 1 else (0,))]
        for T, tp, rank in shapes:
            V = PRODUCTION["V"] // tp
            start = rank * V
            shape = {"T": T, "H": H, "V_local": V, "TP": tp, "rank": rank}
            chunks = _vocab_chunks(V, T, dtype.itemsize, KernelConfig())
            slab = max(v1 - v0 for v0, v1 in chunks)
            for ent in ((True,) if subset == "ci" else (False, True)):
                for cfg in lt:
                    meta = {"config": _config_meta(cfg), "WITH_ENT": ent, **shape}
                    kw = dict(WITH_ENT=ent, DOT_MODE=tk.dot_mode(dtype), **cfg.all_kwargs())
                    cases.append(Case("_fwd_stats_kernel", dname, tk.FWD[fp32].fn,
                                      (x, x, i64, f32, f32, f32, f32, T, V, H, H, H, 1.0, start, tk.t_bucket(T)),
                                      kw, meta))
                    for v0, v1 in chunks:
                        cases.append(Case("_bwd_dlogits_kernel", dname, tk.BWD[fp32].fn,
                                          (x, x, i64, f32, f32, f32, f32, x, T, v1 - v0, H, H, H, slab, 1.0,
                                           start + v0, tk.t_bucket(T)),
                                          kw, {**meta, "chunk": [v0, v1]}))
            for cfg in mm:
                for i, (v0, v1) in enumerate(chunks):
                    kw = dict(ACCUMULATE=i > 0, DOT_MODE=tk.dot_mode(dtype), **cfg.all_kwargs())
                    cases.append(Case("_mm_acc_kernel", dname, tk.MM_ACC[fp32].fn,
                                      (x, x, f32, T, H, v1 - v0, slab, H, H, tk.t_bucket(T)), kw,
                                      {"config": _config_meta(cfg), "ACCUMULATE": i > 0, "chunk": [v0, v1], **shape}))
    return cases


# Production GRPO flags (m2mega/train/grpo_update.py): fp32 log-probs and mask, reference model (KL),
# per-sequence advantages with Eq. 6 weights, dual clip as configured.
GRPO_PRODUCTION = {"HAS_REF": True, "ADV_TOKEN": False, "HAS_W": True, "HAS_DUAL": True}


def _grpo_cases(gk, subset: str) -> list[Case]:
    import torch

    names = ("HAS_REF", "ADV_TOKEN", "HAS_W", "HAS_DUAL")
    combos = [dict(zip(names, v)) for v in itertools.product((False, True), repeat=4)]
    dtypes = [("fp32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.uint8)]
    if subset == "ci":
        combos = [GRPO_PRODUCTION]
    cases = []
    for (dname, lp_t, mask_t), flags in itertools.product(dtypes, combos):
        if subset == "full" and dname != "fp32" and flags != GRPO_PRODUCTION:
            continue  # every flag combination at fp32; the bf16 / bool-mask inputs at the production flags
        lp, f32, i64, m = _mock(lp_t), _mock(torch.float32), _mock(torch.int64), _mock(mask_t)
        for agg in ("token", "sequence"):
            meta = {**flags, "aggregation": agg, "logp": str(lp_t).removeprefix("torch."),
                    "mask": str(mask_t).removeprefix("torch."), "BLOCK": gk.BLOCK}
            cases.append(Case("_grpo_fwd_kernel", dname, gk._grpo_fwd_kernel,
                              (lp, lp, lp, f32, m, f32, i64, i64, f32, 0.2, 0.28, 3.0),
                              dict(NSTAT=gk.NSTAT, BLOCK=gk.BLOCK, **flags), meta))
            for kl in ((False, True) if flags["HAS_REF"] else (False,)):
                cases.append(Case("_grpo_bwd_kernel", dname, gk._grpo_bwd_kernel,
                                  (lp, lp, lp, f32, m, f32, i64, i64, f32, f32, lp, 0.2, 0.28, 3.0, 0.04),
                                  dict(KL_GRAD=kl, BLOCK=gk.BLOCK, **flags), {**meta, "KL_GRAD": kl}))
    return cases


def autotune_configs() -> dict[str, list[dict]]:
    """The GPU autotune candidates the kernel module declares now, per kernel and dtype (what a full
    sweep must cover)."""
    tk, _ = _modules()
    out = {}
    for name, table in (("_fwd_stats_kernel", tk.FWD), ("_bwd_dlogits_kernel", tk.BWD), ("_mm_acc_kernel", tk.MM_ACC)):
        for fp32, dname in ((False, "bf16"), (True, "fp32")):
            out[f"{name}/{dname}"] = [_config_meta(c) for c in table[fp32].configs]
    return out


def triton_cases(subset: str = "full") -> list[Case]:
    tk, gk = _modules()
    return _logprob_cases(tk, subset) + _grpo_cases(gk, subset)


# ------------------------------------------------------------------------------------------------- compile

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output -> {entry function: {registers, spill_stores, spill_loads, stack_frame, static_smem}}."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {k: 0 for k in _PTXAS_RE})
            continue
        if cur is None:
            continue
        for key, rx in _PTXAS_RE.items():
            v = rx.search(line)
            if v:
                cur[key] = int(v.group(1))
    return out


def ptxas_tools() -> dict[str, str]:
    """Triton's bundled ptxas (builds the cubin that runs) and the CUDA toolkit's, where found."""
    from triton import knobs

    tools = {"triton": knobs.nvidia.ptxas.path}
    system = shutil.which("ptxas")
    if system and os.path.realpath(system) != os.path.realpath(tools["triton"]):
        tools["cuda_toolkit"] = system
    return tools


def _version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _ptxas(tool: str, ptx: str) -> tuple[dict[str, int], str]:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([tool, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                              capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed on the PTX:\n{log[-2000:]}")
    entries = parse_ptxas(log)
    if len(entries) != 1:
        raise RuntimeError(f"expected one entry function in ptxas output, got {sorted(entries)}")
    return next(iter(entries.values())), log


def _specialise(case: Case):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = {"debug": False, **case.kwargs}
    binder = create_function_from_signature(case.fn.signature, case.fn.params, backend)
    bound, spec, opts = binder(*case.args, **kwargs)
    options, signature, constexprs, attrs = case.fn._pack_args(backend, kwargs, bound, spec, opts)
    return target, signature, constexprs, attrs, options


def binary_key(case: Case) -> str:
    target, signature, constexprs, attrs, options = _specialise(case)
    from triton.compiler import ASTSource

    src = ASTSource(case.fn, signature, constexprs, attrs)
    opts = sorted((k, str(v)) for k, v in options.__dict__.items())
    return hashlib.sha256(f"{src.hash()}-{opts}".encode()).hexdigest()[:16]


def compile_case(case: Case, tools: dict[str, str]) -> dict:
    """Compile for sm_90a and measure. Raises (with the kernel and config named) when it does not compile."""
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = _specialise(case)
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(case.fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - re-raised with the case named
        raise RuntimeError(f"{case.kernel} {case.dtype} {case.meta} does not compile for sm_90a: {e}") from e
    ptx = k.asm["ptx"]
    rec = {
        "kernel": case.kernel,
        "dtype": case.dtype,
        "compile_s": round(time.perf_counter() - t0, 2),
        "dynamic_smem": int(k.metadata.shared),
        "num_warps": int(k.metadata.num_warps),
        "num_stages": int(k.metadata.num_stages),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "ptxas": {},
    }
    for name, tool in tools.items():
        rec["ptxas"][name], _ = _ptxas(tool, ptx)
    return rec


# ------------------------------------------------------------------------------------------------- csrc

NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]  # setup.py's


def nvcc_report(cu: Path, nvcc: str | None = None) -> dict[str, dict[str, int]]:
    """``nvcc -Xptxas -v`` of one .cu with setup.py's flags -> per-kernel ptxas figures (mangled names)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not on PATH")
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", "-c", str(cu), "-o", str(Path(d) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return parse_ptxas(proc.stdout + proc.stderr)


# ------------------------------------------------------------------------------------------------- driver


def _limits_ok(rec: dict) -> list[str]:
    """Problems of one compiled binary (empty when it passes)."""
    bad = []
    if rec["dynamic_smem"] + max(p["static_smem"] for p in rec["ptxas"].values()) > SMEM_LIMIT:
        bad.append(f"shared memory {rec['dynamic_smem']} B > {SMEM_LIMIT} B")
    for tool, p in rec["ptxas"].items():
        if p["spill_stores"] or p["spill_loads"]:
            bad.append(f"spills ({tool} ptxas: {p['spill_stores']} B stores / {p['spill_loads']} B loads, "
                       f"{p['registers']} registers)")
    if rec["dtype"] == "bf16" and rec["kernel"] in ("_fwd_stats_kernel", "_bwd_dlogits_kernel", "_mm_acc_kernel") \
            and not rec["wgmma"]:
        bad.append("no wgmma in the PTX: the tile loop is not on Hopper tensor cores")
    return bad


def warnings(report: dict) -> list[str]:
    """Problems of binaries off the hot path (the exact-fp32 debug dtype): recorded, not failed."""
    return [f"{rec['kernel']} {rec['dtype']} [{key}] {rec['variants'][0]['config']}: {problem}"
            for key, rec in report["binaries"].items()
            if not (rec["dtype"] in HOT_DTYPES or rec["kernel"].startswith("_grpo"))
            for problem in _limits_ok(rec) if not problem.startswith("shared memory")]


def check(report: dict) -> list[str]:
    """Failures: hot binaries that spill, use no tensor cores, or exceed shared memory; any binary over
    the shared-memory limit; any case that failed to compile; .cu kernels that spill."""
    fails = [f"does not compile: {e}" for e in report["compile_errors"]]
    for key, rec in report["binaries"].items():
        for problem in _limits_ok(rec):
            hot = rec["dtype"] in HOT_DTYPES or rec["kernel"].startswith("_grpo")
            if hot or problem.startswith("shared memory"):
                fails.append(f"{rec['kernel']} {rec['dtype']} [{key}] {rec['variants'][0]}: {problem}")
    for cu, kernels in report.get("csrc", {}).items():
        for name, p in kernels.items():
            if p["spill_stores"] or p["spill_loads"]:
                fails.append(f"{cu}:{name} spills {p['spill_stores']} B")
    return fails


def run(subset: str = "full", with_csrc: bool = True, log=print) -> dict:
    import torch
    import triton

    tools = ptxas_tools()
    cases = triton_cases(subset)
    binaries: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    errors = []
    t0 = time.perf_counter()
    for case in cases:
        key = binary_key(case)
        if key not in binaries:
            try:
                binaries[key] = compile_case(case, tools) | {"variants": []}
            except RuntimeError as e:
                errors.append(str(e))
                continue
            rec = binaries[key]
            log(f"[{time.perf_counter() - t0:6.1f}s] {case.kernel:<20} {case.dtype} {case.meta.get('config', '')} "
                f"smem={rec['dynamic_smem']} wgmma={rec['wgmma']} "
                + " ".join(f"{n}:regs={p['registers']},spill={p['spill_stores']}" for n, p in rec["ptxas"].items()))
        variant = {"config": case.meta.get("config"), "flags": {k: v for k, v in case.meta.items() if k.isupper()}}
        if variant not in binaries[key]["variants"]:
            binaries[key]["variants"].append(variant)
        # One row per (kernel, dtype, config, flags, T, TP): its ranks and vocab chunks folded in.
        shape = {k: v for k, v in case.meta.items() if k not in ("rank", "chunk", "V_local")}
        rkey = json.dumps([case.kernel, case.dtype, shape], sort_keys=True)
        row = rows.setdefault(rkey, {"kernel": case.kernel, "dtype": case.dtype, **shape, "launches": 0, "binaries": []})
        row["launches"] += 1
        if key not in row["binaries"]:
            row["binaries"].append(key)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "subset": subset,
        "target": "cuda sm_90a (GPUTarget('cuda', 90, 32))",
        "versions": {"triton": triton.__version__, "torch": torch.__version__,
                     **{f"ptxas_{n}": _version(t) for n, t in tools.items()}},
        "limits": {"smem_per_block_bytes": SMEM_LIMIT, "registers_per_thread": 255},
        "production": {k: list(v) if isinstance(v, tuple) else v for k, v in PRODUCTION.items()},
        "autotune_configs": autotune_configs(),
        "compile_errors": errors,
        "binaries": binaries,
        "cases": list(rows.values()),
    }
    if with_csrc and shutil.which("nvcc"):
        report["csrc"] = {cu.name: nvcc_report(cu) for cu in sorted((ROOT / "csrc").glob("**/*.cu"))}
        report["versions"]["nvcc"] = _version(shutil.which("nvcc"))
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from roofline import H100_SXM, production_table  # sibling module

    report["roofline"] = {"device": H100_SXM.__dict__, "rows": production_table()}
    report["failures"] = check(report)
    report["warnings"] = warnings(report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", choices=["full", "ci"], default="full")
    p.add_argument("--out", type=Path, help=f"output JSON (default {OUT.relative_to(ROOT)} for the full sweep)")
    p.add_argument("--no-csrc", action="store_true", help="skip nvcc on csrc/*.cu")
    args = p.parse_args(argv)
    report = run(args.subset, not args.no_csrc)
    out = args.out or (OUT if args.subset == "full" else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    n = len(report["binaries"])
    print(f"{sum(r['launches'] for r in report['cases'])} launch cases -> {n} distinct sm_90a binaries; {len(report['failures'])} failure(s)")
    for w in report["warnings"]:
        print("warning (not a hot kernel):", w)
    for f in report["failures"]:
        print("FAIL", f)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
