from dataclasses import replace

import pytest
import torch

from helpers import plain_config
from rsavq.algorithms.metrics import first_order_term
from rsavq.algorithms.rsavq import layer_bits, make_plan, quantize_layer
from rsavq.config import Compensation, EdsgSign, RSAVQConfig
from rsavq.errors import UsageError
from rsavq.kernels import dequantize
from rsavq.modules import find_linears
from rsavq.nn import VQLinear
from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators


def random_weight(m, n, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 2.5, 3])
def test_stored_bits_equal_accounting_and_fit_the_budget(bits):
    W = random_weight(128, 384)
    config = plain_config(bits=bits, groups=4, kmeans_iters=3, budget_includes_overhead=True)
    layer, _ = quantize_layer(W, None, config)
    stored = layer.stored_bits()
    assert stored == layer_bits(layer.spec)
    assert stored / W.numel() <= bits  # codebooks and permutation included


@pytest.mark.parametrize(("m", "n", "groups"), [(16, 50, 4), (7, 33, 3), (10, 12, 1)])
def test_ragged_shapes_are_padded_not_dropped(m, n, groups):
    W = random_weight(m, n, seed=m + n)
    config = plain_config(
        bits=4,
        groups=groups,
        uniform_bits=True,
        max_group_bits=4,
        kmeans_iters=5,
    )
    layer, _ = quantize_layer(W, None, config)
    W_hat = VQLinear.from_quantized(layer).dequantize()
    assert W_hat.shape == W.shape
    assert sum(layer.spec.group_sizes) == n
    # with at least as many codewords as points per codebook, every weight is reproduced
    torch.testing.assert_close(W_hat, W, atol=2e-3, rtol=1e-3)


def test_deterministic_for_a_seed():
    W = random_weight(32, 96)
    a, _ = quantize_layer(W, None, plain_config(bits=2, groups=2, kmeans_iters=4))
    b, _ = quantize_layer(W, None, plain_config(bits=2, groups=2, kmeans_iters=4))
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.codebooks, b.codebooks, strict=True))


def test_error_decreases_with_bits():
    W = random_weight(64, 192)
    errors = []
    for bits in (1, 2, 3):
        config = plain_config(bits=bits, groups=1, uniform_bits=True, kmeans_iters=10)
        layer, _ = quantize_layer(W, None, config)
        W_hat = VQLinear.from_quantized(layer).dequantize()
        errors.append(((W_hat - W).norm() / W.norm()).item())
    assert errors[0] > errors[1] > errors[2]


@pytest.fixture(scope="module")
def tiny_gradients():
    """Real Fisher statistics of a small random LLaMA (layers large enough to quantize)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).eval()
    layers = find_linears(model)
    windows = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    accs = make_accumulators(layers, False, "cpu")
    collect_fisher(model, windows, layers, accs, CollectOptions(progress=False))
    return layers, {name: acc.stats for name, acc in accs.items()}


def first_order_total(layers, stats, **overrides):
    config = plain_config(
        bits=2,
        groups=1,
        uniform_bits=True,
        kmeans_iters=10,
        budget_includes_overhead=False,
        **overrides,
    )
    total = 0.0
    for name, layer in layers.items():
        quantized, _ = quantize_layer(layer.weight, stats[name], config)
        E = VQLinear.from_quantized(quantized).dequantize() - layer.weight.detach()
        total += first_order_term(stats[name], E)
    return total


def test_edsg_descent_sign_lowers_the_first_order_loss(tiny_gradients):
    layers, stats = tiny_gradients
    descent = first_order_total(layers, stats, lam=0.05)
    none = first_order_total(layers, stats, lam=0.0)
    flipped = first_order_total(layers, stats, lam=0.05, edsg_sign=EdsgSign.PAPER)
    assert descent < 0
    assert descent < none < flipped


def _correlated_inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, n // 3, generator=gen) @ torch.randn(n // 3, n, generator=gen)
    return X + 0.1 * torch.randn(256, n, generator=gen)


@pytest.mark.parametrize("n,groups", [(48, 2), (50, 3)])
def test_hessian_compensation_lowers_output_error(n, groups):
    W = random_weight(96, n)  # enough rows that the 64-entry codebooks do not fit every point
    X = _correlated_inputs(n)
    H = X.T @ X
    base = plain_config(bits=2, groups=groups, lam=0, uniform_bits=True, kmeans_iters=5)
    comp = replace(base, compensation=Compensation.HESSIAN)

    def output_error(config):
        layer, _ = quantize_layer(W, None, config, hessian=H)
        W_hat = dequantize(layer.codes, layer.codebooks, layer.perm, layer.spec)
        return ((W_hat - W) @ X.T).norm() / (W @ X.T).norm(), layer

    plain_err, _ = output_error(base)
    comp_err, layer = output_error(comp)
    refit_err, _ = output_error(replace(comp, refit=True))
    assert comp_err < 0.8 * plain_err
    assert refit_err < 0.8 * comp_err
    assert layer.stored_bits() == layer_bits(layer.spec)


def test_compensation_needs_its_hessian():
    W = random_weight(6, 12)
    with pytest.raises(UsageError, match="input Hessians"):
        quantize_layer(W, None, RSAVQConfig(compensation=Compensation.HESSIAN, lam=0))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_stored_bits_fit_the_widths_on_smollm2_shapes(bits):
    """Everything stored (codes, per-block codebooks, scales, permutation) <= bits + 0.15 over a
    SmolLM2-135M decoder block's seven linears (out x in)."""
    from rsavq.algorithms.rsavq import split_blocks
    from rsavq.config import LayerSpec, preset

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    config = preset("default", bits)
    stored = 0
    for m, n in shapes:
        sizes, group_bits = split_blocks([n], [bits], m, config)
        spec = LayerSpec(n, m, tuple(sizes), tuple(group_bits), config.vector_length, 1)
        stored += layer_bits(LayerSpec(**{**spec.to_dict(), "row_scales": True}))
    assert stored / sum(m * n for m, n in shapes) <= bits + 0.15


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_code_budget_holds_with_blocks(bits):
    """`--budget codes`: the code bits of every block together stay within `bits` per weight
    (one WCSG group with many blocks must not be priced as its first block only)."""
    from rsavq.config import preset

    spec, _ = make_plan(random_weight(1536, 576), None, preset("default", bits))
    assert len(spec.group_sizes) > 1
    sizes, group_bits = spec.group_sizes, spec.group_bits
    assert sum(1536 * n * b for n, b in zip(sizes, group_bits, strict=True)) <= bits * 1536 * 576
    assert set(spec.group_bits) == {bits}


@pytest.mark.parametrize("name", ["default", "paper"])
def test_wcsg_groups_fill_whole_words(name):
    """Four groups of a 576-channel layer are cut in whole words' worth of columns, so no row of
    any block pads its last word (4 x 144 columns padded 0.078 bits/weight at 3 bits)."""
    from rsavq.config import preset
    from rsavq.packing import packed_words

    gen = torch.Generator().manual_seed(0)
    stats_free = preset(name, 3, groups=4, uniform_bits=False, order="hessian")
    H = torch.diag(torch.rand(576, generator=gen, dtype=torch.float64) ** 4 + 0.01)
    spec, _ = make_plan(random_weight(576, 576), None, stats_free, hessian=H)
    assert len(set(spec.group_bits)) > 1  # the groups got different widths
    for g in range(len(spec.group_sizes)):
        width, codes = spec.code_bits(g), spec.codes_per_row(g)
        assert packed_words(codes, width) * 32 == codes * width
