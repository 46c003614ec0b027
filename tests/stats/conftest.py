import pytest
import torch

from helpers import build_tiny_llama
from rsavq.modules import find_linears


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, its linears and 5 calibration windows of 24 tokens."""
    model = build_tiny_llama(vocab_size=64, seed=3)
    windows = torch.randint(0, 64, (5, 24), generator=torch.Generator().manual_seed(1))
    return model, find_linears(model), windows
