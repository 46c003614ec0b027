"""Weighted k-means for (product) vector quantization.

Points `X` `[N, d]` carry per-coordinate weights `w` `[N, d]` (1 for Euclidean, the diagonal
Fisher for the Fisher metric, 0 for padding). The distance of a point to a codeword is
`sum_j w_j (x_j - c_j)^2`; for fixed assignments the best codeword is the per-coordinate weighted
mean of its members (the exact minimizer), so updates are closed-form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 18  # distance-matrix elements at once (cache-sized: ~4x faster than 1<<24)
SEED_POINTS_PER_CENTROID = 32  # k-means++ seeds from at most this many points per codeword


@dataclass(frozen=True)
class KMeansResult:
    centroids: torch.Tensor  # [K, d]
    codes: torch.Tensor  # [N] int64
    loss: float  # weighted squared error
    iterations: int


def _lhs(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w * X, w], dim=1)  # [n, 2d]


def _rhs(C: torch.Tensor) -> torch.Tensor:
    """`[2d, K]`: with `_lhs`, one matmul gives the weighted distances `sum_j w_j (x_j - c_j)^2`
    less each point's constant `sum_j w_j x_j^2` (which does not change the nearest codeword)."""
    return torch.cat([-2 * C, C * C], dim=1).T.contiguous()


def assign(X: torch.Tensor, w: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Nearest codeword of every point under the weighted distance; and the total loss.

    float32 on the CPU: the C++ kernel `nearest` (never writes the `[N, K]` distances; the same
    codes as a matmul and `min` per chunk); elsewhere, or without the extension, chunks of
    `CHUNK_ELEMENTS` distances."""
    lhs, rhs, const = _lhs(X, w), _rhs(C), (w * X * X).sum(dim=1)
    fused = _nearest_kernel(lhs)
    if fused is not None and C.shape[0] > 0:
        codes, best = fused(lhs, rhs)
        return codes, (best + const).clamp_min_(0).sum(dtype=torch.float64).item()
    step = max(16, CHUNK_ELEMENTS // max(1, C.shape[0]))
    codes = torch.empty(X.shape[0], dtype=torch.int64, device=X.device)
    loss = 0.0
    for s in range(0, X.shape[0], step):
        best, idx = (lhs[s : s + step] @ rhs).min(dim=1)
        codes[s : s + step] = idx
        loss += (best + const[s : s + step]).clamp_min_(0).sum(dtype=torch.float64).item()
    return codes, loss


def _nearest_kernel(lhs: torch.Tensor):
    if lhs.device.type != "cpu" or lhs.dtype != torch.float32:
        return None
    from rsavq.kernels.cpu import extension

    module = extension()
    return None if module is None else module.nearest


def update(X: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Per-coordinate weighted means of each codeword's members (empty ones keep their value);
    sums by `bincount` over (codeword, coordinate) bins, ~5x faster than `index_add_` here."""
    K, d = C.shape
    bins = (codes[:, None] * d + torch.arange(d, device=codes.device)).flatten()
    num = torch.bincount(bins, weights=(w * X).flatten(), minlength=K * d).view(K, d).to(C.dtype)
    den = torch.bincount(bins, weights=w.flatten(), minlength=K * d).view(K, d).to(C.dtype)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(C.dtype).tiny), C)


def kmeans_plusplus(
    X: torch.Tensor, w: torch.Tensor, K: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding under the weighted distance, deterministic for a generator.

    Seeds are drawn from a random subset of `SEED_POINTS_PER_CENTROID * K` points (its cost is
    `K` sequential passes, so large layers sample; Lloyd iterations then use every point). Each
    draw is one uniform number against the running sum of the distances, kept coordinate by
    coordinate (`[d, N]`), not `multinomial` over `[N, d]` rows (which draws N numbers per seed)."""
    N, d = X.shape
    mass = w.sum(dim=1)
    if N == 0 or mass.sum() <= 0:
        return torch.zeros(K, d, dtype=X.dtype, device=X.device)
    live = torch.nonzero(mass > 0).flatten()  # padding never seeds
    if len(live) > SEED_POINTS_PER_CENTROID * K:
        pick = torch.randperm(len(live), generator=generator)[: SEED_POINTS_PER_CENTROID * K]
        live = live[pick.to(X.device)]
    X, w = X[live], w[live]
    Xt, wt = X.T.contiguous(), w.T.contiguous()
    centroids = torch.empty(K, d, dtype=X.dtype, device=X.device)
    first = _draw(mass[live], generator)
    centroids[0] = X[first]
    nearest = _distances(Xt, wt, X[first])
    for k in range(1, K):
        if nearest.sum() <= 0:  # every point already coincides with a codeword
            centroids[k:] = centroids[0]
            break
        pick = _draw(nearest, generator)
        centroids[k] = X[pick]
        torch.minimum(nearest, _distances(Xt, wt, X[pick]), out=nearest)
    return centroids


def _draw(mass: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn with probability proportional to `mass` (non-negative, positive sum)."""
    cumulative = mass.double().cumsum(0).cpu()
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    return min(int(torch.searchsorted(cumulative, u, right=True)), len(cumulative) - 1)


def _distances(Xt: torch.Tensor, wt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`sum_j w_j (x_j - c_j)^2` of every point, from coordinate-major `Xt`, `wt` `[d, N]`."""
    out = (Xt[0] - c[0]).square_().mul_(wt[0])
    for j in range(1, len(c)):
        out.addcmul_(wt[j], (Xt[j] - c[j]).square_())
    return out


def kmeans(
    X: torch.Tensor,
    w: torch.Tensor,
    K: int,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> KMeansResult:
    """Weighted k-means with k-means++ init; stops when the loss improves by less than `tol`."""
    generator = generator or torch.Generator().manual_seed(0)
    C = kmeans_plusplus(X, w, K, generator)
    codes, loss = assign(X, w, C)
    iterations = 0
    while iterations < iters:
        iterations += 1
        C = update(X, w, codes, C)
        codes, new_loss = assign(X, w, C)
        converged = loss - new_loss <= tol * max(loss, 1e-30)
        loss = new_loss
        if converged:
            break
    return KMeansResult(C, codes, loss, iterations)
