"""Running-mean accumulators of per-sequence gradient statistics, one per linear layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerFisher:
    """Fisher statistics of one layer (see the glossary in `rsavq.stats`)."""

    F_O: torch.Tensor  # [m, m], or [m] when diag_output
    F_I: torch.Tensor  # [n, n]
    g: torch.Tensor  # [m, n]
    sq_norm: float
    count: int

    @property
    def diag_output(self) -> bool:
        return self.F_O.dim() == 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.g.shape)

    def state(self) -> dict[str, torch.Tensor]:
        return {"F_O": self.F_O, "F_I": self.F_I, "g": self.g}


class FisherAccumulator:
    """fp32 running means of F_O, F_I, g and ||G||^2 over sequences.

    Each batch updates `mean += (batch_sum - B * mean) / (count + B)`, which keeps the accumulator
    at the scale of one sample (no growing sums) and is exact in exact arithmetic.
    """

    def __init__(self, m: int, n: int, diag_output: bool = False, device="cpu"):
        f_o_shape = (m,) if diag_output else (m, m)
        self.stats = LayerFisher(
            F_O=torch.zeros(f_o_shape, device=device),
            F_I=torch.zeros(n, n, device=device),
            g=torch.zeros(m, n, device=device),
            sq_norm=0.0,
            count=0,
        )

    def add(self, G: torch.Tensor) -> None:
        """Add per-sequence gradients `G` `[B, m, n]` (any float dtype; used in fp32)."""
        G = G.float()
        B, m, n = G.shape
        s = self.stats
        weight = 1.0 / (s.count + B)
        if s.diag_output:
            f_o_sum = G.square().sum(dim=(0, 2))  # [m]
        else:
            rows = G.transpose(0, 1).reshape(m, B * n)  # [m, B*n]: G_1 | G_2 | ...
            f_o_sum = rows @ rows.T
        stacked = G.reshape(B * m, n)  # [B*m, n]: G_1 over G_2 over ...
        _update(s.F_O, f_o_sum, B, weight)
        _update(s.F_I, stacked.T @ stacked, B, weight)
        _update(s.g, G.sum(dim=0), B, weight)
        batch_sq = G.square().sum(dtype=torch.float64).item()
        s.sq_norm += (batch_sq - B * s.sq_norm) * weight
        s.count += B


def _update(mean: torch.Tensor, batch_sum: torch.Tensor, B: int, weight: float) -> None:
    mean.add_(batch_sum.sub_(mean, alpha=B), alpha=weight)
