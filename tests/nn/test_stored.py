"""Embeddings kept in bfloat16 inside a float32 model compute what their widened copies do."""

import pytest
import torch

from helpers import build_tiny_llama
from rsavq.nn.stored import StoredEmbedding, StoredLinear, keep_stored_embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_kept_embeddings_give_the_widened_model_s_logits(tied):
    torch.manual_seed(0)
    model = build_tiny_llama(64).eval()  # tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():  # values a bfloat16 checkpoint holds
        for p in {id(p): p for p in model.parameters()}.values():
            p.copy_(p.bfloat16().float())
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        assert keep_stored_embeddings(model, torch.bfloat16)
        head, embed = model.lm_head, model.model.embed_tokens
        assert isinstance(head, StoredLinear) and isinstance(embed, StoredEmbedding)
        assert head.weight.dtype == embed.weight.dtype == torch.bfloat16
        assert (head.weight is embed.weight) == tied
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)  # decode: one token a step
        assert out.shape == (1, 16)
    assert not keep_stored_embeddings(model, torch.bfloat16)  # already kept


def test_a_kept_model_moves_its_compute_dtype_with_to():
    model = build_tiny_llama(64).eval()
    keep_stored_embeddings(model, torch.bfloat16)
    model.to(torch.bfloat16)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    model.to(torch.float32)  # the weights widen with it: plain modules' arithmetic
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float32
