# rsavq: set-up, tests and the main job. Everything runs inside .venv (made here with pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
export RSAVQ_DATA_DIR ?= $(DATA_DIR)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo eval-fp clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

# The main job on the built-in default model: WikiText-2 perplexity of the bundled SmolLM2-135M.
demo: setup
	$(VENV)/bin/rsavq eval --model smollm2-135m --ppl wikitext2 --seqlen 2048 --limit 8

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
