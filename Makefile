# The README's two commands: `make demo` and `make test`. Both create the environment
# themselves on a fresh machine: a venv in .venv with the package installed in editable
# mode. Without CUDA, torch is pinned to the CPU build (2.13.0) so no CUDA packages are
# pulled in; with an NVIDIA driver present any recent torch is taken.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparse-engine demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
