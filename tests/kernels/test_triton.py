"""The Triton kernels against the reference kernel (the oracle): on a CUDA GPU when there is one,
else on the CPU under `TRITON_INTERPRET=1` (set by conftest)."""

import pytest
import torch

from helpers import KERNEL_SHAPES, random_vq_layer
from rsavq.kernels import Backend, choose_backend, reference, vq_linear

vq_triton = pytest.importorskip("rsavq.kernels.triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(perm, codes, books):
    return perm.to(DEVICE), [c.to(DEVICE) for c in codes], [b.to(DEVICE) for b in books]


@pytest.mark.parametrize("tokens", [1, 5, 8, 9, 70])  # <= 8: GEMV kernel; more: GEMM kernel
@pytest.mark.parametrize(("m", "n", "sizes", "bits", "v", "P"), KERNEL_SHAPES)
def test_triton_matches_reference(tokens, m, n, sizes, bits, v, P):
    spec, perm, codes, books = random_vq_layer(m, n, sizes, bits, v, P, m * n + tokens)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    bias, scales = torch.randn(m), (torch.rand(m) + 0.5).half()
    want = reference.vq_linear(x, codes, books, perm, spec, bias, scales)
    perm_d, codes_d, books_d = on_device(perm, codes, books)
    args = (spec, bias.to(DEVICE), scales.to(DEVICE))
    got = vq_triton.vq_linear(x.to(DEVICE), codes_d, books_d, perm_d, *args)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [2, 33])
def test_half_precision_inputs_and_batch_dims(tokens):
    spec, perm, codes, books = random_vq_layer(24, 36, (18, 18), (3, 2))
    x = torch.randn(2, tokens, 36).half()
    want = reference.vq_linear(x.float(), codes, books, perm, spec)
    perm_d, codes_d, books_d = on_device(perm, codes, books)
    got = vq_triton.vq_linear(x.to(DEVICE), codes_d, books_d, perm_d, spec)
    assert got.shape == (2, tokens, 24) and got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-2, atol=2e-2)


def test_custom_op_has_a_fake_implementation():
    spec, perm, codes, books = random_vq_layer(8, 18, (12, 6), (2, 3))
    x = torch.randn(3, 18)
    torch.library.opcheck(vq_triton.vq_matmul, (x, codes, books, perm.int(), spec.to_json()))
    scales, bias = torch.rand(8).half(), torch.randn(8)
    args = (x, codes, books, perm.int(), spec.to_json(), scales, bias)
    torch.library.opcheck(vq_triton.vq_matmul, args)


def test_pinned_backend_and_cuda_dispatch():
    spec, perm, codes, books = random_vq_layer(8, 12, (12,), (2,))
    x = torch.randn(2, 12)
    want = reference.vq_linear(x, codes, books, perm, spec)
    got = vq_linear(x, codes, books, perm, spec, backend=Backend.TRITON)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert choose_backend(torch.empty(2, 12, device="meta")) != Backend.TRITON
    if torch.cuda.is_available():
        assert choose_backend(x.cuda()) == Backend.TRITON


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    from rsavq.errors import UsageError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec, perm, codes, books = random_vq_layer(8, 12, (12,), (2,))
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        vq_triton.vq_linear(torch.randn(1, 12), codes, books, perm, spec)
