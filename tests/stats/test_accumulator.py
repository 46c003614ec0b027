"""The Fisher accumulator's running means, against the statistics computed directly."""

import pytest
import torch

from rsavq.stats.accumulator import FisherAccumulator, squared_norm


@pytest.mark.parametrize("rows", [1, 3, 1024])
def test_squared_norm_in_row_chunks_equals_the_whole_sum(rows):
    G = torch.randn(2, 7, 5) * 1e3
    expected = G.square().sum(dtype=torch.float64).item()  # what it replaces, in one go
    assert squared_norm(G, rows=rows) == pytest.approx(expected, rel=1e-12)


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
