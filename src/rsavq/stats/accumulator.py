"""Accumulators of per-sequence gradient statistics (means over sequences), one per linear layer."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from rsavq.algorithms.natural_gradient import LayerFisher


class FisherAccumulator:
    """fp32 means of F_O, F_I, g and ||G||^2 over sequences.

    While sequences are added the accumulator holds sums (each Gram product added with
    coefficients 1: oneDNN re-creates its matrix product for every new coefficient, which
    doubled the product's time); reading `stats` turns them into means in place, and the next
    `add` back into sums. The symmetric factors are updated on their upper block triangle only
    (one fused `addmm_` per row block) and mirrored when read. Gradients that arrive in
    bfloat16 (passes under autocast) have their Gram products taken on bfloat16 units with
    float32 sums and outputs (oneDNN's bf32 mode on CPUs with bfloat16 instructions, TF32 on
    GPUs): their inputs are exact in bfloat16, so the products equal the float32 ones up to
    summation order and the factors stay positive semi-definite, unlike products rounded to
    bfloat16.
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
        self._sums = False  # whether `_stats` holds sums (while adding) or means

    @property
    def stats(self) -> LayerFisher:
        """The statistics (means), with both triangles of F_O and F_I filled."""
        self._rescale(sums=False)
        if not self._stats.diag_output:
            mirror_upper(self._stats.F_O)
        mirror_upper(self._stats.F_I)
        return self._stats

    @stats.setter
    def stats(self, value: LayerFisher) -> None:
        self._stats, self._sums = value, False

    @property
    def count(self) -> int:
        return self._stats.count

    def _rescale(self, sums: bool) -> None:
        """Sums to means or back; `sq_norm` is read off the mean `F_I`'s trace, which is
        `mean_s ||G_s||^2`."""
        s = self._stats
        if self._sums != sums and s.count:
            scale = float(s.count) if sums else 1.0 / s.count
            for t in (s.F_O, s.F_I, s.g):
                t.mul_(scale)
            if not sums:
                s.sq_norm = s.F_I.diagonal().sum(dtype=torch.float64).item()
        self._sums = sums

    def add(self, G: torch.Tensor) -> None:
        """Add per-sequence gradients `G` `[B, m, n]` (any float dtype; summed in fp32)."""
        reduced = G.dtype == torch.bfloat16  # its values are exact on bfloat16 units
        G = G.float()
        B, m, n = G.shape
        self._rescale(sums=True)
        s = self._stats
        if s.diag_output:
            s.F_O.add_(G.square().sum(dim=(0, 2)))
        else:
            add_gram(s.F_O, G.transpose(0, 1).reshape(m, B * n), reduced)  # G_1 | G_2 | ...
        add_gram(s.F_I, G.reshape(B * m, n).T, reduced)  # G_1 over G_2
        for G_b in G:  # (not G.sum(dim=0): a temporary of one gradient's size)
            s.g.add_(G_b)
        s.count += B


def _block_edges(k: int, few: bool) -> list[int]:
    """Row blocks of the upper block triangle: fewer where each product has a larger fixed
    cost (`_few_blocks`; timed on SmolLM2's and LLaMA-7B's shapes on an AMX CPU: 2 blocks of
    1536 rows, 5 of 4096, 8 of 11008)."""
    if few:
        parts = min(8, max(1, k // 768))
    else:
        parts = 8 if k >= 1024 else 4 if k >= 512 else 2 if k >= 128 else 1
    return [k * i // parts for i in range(parts + 1)]


@contextlib.contextmanager
def _matmul_precision(reduced: bool) -> Iterator[None]:
    """float32 products on bfloat16 (CPU) or TF32 (GPU) units while `reduced`."""
    saved = torch.get_float32_matmul_precision()
    if reduced:
        torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _few_blocks(device: torch.device) -> bool:
    """Whether bfloat16-unit products pay for fewer, larger calls here: on GPUs and on CPUs
    with AMX tiles. Elsewhere (an AMD EPYC, Zen 4, with AVX-512 BF16 and no AMX) they ran at
    the float32 products' speed and, like them, faster in more blocks: SmolLM2's 1536-row
    Gram product 14.9 ms in 8 blocks against 20.1 in 2, one thread."""
    return device.type != "cpu" or _amx()


@functools.cache
def _amx() -> bool:
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # (private in torch 2.13)
    return bool(supported is not None and supported())


def add_gram(F: torch.Tensor, A: torch.Tensor, reduced: bool = False) -> None:
    """`F += A @ A.T` on the upper block triangle of `F` `[k, k]`, in place.

    `reduced`: `A`'s values are exact in bfloat16, so the products may run on bfloat16 units
    (float32 sums and output)."""
    edges = _block_edges(A.shape[0], reduced and _few_blocks(F.device))
    with _matmul_precision(reduced):
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            F[lo:hi, lo:].addmm_(A[lo:hi], A[lo:].T)


def mirror_upper(F: torch.Tensor, chunk: int = 512) -> None:
    """Copy the strict upper triangle onto the lower one (whatever blocks `add_gram` used),
    `chunk` rows at a time (small temporaries)."""
    k = F.shape[0]
    for lo in range(0, k, chunk):
        hi = min(lo + chunk, k)
        F[hi:, lo:hi] = F[lo:hi, hi:].T
        diagonal = F[lo:hi, lo:hi]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
