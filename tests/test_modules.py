from torch import nn

from helpers import build_tiny_llama
from rsavq.modules import find_linears


def test_find_linears_walks_decoder_and_skips_lm_head():
    model = build_tiny_llama(vocab_size=32, layers=2)
    names = list(find_linears(model))
    assert len(names) == 14 and "lm_head" not in names
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert all(isinstance(m, nn.Linear) for m in find_linears(model).values())


def test_include_lm_head_and_custom_skip():
    model = build_tiny_llama(vocab_size=32, layers=1)
    assert "lm_head" in find_linears(model, skip=())
    assert all("mlp" not in n for n in find_linears(model, skip=("lm_head", "*mlp*")))
