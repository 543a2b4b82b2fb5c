# make test  — set up .venv on a fresh machine and run the test suite (what CI runs)
# make bench — set up the same way and run the benchmark comparison (arrives with benchmarks/)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when none is importable, so a CUDA build already there is kept.
setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test]"

test: nvcc-check setup
	$(PY) -m pytest -q

# The bench extra's requirements (read from pyproject.toml) without a second build of vqfast, then the
# runner; options go in ARGS, e.g. make bench ARGS="--quick" (python -m benchmarks.run --help).
bench: setup
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"], sep="\n")' \
		| xargs -d '\n' $(PIP) install
	$(PY) -m benchmarks.run $(ARGS)

# Compile-checks every csrc/cuda/*.cu for sm_80 and sm_90 when nvcc is found, so a CUDA compile error
# fails CI on a machine without a GPU. The .cu files include no torch headers.
NVCC ?= $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
NVCC_FLAGS := -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

nvcc-check:
	@if [ -z "$(NVCC)" ]; then echo "nvcc-check: skipped (no nvcc on PATH or in /usr/local/cuda/bin)"; \
	elif [ -z "$(wildcard csrc/cuda/*.cu)" ]; then echo "nvcc-check: skipped (no csrc/cuda/*.cu)"; \
	else tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		for f in $(wildcard csrc/cuda/*.cu); do \
			echo "nvcc-check: $$f"; \
			"$(NVCC)" -c $(NVCC_FLAGS) "$$f" -o "$$tmp/$$(basename "$$f" .cu).o" || exit 1; \
		done; echo "nvcc-check: ok"; fi

clean:
	rm -rf $(VENV) build *.egg-info
