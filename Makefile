# make test  — set up .venv on a fresh machine and run the test suite (what CI runs)
# make bench — set up the same way and run the benchmark comparison (arrives with benchmarks/)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when none is importable, so a CUDA build already there is kept.
setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test]"

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
