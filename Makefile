# Quickstart: `make demo` and `make test` on a fresh machine with Python 3.10+ and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
DEV := $(VENV)/.installed-dev

.PHONY: setup demo plan-demo test test-interop lint bench clean

setup: $(DEV)

# torch is pinned: on these machines torch==2.13.0 is a CPU build on local disk; an unpinned
# torch would pull a multi-GB CUDA build. An existing torch in the venv is kept.
$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[all]"
	touch $(BASE)

# test tools (pytest, ruff, ray, transformers, openai, build) on top of the runtime
$(DEV): $(BASE)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(DEV)

# The main job: sweep -> fit -> plan -> train -> compare -> report on the bundled corpus (~10 min on 2 cores).
demo: $(BASE)
	$(VENV)/bin/flopwise autopilot --out autopilot

plan-demo: $(BASE)
	$(VENV)/bin/flopwise plan --flops 1e21 --gpu a100-80gb
	$(VENV)/bin/flopwise plan --flops 1e21 --inference-tokens 2e12
	$(VENV)/bin/flopwise plan --dollars 500 --gpu h100 --device rpi5 --bits 4

test: $(DEV)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# llama.cpp parity (GGUF logits, tokenizer, q8_0 agreement): builds llama-cpp-python from source
# (10-25 min on 2 cores). The AMX kernels are left out: on some VMs they crash quantized models
# with SIGILL (loading with use_extra_bufts=False also avoids them).
test-interop: $(DEV)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(PY) -m pip install --no-binary llama-cpp-python "llama-cpp-python>=0.3"
	$(PY) -m pytest -q -m interop

lint: $(DEV)
	$(PY) -m ruff check .

bench: $(DEV)
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
