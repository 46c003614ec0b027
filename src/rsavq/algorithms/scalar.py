"""Scalar baselines: round-to-nearest and GPTQ, asymmetric, one scale and zero per group of columns.

Layout counted in `scalar_bits` (as GPTQ/AutoGPTQ checkpoints store it): `bits`-bit codes, per row
and group an fp16 scale and a `bits`-bit zero point, and with act-order an int32 group index per
input column.
"""

from __future__ import annotations

import torch

from rsavq.algorithms.obs import column_blocks, inverse_cholesky, obs_quantize


def minmax_params(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp16 scale and integer zero point of a `[m, g]` block (min/max, asymmetric)."""
    lo, hi = block.amin(dim=1, keepdim=True), block.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    return scale, zero


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def rtn(W: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest with per-row, per-group min/max scales (the last group may be short)."""
    W = W.detach().float()
    out = torch.empty_like(W)
    for s in range(0, W.shape[1], group_size):
        block = W[:, s : s + group_size]
        out[:, s : s + group_size] = fake_quantize(block, *minmax_params(block, bits), bits)
    return out


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    act_order: bool = True,
    damp: float = 0.01,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022): columns in act-order (descending `diag H`), groups of
    `group_size` consecutive processed columns, each group's scales fitted when it is reached."""
    W = W.detach().float()
    n = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    params: dict[int, tuple] = {}

    def prepare(b, block):
        params[b] = minmax_params(block, bits)

    def quantize(b, k, column):
        scale, zero = params[b]
        return fake_quantize(column, scale, zero, bits)

    U = inverse_cholesky(H[perm][:, perm], damp)
    Q = obs_quantize(W[:, perm], U, column_blocks(n, group_size), quantize, prepare)
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


def scalar_bits(shape: tuple[int, int], bits: int, group_size: int, act_order: bool) -> int:
    """Stored bits of a GPTQ-format layer: codes, fp16 scales, packed zeros, int32 g_idx."""
    m, n = shape
    groups = -(-n // group_size)
    return m * n * bits + m * groups * (16 + bits) + (32 * n if act_order else 0)
