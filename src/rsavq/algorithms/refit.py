"""Refit codebooks and row scales to the layer's output error, codes fixed (GPTVQ's codebook
update, extended to scales).

With codes fixed the weight is linear in the codebooks, `Q = diag(s) D(C)`, so the objective
`tr((T - Q) H (T - Q)^T)` (`H` the damped input Hessian) is a quadratic in `C`: conjugate gradients
with exact line search minimize it. For fixed `C` the best row scales have a closed form,
`s_i = t_i H q_i^T / q_i H q_i^T`. Codebooks and scales alternate; the result is rounded to fp16
and kept only if it lowers the objective.
"""

from __future__ import annotations

import math

import torch

from rsavq.config import LayerSpec

CG_ITERS = 8  # converged to <0.01% of the objective on SmolLM2-sized layers
ROUNDS = 1


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """`H + damp * mean(diag H) I` in fp32; dead channels get `H_ii = 1` (as `inverse_cholesky`)."""
    H = H.float().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    return H


def decode_groups(codes, books, spec: LayerSpec) -> torch.Tensor:
    """`[rows, n]` permuted-order weights (no scales) from unpacked codes `[rows, n_vec, P]`."""
    blocks = []
    for g, (c, b) in enumerate(zip(codes, books, strict=True)):
        parts = [b[p].float()[c[..., p]] for p in range(c.shape[-1])]  # P x [rows, n_vec, d]
        blocks.append(torch.stack(parts, dim=2).reshape(c.shape[0], -1)[:, : spec.group_sizes[g]])
    return torch.cat(blocks, dim=1)


def objective(T: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = T - Q
    return ((E @ H) * E).sum().item()


def _scatter(grad_D: torch.Tensor, codes, books, spec: LayerSpec) -> list[torch.Tensor]:
    """The gradient with respect to each codebook of one with respect to the decoded weights."""
    out, start = [], 0
    v, d = spec.vector_length, spec.sub_dim
    for g, (c, b) in enumerate(zip(codes, books, strict=True)):
        size = spec.group_sizes[g]
        block = grad_D[:, start : start + size]
        block = torch.nn.functional.pad(block, (0, math.ceil(size / v) * v - size))
        block = block.reshape(c.shape[0], c.shape[1], c.shape[2], d)
        grad = torch.zeros(b.shape, dtype=torch.float32)
        for p in range(c.shape[-1]):
            grad[p].index_add_(0, c[..., p].reshape(-1), block[:, :, p].reshape(-1, d))
        out.append(grad)
        start += size
    return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum((x * y).sum().item() for x, y in zip(a, b, strict=True))


def refit_codebooks(T, H, codes, books, s: torch.Tensor, spec: LayerSpec, iters: int = CG_ITERS):
    """Conjugate gradients (Polak-Ribiere, exact line search) on the codebooks, fp32."""
    C = [b.float().clone() for b in books]
    s = s[:, None]

    def gradient(C):
        E = T - s * decode_groups(codes, C, spec)
        return _scatter(-2 * (E @ H) * s, codes, C, spec)

    g = gradient(C)
    direction = [-x for x in g]
    for _ in range(iters):
        dQ = s * decode_groups(codes, direction, spec)
        curvature = ((dQ @ H) * dQ).sum().item()
        slope = _dot(g, direction)
        if curvature <= 0 or slope >= 0:
            break
        alpha = -slope / (2 * curvature)
        C = [c + alpha * x for c, x in zip(C, direction, strict=True)]
        g_new = gradient(C)
        beta = max(0.0, _dot(g_new, [a - b for a, b in zip(g_new, g, strict=True)]) / _dot(g, g))
        direction = [-a + beta * x for a, x in zip(g_new, direction, strict=True)]
        g = g_new
    return C


def refit_scales(T, H, D: torch.Tensor) -> torch.Tensor:
    """Per-row least squares `s_i = t_i H d_i^T / d_i H d_i^T` (1 for a zero row)."""
    DH = D @ H
    den = (DH * D).sum(dim=1)
    num = (T @ H * D).sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))


def refit(T, H, codes, books, scales, spec: LayerSpec, rounds: int = ROUNDS):
    """Refit fp16 `books` (and `scales`, if given) to `tr((T - Q) H (T - Q)^T)`; `T` `[m, n]` and
    `H` in the codes' (permuted) channel order. Returns `(books, scales)`, the better of before
    and after."""
    T, H = T.float(), H.float()
    s = scales.float() if scales is not None else torch.ones(T.shape[0])
    best = (books, scales)
    best_loss = objective(T, s[:, None] * decode_groups(codes, books, spec), H)
    C = books
    for _ in range(rounds):
        C = [c.half() for c in refit_codebooks(T, H, codes, C, s, spec)]
        if scales is not None:
            s = refit_scales(T, H, decode_groups(codes, C, spec)).half().float()
        loss = objective(T, s[:, None] * decode_groups(codes, C, spec), H)
        if loss < best_loss:
            best, best_loss = (C, s.half() if scales is not None else None), loss
    return best
