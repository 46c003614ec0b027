import pytest
import torch

from rsavq.algorithms.natural_gradient import (
    LayerFisher,
    channel_sensitivity,
    damped,
    fisher_diag_weights,
    natural_gradient,
)


def random_stats(m=4, n=3, samples=6, seed=0, rank_deficient_output=False):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(samples, m, n, generator=gen, dtype=torch.float64)
    F_O = torch.einsum("smn,skn->mk", G, G) / samples
    if rank_deficient_output:
        v = torch.randn(m, 1, generator=gen, dtype=torch.float64)
        F_O = v @ v.T
    F_I = torch.einsum("smn,smk->nk", G, G) / samples
    sq = G.square().sum(dim=(1, 2)).mean().item()
    return LayerFisher(F_O.float(), F_I.float(), G.mean(0).float(), sq, samples)


def dense_fisher(stats, alpha):
    return torch.kron(damped(stats.F_O, alpha), damped(stats.F_I, alpha)) / stats.sq_norm


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_natural_gradient_equals_dense_kronecker_solve(rank_deficient):
    stats = random_stats(rank_deficient_output=rank_deficient)
    F = dense_fisher(stats, 0.01)
    expected = torch.linalg.solve(F, stats.g.double().flatten()).view(stats.g.shape)
    ng = natural_gradient(stats, alpha=0.01)
    assert torch.isfinite(ng).all()
    torch.testing.assert_close(ng.double(), expected, rtol=1e-4, atol=1e-6)


def test_trace_normalization_equals_diagonal_fisher_trace():
    stats = random_stats(m=5, n=4, samples=7, seed=2)
    F = torch.kron(stats.F_O.double(), stats.F_I.double()) / stats.sq_norm
    # trace of the diagonal empirical Fisher = mean_s ||G_s||_F^2
    assert F.trace().item() == pytest.approx(stats.sq_norm, rel=1e-5)


def test_damping_makes_singular_factor_positive_definite():
    singular = torch.zeros(3, 3)
    singular[0, 0] = 2.0
    torch.linalg.cholesky(damped(singular, 0.01))  # must not raise
    assert damped(singular, 0.5).diagonal().tolist() == pytest.approx([2 + 1 / 3, 1 / 3, 1 / 3])


def test_channel_sensitivity_matches_dense_channel_block():
    stats = random_stats(m=4, n=5, samples=8, seed=4)
    alpha = 0.05
    F_O, F_I = damped(stats.F_O, alpha), damped(stats.F_I, alpha)
    got = channel_sensitivity(stats, alpha)
    g = stats.g.double()
    for c in range(stats.shape[1]):
        block, vec = F_I[c, c] * F_O / stats.sq_norm, g[:, c]
        expected = 0.5 * vec @ torch.linalg.solve(block, vec)
        assert got[c].item() == pytest.approx(expected.item(), rel=1e-6)


def test_fisher_diag_weights():
    stats = random_stats()
    weights = fisher_diag_weights(stats)
    i, j = 2, 1
    expected = stats.F_O[i, i] * stats.F_I[j, j] / stats.sq_norm
    assert weights.shape == stats.shape and weights[i, j].item() == pytest.approx(expected.item())
