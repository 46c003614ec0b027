# rsavq: set-up, tests and the main job. Everything runs inside .venv (made here with pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
export RSAVQ_DATA_DIR ?= $(DATA_DIR)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo results clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,plot,eval,triton]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

# The main job on the built-in default: quantize the bundled SmolLM2-135M to 3 bits with exactly
# what `rsavq quantize --bits 3` does by default (Fisher statistics and block-by-block input
# Hessians from 64 x 512 C4 tokens, OBS vector quantization, block fine-tuning, distillation on
# 128 windows; the Fisher statistics cached for reuse), embeddings and norms stored in bfloat16.
# Then FP vs quantized WikiText-2 perplexity on the first 8 windows of 2048 tokens, and the stage
# clock. Rewrites runs/demo-smollm2-3bit. DEMO_ARGS adds options to `rsavq quantize`.
DEMO_OUT ?= runs/demo-smollm2-3bit
DEMO_ARGS ?=
demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/rsavq quantize --model smollm2-135m --bits 3 $(DEMO_ARGS) --save-dtype bfloat16 \
		--out $(DEMO_OUT) --eval wikitext2 --eval-limit 8

# The results table (benchmarks/results.py): FP, RTN g128, GPTQ g128, the paper's configuration
# and the default at 2, 3 and 4 bits on SmolLM2-135M, WikiText-2 and C4 perplexity and zero-shot
# accuracy; each row runs its own processes and the run resumes where it stopped. FAST=1: the
# 16-window development protocol with the 3-bit default over three seeds. RESULTS_ARGS adds
# options (e.g. --bits 3 --only 'rsavq (default)').
FAST ?=
RESULTS_ARGS ?=
results: setup
	$(PY) benchmarks/results.py $(if $(FAST),--fast) $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
