"""OBS / GPTQ error compensation over column segments (scalar columns or VQ vectors).

Columns are visited in a given order, segment by segment (one column for scalar GPTQ, `v` columns
for a vector). After a segment `J` is quantized to `Q_J`, the not-yet-quantized columns `R` absorb
its error optimally under `||(W - Q) X||^2`: with `U` the upper Cholesky factor of `H^-1`,
`W_R -= (W_J - Q_J) U_JJ^-1 U_JR` (for one column this is GPTQ's update). Updates to columns past
the current block are applied lazily once per block, as GPTQ does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper `U` with `U^T U = (H + damp * mean(diag H) I)^-1`; dead columns get `H_ii = 1`."""
    H = H.double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def obs_quantize(
    W: torch.Tensor,
    U: torch.Tensor,
    blocks: Sequence[Sequence[tuple[int, int]]],
    quantize: Callable[[int, int, torch.Tensor], torch.Tensor],
    prepare: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Quantize `W` `[m, n]` (columns already in processing order) with error compensation.

    `blocks[b]` lists the block's `(start, end)` column segments, contiguous and in order;
    `prepare(b, W_block)` sees the block's columns with every earlier error absorbed (e.g. to fit a
    codebook or a scale); `quantize(b, k, W_segment)` returns the segment's quantized columns.
    """
    W = W.double().clone()
    U = U.double()
    Q = torch.zeros_like(W)
    for b, segments in enumerate(blocks):
        b0, b1 = segments[0][0], segments[-1][1]
        if prepare is not None:
            prepare(b, W[:, b0:b1].float())
        errors = torch.zeros_like(W[:, b0:b1])
        for k, (s, e) in enumerate(segments):
            q = quantize(b, k, W[:, s:e].float()).double()
            Q[:, s:e] = q
            err = torch.linalg.solve_triangular(U[s:e, s:e], W[:, s:e] - q, upper=True, left=False)
            W[:, e:b1] -= err @ U[s:e, e:b1]
            errors[:, s - b0 : e - b0] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return Q.float()


def column_blocks(n: int, block: int, step: int = 1) -> list[list[tuple[int, int]]]:
    """Blocks of `block` columns cut into segments of `step` (the last ones may be shorter)."""
    return [
        [(s, min(s + step, b1)) for s in range(b0, b1, step)]
        for b0, b1 in ((b0, min(b0 + block, n)) for b0 in range(0, n, block))
    ]
