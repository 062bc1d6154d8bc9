"""The CUDA sources in csrc/ compile with nvcc for sm_90a even though torch here is CPU-only.

The .cu files (and the headers they pull in) must not include torch/ATen: the torch binding lives in
.cpp. This is what lets CI check the kernels compile without a CUDA build of torch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("**/*.cu"))
NVCC = shutil.which("nvcc")
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
TORCH_HEADER = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/")


def _includes(path: pathlib.Path, seen: set[pathlib.Path]) -> list[str]:
    """All #include targets of `path`, following quoted includes that resolve inside csrc/."""
    if path in seen:
        return []
    seen.add(path)
    found = []
    for name in INCLUDE.findall(path.read_text()):
        found.append(name)
        local = path.parent / name
        if local.is_file():
            found += _includes(local, seen)
    return found


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ should hold the CUDA implementation (*.cu)"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_include_no_torch(cu):
    bad = [h for h in _includes(cu, set()) if TORCH_HEADER.match(h) or h.startswith("torch")]
    assert not bad, f"{cu.name} pulls in torch/ATen headers: {bad}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (install the CUDA toolkit to compile csrc/*.cu)")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90a(cu, tmp_path):
    obj = tmp_path / (cu.stem + ".o")
    cmd = [NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-c", str(cu), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert obj.stat().st_size > 0
    # setup.py's flags for the real build (fast math must not matter: the kernels do integer math only),
    # with ptxas's report: every __global__ kernel fits in registers without spilling
    # (benchmarks/sm90_static.py records the same figures in benchmarks/results/sm90_static.json).
    kernels = _sm90_static().nvcc_report(cu, NVCC)
    n_global = len(re.findall(r"__global__", cu.read_text()))
    assert len(kernels) >= n_global > 0, f"ptxas reported {sorted(kernels)} for {n_global} __global__ kernels"
    for name, p in kernels.items():
        assert p["spill_stores"] == 0 and p["spill_loads"] == 0, f"{cu.name}:{name} spills: {p}"
        assert 0 < p["registers"] <= 255, f"{cu.name}:{name}: {p}"


def _sm90_static():
    spec = importlib.util.spec_from_file_location("sm90_static", CSRC.parent / "benchmarks" / "sm90_static.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
