import pytest
import torch

from helpers import assert_prefill_close, plain_config, random_vq_layer
from rsavq.algorithms.rsavq import quantize_layer
from rsavq.kernels import cpu
from rsavq.nn import VQLinear, dequantized

SCALES = pytest.mark.parametrize("scales", [False, True], ids=["no-scales", "row-scales"])


def make_module(bias=True, scales=False):
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    W = W * torch.linspace(0.1, 3, 24)[:, None]  # rows of different magnitude
    config = plain_config(bits=2, groups=2, kmeans_iters=3, row_scales=scales)
    layer, _ = quantize_layer(W, None, config, b if bias else None)
    return VQLinear.from_quantized(layer)


@SCALES
def test_forward_is_dequantize_then_matmul(scales):
    module = make_module(scales=scales)
    assert (module.scales is not None) == scales
    x = torch.randn(3, 5, 40)
    expected = x @ module.dequantize().T + module.bias
    assert_prefill_close(module(x), expected, x, module.dequantize())  # 15 tokens: prefill


def test_row_scales_follow_the_rows():
    module = make_module(scales=True)
    norms = module.dequantize().norm(dim=1)
    assert norms[-1] > 10 * norms[0]  # one shared codebook, rows 30x apart in magnitude
    assert module.scales.dtype == torch.float16


@SCALES
def test_casting_keeps_codebooks_fp16(scales):
    module = make_module(scales=scales).to(torch.bfloat16)
    assert all(cb.dtype == torch.float16 for cb in module.codebooks)
    assert not scales or module.scales.dtype == torch.float16
    assert module.bias.dtype == torch.bfloat16
    assert module(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


@SCALES
def test_built_from_spec_alone_then_loaded(scales):
    source = make_module(bias=False, scales=scales)
    empty = VQLinear(source.spec, device="meta")
    assert all(t.is_meta for t in empty.buffers())
    empty.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 40)
    torch.testing.assert_close(empty(x), source(x))


@pytest.mark.parametrize("scales", [False, True])
def test_dequantized_runs_dense_with_the_same_function(scales):
    layer = make_module(bias=True, scales=scales)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.randn(3, 5, layer.in_features)
    expected = model(x)  # 15 tokens: the prefill kernel
    with dequantized(model):
        assert "forward" in vars(layer)  # dense, decoded once
        assert_prefill_close(expected, model(x), x, layer.dequantize())  # ReLU: 1-Lipschitz
        assert model(x.bfloat16()).dtype == torch.bfloat16  # a model cast to bfloat16 runs too
    assert "forward" not in vars(layer)  # the kernel again
    torch.testing.assert_close(model(x), expected)


def test_dequantized_leaves_a_replaced_forward_alone():
    layer = make_module()
    trained = lambda x: x  # noqa: E731  (as `finetune.trainable` replaces it)
    layer.forward = trained
    with dequantized(layer):
        assert layer.forward is trained
    assert layer.forward is trained


def test_a_backend_that_cannot_serve_the_layers_is_refused(monkeypatch):
    from rsavq.errors import UsageError
    from rsavq.kernels import cpu
    from rsavq.nn import set_backend

    model = torch.nn.Sequential(VQLinear(random_vq_layer(8, 12, (12,), (2,))[0]))
    with pytest.raises(UsageError, match="unknown backend 'fast'"):
        set_backend(model, "fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match="needs a CUDA GPU, the model is on cpu"):
        set_backend(model, "triton")
    monkeypatch.setattr(cpu, "available", lambda: False)
    with pytest.raises(UsageError, match="could not be built here"):
        set_backend(model, "cpu")
    assert set_backend(model, "reference") == 1


@pytest.mark.skipif(not cpu.available(), reason="C++ extension cannot be built here")
def test_decode_calls_skip_the_dispatch_and_other_calls_take_it(monkeypatch):
    import rsavq.nn.vq_linear as vq_linear_module

    module = make_module(scales=True)
    dispatched = []
    kernel = vq_linear_module.vq_linear_kernel
    monkeypatch.setattr(
        vq_linear_module,
        "vq_linear_kernel",
        lambda *a, **k: dispatched.append(1) or kernel(*a, **k),
    )
    W = module.dequantize()
    x = torch.randn(2, 3, 80)
    served = [x[:1, :1, :40], x[0, :, :40].contiguous()]  # 1 and 3 tokens
    others = [x[:1, :1, ::2], x[:1, :1, :40].bfloat16(), torch.randn(9, 40)]
    for inputs in served + others:
        y = module(inputs)
        expected = (inputs.float() @ W.T + module.bias).to(inputs.dtype)
        torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)
    assert module._kernel_state["decode"] is not None
    assert len(dispatched) == len(others)
    with pytest.raises(RuntimeError):  # the wrong width reaches a kernel that says so
        module(torch.randn(1, 41))
    module.backend = "reference"  # pinning a backend forgets the bound decode
    module(served[0])
    assert module._kernel_state["decode"] is None and len(dispatched) == len(others) + 2
