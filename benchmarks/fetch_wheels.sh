#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_suite.sh installs on a GPU machine that has
# CUDA torch + triton but no network: the exact versions this repo's CPU venv tests (pip freeze of .venv,
# torch/triton/nvidia-* excluded: the device brings its own CUDA build) plus liger-kernel (the benchmark
# peer), as CPython 3.12 manylinux x86_64 wheels. Run it on a machine with registry access, then carry
# .whl/ with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
"$PIP" freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|m2mega|-e )' > .whl/requirements.txt
echo "liger-kernel==0.8.5" >> .whl/requirements.txt
"$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r .whl/requirements.txt
echo "fetch_wheels: $(ls .whl/*.whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1))"
