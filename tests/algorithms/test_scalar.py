import pytest
import torch

from rsavq.algorithms.scalar import gptq, minmax_params, rtn, scalar_bits


def test_rtn_levels_and_groups():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 200, generator=gen)
    Q = rtn(W, bits=3, group_size=128)
    for s in (0, 128):  # the last group is short (72 columns)
        block = Q[:, s : s + 128]
        assert all(len(torch.unique(row)) <= 8 for row in block)
    assert (Q - W).abs().max() <= (W.max() - W.min()) / 7


def test_minmax_params_reach_both_ends():
    block = torch.tensor([[-1.0, 0.5, 2.0]])
    scale, zero = minmax_params(block, 2)
    q = torch.clamp(torch.round(block / scale) + zero, 0, 3)
    assert q.min() == 0 and q.max() == 3


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(act_order):
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 96, generator=gen)  # correlated inputs, as real activations are
    X = torch.randn(512, 24, generator=gen) @ mix + 0.1 * torch.randn(512, 96, generator=gen)
    W = torch.randn(32, 96, generator=gen)
    H = 2 * X.T @ X / 512

    def err(Q):
        return ((Q - W) @ X.T).norm()

    assert err(gptq(W, H, 3, 32, act_order)) < 0.7 * err(rtn(W, 3, 32))


def test_scalar_bits_counts_scales_zeros_and_gidx():
    assert scalar_bits((10, 256), 3, 128, False) == 10 * 256 * 3 + 10 * 2 * 19
    assert scalar_bits((10, 256), 3, 128, True) == 10 * 256 * 3 + 10 * 2 * 19 + 32 * 256
    assert scalar_bits((10, 200), 4, 128, False) == 10 * 200 * 4 + 10 * 2 * 20
