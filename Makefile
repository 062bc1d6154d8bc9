# Two commands on a fresh machine:  make test  |  make demo
# Both create .venv (Python >= 3.11), install m2mega editable with its C++ extension, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.m2mega-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
PYTEST_ARGS ?=
SEEDS ?= 1

.PHONY: test demo venv clean check-python help

help:
	@echo "make test   - set up .venv and run the test suite (CPU; GPU tests skip without CUDA)"
	@echo "make demo   - set up .venv and run the CPU demo (examples/demo; SEEDS=3 runs three seeds + a 95% interval)"
	@echo "make venv   - only set up .venv"

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: '$(PYTHON)' not found; install Python >= 3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { echo "error: m2mega needs Python >= 3.11, '$(PYTHON)' is $$($(PYTHON) -c 'import platform; print(platform.python_version())'); pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || { echo "error: no C++ compiler (g++) found; it is needed to build the csrc/ extension (apt-get install g++)" >&2; exit 1; }

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml $(EXT_SOURCES) | check-python
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "error: could not create the virtual environment $(VENV) (is the venv module installed? apt-get install python3-venv)" >&2; exit 1; }
	@echo ">>> installing $(TORCH_SPEC) and m2mega into $(VENV)"
	@$(PY) -m pip install -q --upgrade pip setuptools wheel pybind11 ninja || { echo "error: pip could not reach the package registry to install build tools; check network/proxy settings" >&2; exit 1; }
	@$(PY) -m pip install -q "$(TORCH_SPEC)" || { echo "error: could not install $(TORCH_SPEC) (no network to the registry, or no matching wheel); set TORCH_SPEC=... to pick another" >&2; exit 1; }
	@$(PY) -m pip install -q --no-build-isolation -e ".[test]" || { echo "error: installing m2mega failed (see pip's message above: registry unreachable, or the csrc/ extension did not compile)" >&2; exit 1; }
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/demo/run_demo.py --seeds $(SEEDS)

clean:
	rm -rf $(VENV) build *.egg-info m2mega/_C*.so demo_output
