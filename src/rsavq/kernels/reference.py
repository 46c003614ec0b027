"""The reference kernel (the oracle for every faster backend): dequantize, then matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsavq.config import ChannelAxis, LayerSpec
from rsavq.packing import unpack


def dequantize_block(codes: torch.Tensor, codebooks: torch.Tensor, spec: LayerSpec, g: int):
    """Group g's block `[rows, cols]` from packed `codes` `[rows, words]` and `codebooks`
    `[P, K, sub_dim]`."""
    rows, cols = spec.block_shape(g)
    P = spec.sub_vectors
    idx = unpack(codes, spec.code_bits(g), spec.codes_per_row(g))  # [rows, n_vec * P]
    idx = idx.view(rows, -1, P)  # [rows, n_vec, P]
    parts = [codebooks[p][idx[..., p]] for p in range(P)]  # P x [rows, n_vec, d]
    block = torch.stack(parts, dim=2).reshape(rows, -1)  # [rows, n_vec * v]
    return block[:, :cols]


def dequantize(codes, codebooks, perm: torch.Tensor, spec: LayerSpec, dtype=torch.float32):
    """The layer's weight `[out_features, in_features]` in the original channel order."""
    blocks = [
        dequantize_block(c, cb, spec, g).to(dtype)
        for g, (c, cb) in enumerate(zip(codes, codebooks, strict=True))
    ]
    order = perm.long()
    if spec.axis == ChannelAxis.INPUT.value:
        permuted = torch.cat(blocks, dim=1)
        W = torch.empty_like(permuted)
        W[:, order] = permuted
    else:
        permuted = torch.cat(blocks, dim=0)
        W = torch.empty_like(permuted)
        W[order] = permuted
    return W


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None) -> torch.Tensor:
    """`y = x W_hat^T + bias` with `W_hat` dequantized from the codes."""
    return F.linear(x, dequantize(codes, codebooks, perm, spec, x.dtype), bias)
