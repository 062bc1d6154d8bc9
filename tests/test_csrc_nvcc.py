"""The CUDA sources in csrc/ compile with nvcc for sm_90a even though torch here is CPU-only.

The .cu files (and the headers they pull in) must not include torch/ATen: the torch binding lives in
.cpp. This is what lets CI check the kernels compile without a CUDA build of torch.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

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
    # setup.py's flags for the real build (fast math must not matter: the kernels do integer math only)
    cmd = [NVCC, "-O3", "--use_fast_math", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c", str(cu),
           "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
