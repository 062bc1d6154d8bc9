"""pytest setup for ``benchmarks/``: the same CPU/interpreter switch as tests/conftest.py (benchmarks are
collected by CI too, at tiny shapes), and the benchmark directory on sys.path for its helper modules."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Before triton is imported anywhere: @triton.jit kernels then run in the numpy interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
