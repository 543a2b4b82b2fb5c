# make test  — set up .venv on a fresh machine and run the test suite (what CI runs)
# make bench — set up the same way and run the benchmark comparison (benchmarks/README.md)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test bench clean nvcc-check cuda-host-asan cuda-host-tsan gpu-check resources

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when none is importable, so a CUDA build already there is kept.
setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test]"

test: nvcc-check setup
	$(PY) -m pytest -q
	$(PY) -m benchmarks.resources --check
	$(MAKE) cuda-host-asan

# The CUDA kernels' host build (vqfast._C_cuda_host, csrc/host/) rebuilt under sanitizers, standing in for
# compute-sanitizer where no GPU is: AddressSanitizer + UBSan (out-of-bounds, misaligned or overflowing
# index arithmetic; CI runs it with make test) and ThreadSanitizer (a missing __syncthreads: a race between
# emulated threads). Each builds into its own folder and runs tests/test_cuda_host.py on that build.
SANITIZE_BUILD = VQFAST_CUDA_HOST_SANITIZE=$(1) $(PY) setup.py -q build_ext --build-lib build/$(2) --build-temp build/$(2)/tmp
SANITIZED_LIBRARY = VQFAST_CUDA_HOST_LIBRARY="$$(ls build/$(1)/vqfast/_C_cuda_host*.so)"

cuda-host-asan: setup
	$(call SANITIZE_BUILD,address$(COMMA)undefined,asan)
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
		$(call SANITIZED_LIBRARY,asan) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_cuda_host.py

cuda-host-tsan: setup
	$(call SANITIZE_BUILD,thread,tsan)
	TSAN_OPTIONS=halt_on_error=1 LD_PRELOAD="$$($(CXX) -print-file-name=libtsan.so)" \
		$(call SANITIZED_LIBRARY,tsan) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_cuda_host.py

COMMA := ,

# The bench extra: its requirements, as installed vqfast's metadata lists them, without the second build
# of vqfast that `pip install -e ".[bench]"` would make. Then the runner; its options go in ARGS, e.g.
# make bench ARGS="--quick" (.venv/bin/python -m benchmarks.run --help).
bench: setup
	$(PY) -c 'import importlib.metadata as m; print(*(r.split(";")[0] for r in m.requires("vqfast") if "extra == \"bench\"" in r), sep="\n")' \
		| xargs -d '\n' $(PIP) install
	$(PY) -m benchmarks.run $(ARGS)

# make gpu-check: everything a lent GPU should check, in one call of the device tool, with that machine's own
# python3 (no venv, no network; diffusers travels as a wheel: benchmarks/gpu_check.py's docstring): build, the
# CUDA tests, compute-sanitizer, the benchmarks, all into $$OUT in at most 8 files, in under 9 minutes.
# DRY_RUN=1: the same steps on this CPU at tiny sizes, in .venv. Options in ARGS, e.g. ARGS="--skip bench".
gpu-check: $(if $(filter 1,$(DRY_RUN)),setup)
	DRY_RUN=$(DRY_RUN) $(if $(filter 1,$(DRY_RUN)),$(PY),$(PYTHON)) -m benchmarks.gpu_check $(ARGS)

# Every Triton specialization the tests launch (recorded under the interpreter, autotune configs included)
# compiled ahead of time for sm_90 and sm_80, and csrc/cuda/*.cu through nvcc -Xptxas -v: registers, spills,
# shared memory and ld.global count per kernel into benchmarks/results/resources-sm80-sm90.{md,json}. Fails
# on a compile error. A specialization whose key (triton version, kernel source hash, specialization,
# target) is in the committed JSON or in build/'s cache is not compiled again. make test runs it with
# --check: it compiles only what the committed table does not prove and writes nothing (measured on 2 cores:
# 40 s with the table current, mostly the interpreted tests that record the launches; 7 min with no key
# known, 934 compiles).
resources: setup
	$(PY) -m benchmarks.resources

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
