import pytest
import torch

from rsavq.algorithms.obs import column_blocks, inverse_cholesky, obs_quantize


def _problem(m=8, n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, n, generator=gen, dtype=torch.float64)
    X[:, 3] *= 5  # uneven activations
    return torch.randn(m, n, generator=gen, dtype=torch.float64), X.T @ X


def grid(x):
    return torch.round(x * 2) / 2


def brute_force(W, H, segments):
    """Explicit OBS: after each segment J, W_R -= E_J (Hinv_JJ)^-1 Hinv_JR, Hinv over J u R."""
    W, Q = W.clone(), torch.zeros_like(W)
    for s, e in segments:
        Q[:, s:e] = grid(W[:, s:e])
        Hinv = torch.linalg.inv(H[s:, s:])
        J, R = slice(0, e - s), slice(e - s, None)
        W[:, e:] -= (W[:, s:e] - Q[:, s:e]) @ torch.linalg.solve(Hinv[J, J], Hinv[J, R])
    return Q


@pytest.mark.parametrize("block,step", [(20, 1), (8, 1), (6, 3), (12, 4), (7, 7)])
def test_obs_matches_explicit_inverse_updates(block, step):
    W, H = _problem()
    blocks = column_blocks(W.shape[1], block, step)
    Q = obs_quantize(W, inverse_cholesky(H, damp=0.0), blocks, lambda b, k, w: grid(w))
    want = brute_force(W, H, [seg for blk in blocks for seg in blk])
    torch.testing.assert_close(Q.double(), want, atol=1e-5, rtol=0)


def test_column_blocks_cover_every_column_once():
    blocks = column_blocks(10, 4, 3)
    assert blocks == [[(0, 3), (3, 4)], [(4, 7), (7, 8)], [(8, 10)]]


def test_compensation_lowers_output_error():
    W, H = _problem(m=16, n=32, seed=1)
    plain = grid(W)
    Q = obs_quantize(W, inverse_cholesky(H), column_blocks(32, 8), lambda b, k, w: grid(w))

    def err(Wq):
        return torch.trace((Wq.double() - W) @ H @ (Wq.double() - W).T)

    assert err(Q) < 0.8 * err(plain)


def test_dead_columns_are_handled():
    W, H = _problem()
    H[5, :] = 0
    H[:, 5] = 0
    U = inverse_cholesky(H)
    assert torch.isfinite(U).all()
