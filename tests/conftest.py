"""Test-wide setup: CPU by default, Triton in interpreter mode without CUDA, GPU tests skip cleanly."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: runs @triton.jit kernels on CPU (numpy interpreter).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
