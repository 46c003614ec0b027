import pytest
import torch

from rsavq.config import LayerSpec
from rsavq.kernels import Backend, dequantize, vq_linear
from rsavq.kernels.reference import take, weight_index
from rsavq.packing import pack


def naive_dequantize(idx, codebooks, perm, spec):
    """Element-by-element reconstruction from unpacked codes (the definition)."""
    W = torch.zeros(spec.out_features, spec.in_features)
    start = 0
    for g, size in enumerate(spec.group_sizes):
        rows, cols = spec.block_shape(g)
        block = torch.zeros(rows, spec.n_vectors(g) * spec.vector_length)
        for r in range(rows):
            for j in range(spec.n_vectors(g)):
                for p in range(spec.sub_vectors):
                    code = idx[g][r, j * spec.sub_vectors + p]
                    lo = j * spec.vector_length + p * spec.sub_dim
                    block[r, lo : lo + spec.sub_dim] = codebooks[g][p, code].float()
        W[:, perm[start : start + size].long()] = block[:, :cols]
        start += size
    return W


@pytest.mark.parametrize(
    ("m", "n", "sizes", "bits"),
    [(5, 12, (6, 6), (2, 1)), (4, 13, (7, 6), (3, 2)), (9, 7, (7,), (4,))],
)
def test_dequantize_matches_definition(m, n, sizes, bits):
    spec = LayerSpec(n, m, sizes, bits, 6, 2)
    gen = torch.Generator().manual_seed(m * n)
    perm = torch.randperm(n, generator=gen).to(spec.perm_dtype)
    idx, packed, books = [], [], []
    for g in range(len(spec.group_sizes)):
        rows = spec.block_shape(g)[0]
        codes = torch.randint(
            0, 2 ** spec.code_bits(g), (rows, spec.codes_per_row(g)), generator=gen
        )
        idx.append(codes)
        packed.append(pack(codes, spec.code_bits(g)))
        books.append(torch.randn(2, 2 ** spec.code_bits(g), 3, generator=gen).half())
    W = dequantize(packed, books, perm, spec)
    torch.testing.assert_close(W, naive_dequantize(idx, books, perm, spec))
    vectors = [i.view(i.shape[0], -1, spec.sub_vectors) for i in idx]
    flat = torch.cat([b.float().reshape(-1) for b in books])
    torch.testing.assert_close(take(flat, weight_index(vectors, perm, spec)), W)
    x = torch.randn(3, n, generator=gen)
    y = vq_linear(x, packed, books, perm, spec, backend=Backend.REFERENCE)
    torch.testing.assert_close(y, x @ W.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_take_gradient_equals_indexing(dtype):
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(40, generator=gen, requires_grad=True)
    index = torch.randint(0, 30, (7, 9), generator=gen).int()  # some entries never used
    upstream = torch.randn(7, 9, generator=gen).to(dtype)
    out = take(flat, index, dtype)
    assert out.dtype == dtype
    (out * upstream).sum().backward()
    assert flat.grad.dtype == torch.float32
    plain = flat.detach().clone().requires_grad_(True)
    (plain[index.long()] * upstream.float()).sum().backward()  # the sums, in float32
    torch.testing.assert_close(out, plain.to(dtype)[index.long()])
    torch.testing.assert_close(flat.grad, plain.grad, rtol=1e-5, atol=1e-5)
