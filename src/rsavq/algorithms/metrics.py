"""Per-layer quality measures of a quantized weight `W_hat` against `W`."""

from __future__ import annotations

import torch

from rsavq.algorithms.natural_gradient import LayerFisher


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """`||W_hat - W||_F / ||W||_F`."""
    return ((W_hat - W).norm() / W.norm().clamp_min(1e-30)).item()


def fisher_error(stats: LayerFisher, E: torch.Tensor) -> float:
    """`vec(E)^T F vec(E)` with `F = (F_O (x) F_I) / sq_norm` (undamped) = tr(E^T F_O E F_I)/s."""
    E = E.double()
    F_O, F_I = stats.F_O.double(), stats.F_I.double()
    left = F_O[:, None] * E if stats.diag_output else F_O @ E
    return ((E * (left @ F_I)).sum() / max(stats.sq_norm, 1e-30)).item()


def first_order_term(stats: LayerFisher, E: torch.Tensor) -> float:
    """`g . (W_hat - W)`: the first-order change of the calibration loss (negative is good)."""
    return (stats.g.double() * E.double()).sum().item()


def layer_metrics(W: torch.Tensor, W_hat: torch.Tensor, stats: LayerFisher | None) -> dict:
    W, W_hat = W.detach().float().cpu(), W_hat.detach().float().cpu()
    E = W_hat - W
    metrics = {"relative_error": relative_error(W, W_hat)}
    if stats is not None:
        metrics["fisher_error"] = fisher_error(stats, E)
        metrics["first_order"] = first_order_term(stats, E)
    return metrics
