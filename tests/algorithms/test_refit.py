import torch

from helpers import plain_config
from rsavq.algorithms.refit import damped, decode_groups, objective, refit, refit_codebooks
from rsavq.algorithms.rsavq import make_plan, quantize_layer


def _problem(m=12, n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen)
    X = torch.randn(64, n, generator=gen) @ torch.randn(n, n, generator=gen)
    return W, X.T @ X


def _codes_and_books(W, H, config):
    layer, _ = quantize_layer(W, None, config, hessian=H)
    spec = layer.spec
    from rsavq.packing import unpack

    codes = [
        unpack(c, spec.code_bits(g), spec.codes_per_row(g)).view(
            spec.block_shape(g)[0], -1, spec.sub_vectors
        )
        for g, c in enumerate(layer.codes)
    ]
    return layer, codes


def test_codebook_refit_reaches_the_least_squares_optimum():
    W, H = _problem()
    config = plain_config(bits=2, groups=2, uniform_bits=True, lam=0, kmeans_iters=3)
    layer, codes = _codes_and_books(W, H, config)
    spec, order = layer.spec, layer.perm.long()
    T, Hp = W[:, order], damped(H[order][:, order], 0.01)
    ones = torch.ones(W.shape[0])
    fitted = refit_codebooks(T, Hp, codes, layer.codebooks, ones, spec, iters=200)
    # the same quadratic solved directly: Q = D(C) is linear in the flattened codebooks
    sizes = [b.numel() for b in layer.codebooks]
    basis = []
    for i in range(sum(sizes)):
        flat = torch.zeros(sum(sizes))
        flat[i] = 1
        parts = torch.split(flat, sizes)
        books = [p.view(b.shape) for p, b in zip(parts, layer.codebooks, strict=True)]
        basis.append(decode_groups(codes, books, spec).flatten())
    A = torch.stack(basis, dim=1).double()  # [m * n, params]
    L = torch.linalg.cholesky(Hp.double())
    # ||(T - Q) L||_F^2 = tr((T - Q) H (T - Q)^T): stack rows times L
    M = torch.kron(torch.eye(W.shape[0], dtype=torch.float64), L.T)
    best = torch.linalg.lstsq(M @ A, M @ T.double().flatten(), rcond=None).solution.float()
    direct = [
        p.view(b.shape) for p, b in zip(torch.split(best, sizes), layer.codebooks, strict=True)
    ]
    got = objective(T, decode_groups(codes, fitted, spec), Hp)
    want = objective(T, decode_groups(codes, direct, spec), Hp)
    assert got <= want * (1 + 1e-3) + 1e-6


def test_refit_never_raises_the_objective():
    W, H = _problem(seed=3)
    config = plain_config(
        bits=2, groups=1, uniform_bits=True, lam=0, kmeans_iters=5, row_scales=True
    )
    layer, codes = _codes_and_books(W, H, config)
    order = layer.perm.long()
    T, Hp = W[:, order], damped(H[order][:, order], 0.01)
    s = layer.scales.float()[:, None]
    before = objective(T, s * decode_groups(codes, layer.codebooks, layer.spec), Hp)
    books, scales = refit(T, Hp, codes, layer.codebooks, layer.scales, layer.spec)
    after = objective(T, scales.float()[:, None] * decode_groups(codes, books, layer.spec), Hp)
    assert after <= before
    assert scales.dtype == torch.float16 and all(b.dtype == torch.float16 for b in books)


def test_plan_splits_groups_into_blocks():
    W = torch.randn(64, 200)
    config = plain_config(bits=2, groups=2, uniform_bits=True, block_size=36)
    spec, _ = make_plan(W, None, config)
    # the two WCSG groups are cut in whole words' worth of columns (96 + 104), then into blocks
    assert spec.group_sizes == (36, 36, 24, 36, 36, 32)
    auto = plain_config(bits=2, groups=1, uniform_bits=True, codebook_overhead=2.0)
    spec, _ = make_plan(W, None, auto)  # 2 x 64-entry x 3-dim fp16 books = 6144 bits per block
    # 4 = 64 * 200 * 2.0 // 6144 blocks of 48 columns (8 vectors of two 6-bit codes: 3 words),
    # the last one also taking the 8 columns left over
    assert spec.group_sizes == (48, 48, 48, 56)
