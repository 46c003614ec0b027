"""Damped Kronecker-factored Fisher algebra used by the quantizer (docs/method.md sections 1-3).

The layer's Fisher is `F = (F_O (x) F_I) / sq_norm`, so that `trace(F) = sq_norm`, the trace of
the diagonal empirical Fisher. Hence `F^-1 vec(g) = sq_norm * vec(F_O^-1 g F_I^-1)`. Factors are
damped as `F + alpha * mean(diag(F)) * I` and solved with Cholesky, never inverted.
"""

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


def damped(F: torch.Tensor, alpha: float) -> torch.Tensor:
    """`F + alpha * mean(diag F) * I` for a matrix, or the same on a diagonal vector, in float64."""
    F = F.double()
    diag = F if F.dim() == 1 else F.diagonal()
    shift = alpha * diag.mean().clamp_min(torch.finfo(torch.float64).tiny)
    if F.dim() == 1:
        return F + shift
    return F + shift * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)


def solve_left(F: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """`F^-1 B` for a damped SPD matrix `[k, k]` (Cholesky) or a diagonal `[k]`."""
    if F.dim() == 1:
        return B / F[:, None]
    return torch.cholesky_solve(B, torch.linalg.cholesky(F))


def natural_gradient(stats: LayerFisher, alpha: float = 0.01) -> torch.Tensor:
    """`ng = sq_norm * (F_O + d_O I)^-1 g (F_I + d_I I)^-1` `[m, n]`, float32."""
    g = stats.g.double()
    left = solve_left(damped(stats.F_O, alpha), g)  # F_O^-1 g        [m, n]
    both = solve_left(damped(stats.F_I, alpha), left.T).T  # (.) F_I^-1   [m, n]
    return (stats.sq_norm * both).float()


def channel_sensitivity(stats: LayerFisher, alpha: float = 0.01) -> torch.Tensor:
    """Curvature energy per input channel, `I_c = 1/2 g_c^T F_c^-1 g_c`, float64.

    For an input channel c (column of W), `F_c = F_I[c,c] * F_O / sq_norm`, so
    `I_c = sq_norm / (2 F_I[c,c]) * g_c^T F_O^-1 g_c`.
    """
    F_O, F_I, g = damped(stats.F_O, alpha), damped(stats.F_I, alpha), stats.g.double()
    quad = (g * solve_left(F_O, g)).sum(dim=0)  # g_c^T F_O^-1 g_c for every column c   [n]
    return 0.5 * stats.sq_norm * quad / F_I.diagonal()


def fisher_diag_weights(stats: LayerFisher) -> torch.Tensor:
    """Diagonal Fisher metric `F_O[i,i] * F_I[j,j] / sq_norm` `[m, n]`, float32."""
    d_O = stats.F_O if stats.diag_output else stats.F_O.diagonal()
    d_I = stats.F_I.diagonal()
    scale = stats.sq_norm if stats.sq_norm > 0 else 1.0
    return (torch.outer(d_O.double(), d_I.double()) / scale).float()
