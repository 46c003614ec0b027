"""The Fisher accumulator's running means, against the statistics computed directly."""

import pytest
import torch

from rsavq.stats import accumulator
from rsavq.stats.accumulator import FisherAccumulator


def test_batches_give_the_means_of_the_sequences():
    torch.manual_seed(0)
    G = torch.randn(5, 6, 4)
    acc = FisherAccumulator(6, 4)
    acc.add(G[:2])
    acc.add(G[2:])
    s = acc.stats
    assert s.count == 5
    torch.testing.assert_close(s.g, G.mean(0))
    torch.testing.assert_close(s.F_O, torch.einsum("bij,bkj->ik", G, G) / 5)
    torch.testing.assert_close(s.F_I, torch.einsum("bji,bjk->ik", G, G) / 5)
    assert s.sq_norm == pytest.approx(G.square().sum().item() / 5, rel=1e-5)


@pytest.mark.parametrize("amx", [False, True])  # the row blocks of either kind of CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(6, 4), (40, 1600), (900, 30)])
def test_factors_equal_the_float64_products_whatever_the_blocks(m, n, dtype, amx, monkeypatch):
    monkeypatch.setattr(accumulator, "_amx", lambda: amx)
    torch.manual_seed(0)
    G = torch.randn(3, m, n).to(dtype)
    acc = FisherAccumulator(m, n)
    acc.add(G[:1])
    acc.add(G[1:])
    s, G = acc.stats, G.double()
    for F, expected in (
        (s.F_O, torch.einsum("bij,bkj->ik", G, G) / 3),
        (s.F_I, torch.einsum("bji,bjk->ik", G, G) / 3),
    ):  # float32 sums: to 1e-5 of the diagonal's scale
        atol = 1e-5 * expected.diagonal().mean().item()
        torch.testing.assert_close(F.double(), expected, rtol=1e-5, atol=atol)
    assert torch.equal(s.F_O, s.F_O.T) and torch.equal(s.F_I, s.F_I.T)


def _correlated_gradient(m: int, n: int) -> torch.Tensor:
    """One sequence's gradient as real ones look: a dominant rank-one part, rank < n."""
    torch.manual_seed(1)
    u, v = torch.randn(m, 1), torch.randn(1, n) + 4.0
    return (100 * u @ v + torch.randn(m, 8) @ torch.randn(8, n)).bfloat16()


def test_bfloat16_gradients_keep_the_factors_positive_semidefinite():
    G = _correlated_gradient(64, 256)
    acc = FisherAccumulator(64, 256)
    acc.add(G[None])
    eigenvalues = torch.linalg.eigvalsh(acc.stats.F_I.double())
    floor = -1e-6 * eigenvalues.max()  # float32 sums reach ~1e-8 of it
    assert eigenvalues.min() >= floor
    # what the test guards against: the same products rounded to bfloat16 are indefinite
    rounded = (G.T @ G).double()
    assert torch.linalg.eigvalsh(rounded).min() < floor


@pytest.mark.parametrize("amx", [False, True])
def test_few_large_gram_blocks_only_where_bfloat16_products_pay_for_them(amx, monkeypatch):
    monkeypatch.setattr(accumulator, "_amx", lambda: amx)
    assert accumulator._few_blocks(torch.device("cpu")) is amx
    assert accumulator._few_blocks(torch.device("cuda"))
    few, many = accumulator._block_edges(1536, True), accumulator._block_edges(1536, False)
    assert len(few) < len(many)  # (2 and 8 blocks)
