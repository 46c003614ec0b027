"""A discrete step on the codes of a quantized block (docs/method.md section 9), after
PV-tuning's "V step": a local quadratic model of the loss around the decoded vectors (the mean
gradient `g` and a diagonal curvature `h`) predicts the change of moving a vector to any
codeword, `g . D + 1/2 h . D^2` for the move `D`; each vector's best codeword is the one nearest
its Newton target `decoded - g / h` in the `h`-weighted distance, and the codes whose move
lowers the predicted loss most change, at most a fraction of them per step.
"""

from __future__ import annotations

import torch


def code_step(
    idx: torch.Tensor, books: torch.Tensor, grad: torch.Tensor, curvature: torch.Tensor,
    fraction: float,
) -> int:  # fmt: skip
    """Update `idx` `[rows, n_vec, P]` in place; returns how many codes changed.

    `books` `[P, K, d]` are the codebooks; `grad` and `curvature` `[rows, n_vec, P, d]` the
    loss gradient on the decoded vectors and a positive diagonal curvature (the empirical
    Fisher: the mean squared gradient, times the tokens it was averaged over)."""
    h = curvature.clamp_min(1e-30)
    gains, candidates = [], []
    for p in range(books.shape[0]):
        book, hp = books[p], h[..., p, :]  # [K, d], [rows, n_vec, d]
        old = book[idx[..., p]]
        target = old - grad[..., p, :] / hp
        # h-weighted squared distance from every target to every codeword: [rows, n_vec, K]
        dist = (hp * target.square()).sum(-1, keepdim=True) - 2 * (hp * target) @ book.T
        dist = dist + hp @ book.square().T
        new = dist.argmin(-1)
        moved = book[new] - old
        gains.append((grad[..., p, :] * moved + 0.5 * hp * moved.square()).sum(-1))
        candidates.append(new)
    gain, new = torch.stack(gains, -1), torch.stack(candidates, -1)  # [rows, n_vec, P]
    helps = (gain < 0) & (new != idx)
    count = min(int(fraction * idx.numel()), int(helps.sum()))
    if count == 0:
        return 0
    chosen = torch.where(helps, gain, torch.zeros_like(gain)).flatten().topk(count, largest=False)
    flat = idx.view(-1)
    flat[chosen.indices] = new.view(-1)[chosen.indices]
    return count
