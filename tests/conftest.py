"""Shared fixtures: a tiny randomly initialised LLaMA and tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import build_tiny_llama, build_tokenizer, sample_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if not torch.cuda.is_available():  # before anything imports triton: its kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny LLaMA directory (config.json + safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(sample_text(300, seed=1))
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test touches the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("RSAVQ_CACHE_DIR", str(tmp_path / "rsavq-cache"))
    monkeypatch.delenv("RSAVQ_DATA_DIR", raising=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def bf16_units(monkeypatch):
    """bfloat16 autocast where the options ask for it, on any CPU, as on one with AVX-512
    (`rsavq.runtime.fast_bf16`), for tests of the bfloat16 paths themselves (the tiny models
    cost nothing either way). Other tests take the machine's own choice, as do the processes
    some of them start."""
    monkeypatch.setattr("rsavq.runtime._fast_bf16", lambda device_type: True)


@pytest.fixture()
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
