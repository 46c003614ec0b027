"""Triton backend: fused dequantize-GEMV (1-8 tokens) and dequantize-GEMM (prefill) on CUDA GPUs.

One kernel, `matmul`, dequantizes `[BLOCK_M, BLOCK_K]` tiles of one group's block straight from
the packed codes and the fp16 codebooks (`dequant_tile`) and never writes the weight to memory:
launched as the GEMV it reduces them against every token with a broadcast sum, as the GEMM it
feeds them to `tl.dot`. The channel permutation is applied on the fly: each group gathers its
columns of `x` through `perm`.
Groups run one launch each, accumulating into one float32 output; the row scales and the bias
are applied as each tile is stored (no separate pass). Registered as the custom op
`rsavq::vq_matmul` with a fake implementation, so `torch.compile` and meta-device loading see its
shape. On the CPU the same kernel runs under `TRITON_INTERPRET=1` (how CI checks it against the
reference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rsavq.config import LayerSpec
from rsavq.errors import UsageError

DECODE_TOKENS = 8  # at most this many tokens use the GEMV kernel


@triton.jit
def dequant_tile(
    codes,
    books,
    r,
    rmask,
    k0,
    cols,
    words,
    K,
    width: tl.constexpr,
    V: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows `r` x columns `k0 + [0, BLOCK_K)` of the group as float32 (0 where masked)."""
    c = k0 + tl.arange(0, BLOCK_K)
    q = c % V
    sub = q // D
    bit = (((c // V) * P + sub) * width).to(tl.int64)
    word, off = bit // 32, bit % 32
    valid = rmask[:, None] & (c < cols)[None, :]
    base = codes + r[:, None].to(tl.int64) * words + word[None, :]
    lo = tl.load(base, mask=valid, other=0).to(tl.uint32, bitcast=True)
    straddle = valid & ((off + width) > 32)[None, :]
    hi = tl.load(base + 1, mask=straddle, other=0).to(tl.uint32, bitcast=True)
    both = lo.to(tl.int64) | (hi.to(tl.int64) << 32)
    idx = (both >> off[None, :]) & ((1 << width) - 1)
    at = (sub[None, :] * K + idx) * D + (q % D)[None, :]
    return tl.load(books + at, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def load_x(x, perm, t, tmask, k0, cols, n, col0, BLOCK_K: tl.constexpr):
    """Tokens `t` x the group's columns k0.. of `x` (through `perm`)."""
    c = k0 + tl.arange(0, BLOCK_K)
    cmask = c < cols
    xc = tl.load(perm + col0 + c, mask=cmask, other=0)
    return tl.load(
        x + t[:, None].to(tl.int64) * n + xc[None, :],
        mask=tmask[:, None] & cmask[None, :],
        other=0.0,
    )


@triton.jit
def store_y(
    out,
    acc,
    scales,
    bias,
    r,
    rmask,
    t,
    tmask,
    out_features,
    ACCUMULATE: tl.constexpr,
    SCALES: tl.constexpr,
    BIAS: tl.constexpr,
):
    """`acc` `[BLOCK_T, BLOCK_M]` into `out` rows `r`, times the row scales and plus the bias
    when asked (the scales distribute over the groups' sums)."""
    if SCALES:
        acc *= tl.load(scales + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    if BIAS:
        acc += tl.load(bias + r, mask=rmask, other=0.0).to(tl.float32)[None, :]
    ptrs = out + t[:, None].to(tl.int64) * out_features + r[None, :]
    mask = tmask[:, None] & rmask[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def matmul(
    x,
    codes,
    books,
    perm,
    scales,
    bias,
    out,
    T,
    n,
    m,
    cols,
    words,
    K,
    col0,
    out_features,
    width: tl.constexpr,
    V: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SCALES: tl.constexpr,
    BIAS: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Each program: a BLOCK_T x BLOCK_M output tile over dequantized weight tiles, reduced by
    `tl.dot` (GEMM, `DOT`) or by a broadcast sum (GEMV: one token block holds every token)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask, rmask = t < T, r < m
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, cols, BLOCK_K):
        xt = load_x(x, perm, t, tmask, k0, cols, n, col0, BLOCK_K)
        w = dequant_tile(codes, books, r, rmask, k0, cols, words, K, width, V, P, D, BLOCK_K)
        if not DOT:
            acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        elif IEEE:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    store_y(
        out, acc, scales, bias, r, rmask, t, tmask, out_features, ACCUMULATE, SCALES, BIAS,
    )  # fmt: skip


def _launch(x, codes, books, perm, scales, bias, out, spec: LayerSpec, g, col0) -> None:
    """One group's contribution to `out` `[T, out_features]` (stored by group 0, added by the
    others), scaled; the bias added once per row (by group 0)."""
    T, n = x.shape
    rows, cols = spec.block_shape(g)
    common = dict(
        width=spec.code_bits(g),
        V=spec.vector_length,
        P=spec.sub_vectors,
        D=spec.sub_dim,
        ACCUMULATE=g > 0,
        SCALES=scales is not None,
        BIAS=bias is not None and g == 0,
    )
    args = (
        x,
        codes,
        books,
        perm,
        _pointer(scales, out),
        _pointer(bias, out),
        out,
        T,
        n,
        rows,
        cols,
    )
    args += (codes.shape[1], books.shape[1])
    args += (col0, spec.out_features)
    ieee = x.dtype == torch.float32
    if T <= DECODE_TOKENS:  # GEMV: one token block, small row blocks
        block_t = max(2, triton.next_power_of_2(T))
        grid = (1, triton.cdiv(rows, 16))
        blocks = dict(DOT=False, IEEE=ieee, BLOCK_T=block_t, BLOCK_M=16, BLOCK_K=128)
    else:
        grid = (triton.cdiv(T, 64), triton.cdiv(rows, 64))
        blocks = dict(DOT=True, IEEE=ieee, BLOCK_T=64, BLOCK_M=64, BLOCK_K=32)
    matmul[grid](*args, **common, **blocks)


@torch.library.custom_op("rsavq::vq_matmul", mutates_args=())
def vq_matmul(
    x: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    perm: torch.Tensor,
    spec_json: str,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[T, in_features]` inputs -> `[T, out_features]` float32 outputs, times the row scales
    and plus the bias when given."""
    spec = LayerSpec.from_json(spec_json)
    out = torch.empty(x.shape[0], spec.out_features, device=x.device, dtype=torch.float32)
    perm = perm.to(torch.int32)
    offset = 0
    for g, (c, cb) in enumerate(zip(codes, codebooks, strict=True)):
        _launch(x, c, cb, perm, scales, bias, out, spec, g, offset)
        offset += spec.group_sizes[g]
    return out


def _pointer(tensor: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """`tensor` as a kernel argument; `out` when there is none (Triton takes a tensor for every
    pointer; the kernel's SCALES/BIAS flag then keeps it unread)."""
    return out if tensor is None else tensor.contiguous()


@vq_matmul.register_fake
def _(x, codes, codebooks, perm, spec_json, scales=None, bias=None):
    return x.new_empty(x.shape[0], LayerSpec.from_json(spec_json).out_features, dtype=torch.float32)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None, scales=None):
    """The kernel contract by the fused Triton kernels."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(
            f"the triton backend needs CUDA tensors (got {x.device.type}); move the model to a "
            "GPU, pick another backend, or set TRITON_INTERPRET=1 to emulate it (slow)"
        )
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = vq_matmul(x2, list(codes), list(codebooks), perm, spec.to_json(), scales, bias)
    return out.to(x.dtype).reshape(*lead, spec.out_features)
