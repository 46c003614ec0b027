import torch

from rsavq.algorithms.rsavq import quantize_layer
from rsavq.config import RSAVQConfig
from rsavq.nn import VQLinear


def make_module(bias=True):
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    layer, _ = quantize_layer(
        W, None, RSAVQConfig(bits=2, groups=2, kmeans_iters=3), b if bias else None
    )
    return VQLinear.from_quantized(layer)


def test_forward_is_dequantize_then_matmul():
    module = make_module()
    x = torch.randn(3, 5, 40)
    expected = x @ module.dequantize().T + module.bias
    torch.testing.assert_close(module(x), expected)


def test_casting_keeps_codebooks_fp16():
    module = make_module().to(torch.bfloat16)
    assert all(cb.dtype == torch.float16 for cb in module.codebooks)
    assert module.bias.dtype == torch.bfloat16
    assert module(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_built_from_spec_alone_then_loaded():
    source = make_module(bias=False)
    empty = VQLinear(source.spec, device="meta")
    assert all(t.is_meta for t in empty.buffers())
    empty.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 40)
    torch.testing.assert_close(empty(x), source(x))
