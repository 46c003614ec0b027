"""The reference kernel (the oracle for every faster backend): dequantize, then matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsavq.config import LayerSpec
from rsavq.packing import unpack


def unpack_block(codes: torch.Tensor, spec: LayerSpec, g: int) -> torch.Tensor:
    """Group g's code indices `[rows, n_vec, P]` from its packed words `[rows, words]`."""
    rows = spec.block_shape(g)[0]
    idx = unpack(codes, spec.code_bits(g), spec.codes_per_row(g))  # [rows, n_vec * P]
    return idx.view(rows, -1, spec.sub_vectors)


def decode_vectors(idx: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Decoded sub-vectors `[rows, n_vec, P, sub_dim]` from indices `[rows, n_vec, P]` and
    codebooks `[P, K, sub_dim]`."""
    P, K, d = codebooks.shape
    return codebooks.reshape(P * K, d)[_rows(idx, P, K)]


def _rows(idx: torch.Tensor, P: int, K: int) -> torch.Tensor:
    """Each code's row in the codebooks flattened to `[P * K, d]`."""
    return idx if P == 1 else idx + torch.arange(P, device=idx.device) * K


def weight_index(idx: list[torch.Tensor], perm: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Each weight's position (int32 `[out, in]`, original channel order) in the layer's
    codebooks flattened and concatenated group after group, from each group's indices
    `[rows, n_vec, P]`: the weight is `take(flat codebooks, index)`, one look-up."""
    blocks, offset = [], 0
    for g, i in enumerate(idx):
        P, K, d = spec.codebook_shape(g)
        pos = offset + _rows(i, P, K)[..., None] * d + torch.arange(d, device=i.device)
        blocks.append(vectors_block(pos, spec, g))
        offset += P * K * d
    return unpermute(blocks, perm, spec).int()


def take(flat: torch.Tensor, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`flat[index]` in `dtype` (default: `flat`'s), differentiable in `flat` (block fine-tuning
    and distillation decode every layer at every step this way)."""
    dtype = dtype or flat.dtype
    if flat.requires_grad and torch.is_grad_enabled():
        return _Take.apply(flat, index, dtype)
    return flat.to(dtype).index_select(0, index.view(-1)).view(index.shape)


class _Take(torch.autograd.Function):
    """The look-up, with `flat`'s gradient summed by one `bincount` in float32: the same sums
    as indexing's own backward, which on the CPU accumulates one element at a time and took
    most of a training step."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size, ctx.dtype = flat.numel(), flat.dtype
        return flat.to(dtype).index_select(0, index.view(-1)).view(index.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        sums = torch.bincount(index.view(-1), weights=grad.reshape(-1).float(), minlength=ctx.size)
        return sums.to(ctx.dtype), None, None


def vectors_block(vectors: torch.Tensor, spec: LayerSpec, g: int) -> torch.Tensor:
    """Group g's block `[rows, cols]` from its decoded vectors (the padding columns cut)."""
    rows, cols = spec.block_shape(g)
    return vectors.reshape(rows, -1)[:, :cols]


def decode_block(idx: torch.Tensor, codebooks: torch.Tensor, spec: LayerSpec, g: int):
    """Group g's block `[rows, cols]` from indices `[rows, n_vec, P]` and codebooks
    `[P, K, sub_dim]`."""
    return vectors_block(decode_vectors(idx, codebooks), spec, g)


def dequantize_block(codes: torch.Tensor, codebooks: torch.Tensor, spec: LayerSpec, g: int):
    """Group g's block `[rows, cols]` from packed `codes` `[rows, words]` and `codebooks`."""
    return decode_block(unpack_block(codes, spec, g), codebooks, spec, g)


def unpermute(blocks: list[torch.Tensor], perm: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The weight `[out, in]` in the original channel order from its groups' blocks."""
    permuted = torch.cat(blocks, dim=1)
    W = torch.empty_like(permuted)
    W[:, perm.long()] = permuted
    return W


def dequantize(codes, codebooks, perm: torch.Tensor, spec: LayerSpec, dtype=torch.float32):
    """The layer's weight `[out_features, in_features]` in the original channel order."""
    blocks = [
        dequantize_block(c, cb, spec, g).to(dtype)
        for g, (c, cb) in enumerate(zip(codes, codebooks, strict=True))
    ]
    return unpermute(blocks, perm, spec)


def scale_and_shift(y: torch.Tensor, scales=None, bias=None) -> torch.Tensor:
    """`y * scales + bias` over the output rows (each optional), in `y`'s dtype."""
    if scales is not None:
        y = y * scales.to(y.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None, scales=None):
    """`y = (x W_hat^T) * scales + bias` with `W_hat` dequantized from the codes."""
    return scale_and_shift(
        F.linear(x, dequantize(codes, codebooks, perm, spec, x.dtype)), scales, bias
    )
