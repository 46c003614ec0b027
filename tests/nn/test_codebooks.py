"""Stored codebooks: fp16, or int8 with scales."""

import pytest
import torch

from helpers import plain_config
from rsavq.algorithms.rsavq import quantize_layer
from rsavq.kernels import Backend, cpu
from rsavq.nn import VQLinear
from rsavq.nn.codebooks import codebook_bits, decode_codebook, encode_codebook, round_codebook


@pytest.mark.parametrize("magnitude", [1e-3, 0.7, 30.0])
def test_int8_encoding_is_close_and_idempotent(magnitude):
    book = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(0)) * magnitude
    q, scale = encode_codebook(book, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (2,)
    assert q.abs().amax() == 127
    decoded = decode_codebook(q, scale)
    assert (decoded.float() - book).abs().max() <= scale.float().max() * 0.51 + 1e-3 * magnitude
    again = encode_codebook(decoded, "int8")  # what a stored book reads back as, stored again
    assert torch.equal(again[0], q) and torch.equal(again[1], scale)
    assert torch.equal(round_codebook(decoded, "int8"), decoded)


def test_fp16_codebooks_are_stored_as_they_are():
    book = torch.randn(1, 16, 2)
    stored, scale = encode_codebook(book, "float16")
    assert scale is None and torch.equal(stored, book.half())
    assert codebook_bits((1, 16, 2), "float16") == 16 * 2 * 16
    assert codebook_bits((2, 16, 2), "int8") == 2 * 16 * 2 * 8 + 2 * 16


BACKENDS = [Backend.REFERENCE] + ([Backend.CPU] if cpu.available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 12])
def test_int8_modules_match_dequantize_on_every_backend(backend, tokens):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=gen)
    H = (X := torch.randn(64, 40, generator=gen)).T @ X
    config = plain_config(bits=2, groups=2, kmeans_iters=3, vector_length=2,
                          codebook_dtype="int8", compensation="hessian")  # fmt: skip
    layer, _ = quantize_layer(W, None, config, None, H)
    module = VQLinear.from_quantized(layer)
    module.backend = backend
    torch.testing.assert_close(module.dequantize(), layer.dequantize())
    x = torch.randn(tokens, layer.spec.in_features)
    tol = 1e-3 if backend == Backend.CPU and tokens == 1 else 1e-4  # int16 tables
    torch.testing.assert_close(module(x), x @ layer.dequantize().T, rtol=tol, atol=tol)


def test_own_int8_codebooks_round_trip_through_the_state_dict():
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    layer, _ = quantize_layer(W, None, plain_config(bits=2, kmeans_iters=3, codebook_dtype="int8"))
    module = VQLinear.from_quantized(layer)
    state = module.state_dict()
    assert state["codebooks_0"].dtype == torch.int8
    assert state["codebook_scales_0"].shape == (layer.spec.sub_vectors,)
    empty = VQLinear(layer.spec, device="meta")
    empty.load_state_dict(state, assign=True)
    torch.testing.assert_close(empty.dequantize(), layer.dequantize(), rtol=0, atol=0)
    cast = empty.to(torch.bfloat16)
    assert cast.codebooks_0.dtype == torch.int8 and cast.codebook_scales_0.dtype == torch.float16


def test_int8_codebooks_are_decoded_once_until_they_change():
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    layer, _ = quantize_layer(W, None, plain_config(bits=2, kmeans_iters=3, codebook_dtype="int8"))
    module = VQLinear.from_quantized(layer)
    first = module.codebooks[0]
    assert module.codebooks[0] is first  # cached
    module.set_codebook(0, torch.zeros_like(first, dtype=torch.float32))
    assert not module.codebooks[0].any()  # the in-place change is seen
