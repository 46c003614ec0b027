"""The CPU LUT kernel against the reference kernel (the oracle)."""

import pytest
import torch

from helpers import random_vq_layer as random_layer
from rsavq.config import LayerSpec
from rsavq.kernels import Backend, choose_backend, cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ extension cannot be built here")


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize(
    ("m", "n", "sizes", "bits", "v", "P"),
    [
        (16, 24, (12, 12), (2, 1), 6, 2),
        (7, 25, (13, 12), (3, 2), 6, 2),  # ragged: groups not multiples of v
        (33, 50, (20, 15, 10, 5), (4, 3, 2, 1), 6, 2),
        (12, 18, (18,), (5,), 6, 2),  # 15-bit codes straddle words
        (9, 16, (8, 8), (2, 4), 4, 2),
        (5, 12, (12,), (2,), 6, 1),  # full VQ: one sub-vector of 6
    ],
)
def test_lut_matches_reference(tokens, m, n, sizes, bits, v, P):
    spec, perm, codes, books = random_layer(m, n, sizes, bits, v, P, seed=m * n + tokens)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    bias = torch.randn(m)
    want = reference.vq_linear(x, codes, books, perm, spec, bias)
    got = cpu.vq_linear(x, codes, books, perm, spec, bias)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_batch_dims_and_dtype_are_kept():
    spec, perm, codes, books = random_layer(8, 12, (12,), (2,))
    x = torch.randn(2, 1, 12, dtype=torch.bfloat16)
    got = cpu.vq_linear(x, codes, books, perm, spec)
    assert got.shape == (2, 1, 8) and got.dtype == torch.bfloat16
    want = reference.vq_linear(x.float(), codes, books, perm, spec)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_dispatch_by_token_count_and_layout():
    spec, *_ = random_layer(8, 12, (12,), (2,))
    assert choose_backend(torch.randn(1, 12), spec) == Backend.CPU
    assert choose_backend(torch.randn(64, 12), spec) == Backend.REFERENCE  # prefill
    rows = LayerSpec(12, 8, (8,), (2,), 6, 2, "output")
    assert choose_backend(torch.randn(1, 12), rows) == Backend.REFERENCE


def test_custom_op_has_a_fake_implementation():
    spec, perm, codes, books = random_layer(8, 18, (12, 6), (2, 3))
    x = torch.randn(2, 18)
    widths = [spec.code_bits(g) for g in range(2)]
    torch.library.opcheck(cpu.vq_gemv, (x, codes, books, [12, 6], widths, 6, 8))
