"""Running-mean accumulators of per-sequence gradient statistics, one per linear layer."""

from __future__ import annotations

import torch

from rsavq.algorithms.natural_gradient import LayerFisher


class FisherAccumulator:
    """fp32 running means of F_O, F_I, g and ||G||^2 over sequences.

    Each batch updates `mean = (1 - B w) * mean + w * batch_sum` with `w = 1 / (count + B)`,
    which keeps the accumulator at the scale of one sample and is exact in exact arithmetic.
    The symmetric factors are updated on their upper block triangle only (one fused `addmm_`
    per row block) and mirrored when read.
    """

    def __init__(self, m: int, n: int, diag_output: bool = False, device="cpu"):
        f_o_shape = (m,) if diag_output else (m, m)
        self._stats = LayerFisher(
            F_O=torch.zeros(f_o_shape, device=device),
            F_I=torch.zeros(n, n, device=device),
            g=torch.zeros(m, n, device=device),
            sq_norm=0.0,
            count=0,
        )

    @property
    def stats(self) -> LayerFisher:
        """The statistics, with both triangles of F_O and F_I filled."""
        if not self._stats.diag_output:
            mirror_upper(self._stats.F_O)
        mirror_upper(self._stats.F_I)
        return self._stats

    @stats.setter
    def stats(self, value: LayerFisher) -> None:
        self._stats = value

    @property
    def count(self) -> int:
        return self._stats.count

    def add(self, G: torch.Tensor) -> None:
        """Add per-sequence gradients `G` `[B, m, n]` (any float dtype; used in fp32)."""
        G = G.float()
        B, m, n = G.shape
        s = self._stats
        weight = 1.0 / (s.count + B)
        keep = 1.0 - B * weight
        if s.diag_output:
            s.F_O.mul_(keep).add_(G.square().sum(dim=(0, 2)), alpha=weight)
        else:
            rows = G.transpose(0, 1).reshape(m, B * n)  # G_1 | G_2 | ...
            add_gram(s.F_O, rows, keep, weight)
        add_gram(s.F_I, G.reshape(B * m, n).T, keep, weight)  # G_1 over G_2
        s.g.mul_(keep)
        for G_b in G:  # (not G.sum(dim=0): a temporary of one gradient's size)
            s.g.add_(G_b, alpha=weight)
        s.sq_norm = keep * s.sq_norm + weight * squared_norm(G)
        s.count += B


def squared_norm(G: torch.Tensor, rows: int = 1024) -> float:
    """`||G||^2` summed in float64, `rows` rows at a time: `G.square().sum(dtype=float64)`
    would hold G's square and its float64 copy at once, three times G's bytes (0.5 GiB for an
    11008 x 4096 gradient; BENCHMARKS.md, "Weight streaming")."""
    flat = G.reshape(-1, G.shape[-1])
    return sum(part.square().sum(dtype=torch.float64).item() for part in flat.split(rows))


def _block_edges(k: int) -> list[int]:
    parts = 8 if k >= 1024 else 4 if k >= 512 else 2 if k >= 128 else 1
    return [k * i // parts for i in range(parts + 1)]


def add_gram(F: torch.Tensor, A: torch.Tensor, beta: float, alpha: float) -> None:
    """`F = beta * F + alpha * A @ A.T` on the upper block triangle of `F` `[k, k]`, in place."""
    edges = _block_edges(A.shape[0])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        F[lo:hi, lo:].addmm_(A[lo:hi], A[lo:].T, beta=beta, alpha=alpha)


def mirror_upper(F: torch.Tensor) -> None:
    """Copy the upper block triangle (as written by `add_gram`) onto the lower one."""
    edges = _block_edges(F.shape[0])
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        F[hi:, lo:hi] = F[lo:hi, hi:].T
