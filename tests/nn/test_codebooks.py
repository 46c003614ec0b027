"""Stored codebooks (fp16, int8 with scales) and the block-shared `SharedCodebooks` module."""

import pytest
import torch

from helpers import plain_config
from rsavq.algorithms.rsavq import fit_shared_codebooks, quantize_layer
from rsavq.kernels import Backend, cpu
from rsavq.nn import SharedCodebooks, VQLinear
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


def _block_layers(dtype):
    """Two layers of one 'block' quantized against shared codebooks, and their module."""
    gen = torch.Generator().manual_seed(0)
    Ws = [torch.randn(24, 40, generator=gen), torch.randn(16, 24, generator=gen)]
    Hs = [(X := torch.randn(64, W.shape[1], generator=gen)).T @ X for W in Ws]
    config = plain_config(
        bits=2, groups=2, kmeans_iters=3, vector_length=2, codebook_scope="block",
        codebook_dtype=dtype, compensation="hessian",
    )  # fmt: skip
    shared = fit_shared_codebooks(
        [(W, None, config, H) for W, H in zip(Ws, Hs, strict=True)], "block.books", config
    )
    pairs = zip(Ws, Hs, strict=True)
    layers = [quantize_layer(W, None, config, None, H, shared)[0] for W, H in pairs]
    holder = SharedCodebooks(dtype)
    for layer in layers:
        for g, b in enumerate(layer.spec.group_bits):
            holder.add(b, layer.spec.codebook_shape(g))
            holder.set(b, layer.codebooks[g])
    return shared, layers, holder


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_layers_of_a_block_read_one_codebook_per_width(dtype):
    shared, layers, holder = _block_layers(dtype)
    for layer in layers:
        assert not any(k.startswith("codebook") for k in layer.tensors())
        for g, b in enumerate(layer.spec.group_bits):
            assert torch.equal(layer.codebooks[g], shared.books[b])
    charged = sum(layer.shared_bits for layer in layers)
    assert charged == pytest.approx(sum(t.numel() * t.element_size() * 8 for t in holder.buffers()))
    assert holder.widths() == sorted(shared.books)
    assert all(t.dtype == (torch.int8 if dtype == "int8" else torch.float16)
               for n, t in holder.named_buffers() if n.startswith("codebooks_"))  # fmt: skip


BACKENDS = [Backend.REFERENCE] + ([Backend.CPU] if cpu.available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 12])
def test_shared_int8_modules_match_dequantize_on_every_backend(backend, tokens):
    _, layers, holder = _block_layers("int8")
    for layer in layers:
        module = VQLinear.from_quantized(layer, holder)
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


def test_an_untied_shared_layer_says_how_to_load_it():
    _, layers, _ = _block_layers("float16")
    module = VQLinear(layers[0].spec)
    with pytest.raises(RuntimeError, match="not tied"):
        module.dequantize()


def test_shared_module_keeps_its_dtypes_when_the_model_is_cast():
    holder = SharedCodebooks("int8")
    holder.add(2, (1, 16, 2))
    holder.set(2, torch.randn(1, 16, 2))
    before = holder.codebook(2)
    holder.to(torch.bfloat16)
    assert holder.codebooks_b2.dtype == torch.int8
    assert holder.codebook_scales_b2.dtype == torch.float16
    assert torch.equal(holder.codebook(2), before)


def test_fallback_keeps_own_codebooks_where_the_shared_ones_fail_and_charges_the_share():
    gen = torch.Generator().manual_seed(3)
    typical = torch.randn(64, 80, generator=gen)
    odd = torch.randn(64, 80, generator=gen).sign() * (
        1 + 0.01 * torch.randn(64, 80, generator=gen)
    )
    H = (X := torch.randn(160, 80, generator=gen)).T @ X
    options = dict(bits=2, kmeans_iters=3, vector_length=4, codebook_scope="block",
                   compensation="hessian", uniform_bits=True)  # fmt: skip
    config = plain_config(**options)
    shared = fit_shared_codebooks([(typical, None, config, H)] * 3, "block.books", config)
    plain, _ = quantize_layer(odd, None, config, None, H, shared)
    fallback = plain_config(**options, codebook_fallback=1.25)
    kept, _ = quantize_layer(odd, None, fallback, None, H, shared)
    assert plain.spec.codebook_source == "block.books" and kept.spec.codebook_source == ""
    assert kept.shared_bits == plain.shared_bits > 0
    own_bits = sum(t.numel() * t.element_size() * 8 for k, t in kept.tensors().items()
                   if k.startswith("codebook"))  # fmt: skip
    assert kept.stored_bits() > plain.stored_bits() and own_bits > 0
    usual, _ = quantize_layer(typical, None, fallback, None, H, shared)
    assert usual.spec.codebook_source == "block.books"  # the shared codebooks serve it


def test_int8_codebooks_are_decoded_once_until_they_change():
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    layer, _ = quantize_layer(W, None, plain_config(bits=2, kmeans_iters=3, codebook_dtype="int8"))
    module = VQLinear.from_quantized(layer)
    first = module.codebooks[0]
    assert module.codebooks[0] is first  # cached
    module.set_codebook(0, torch.zeros_like(first, dtype=torch.float32))
    assert not module.codebooks[0].any()  # the in-place change is seen


def test_a_layer_sees_shared_codebooks_changed_through_another_layer():
    _, layers, holder = _block_layers("int8")
    first, second = (VQLinear.from_quantized(layer, holder) for layer in layers[:2])
    x = torch.randn(3, second.in_features)
    before = second(x)
    g = next(g for g, b in enumerate(first.spec.group_bits) if b in second.spec.group_bits)
    first.set_codebook(g, 2 * first.codebooks[g].float())  # the shared book both layers read
    assert not torch.allclose(second(x), before)
