"""CPU backend: a lookup-table GEMV for decode (AQLM's trick), as a small C++ extension.

Per group, the input's sub-vectors are dotted with every codeword once (`lut` `[T, J, K]`); each
output is then a sum of `J` table entries picked by the packed codes, read straight from the
int32 words. The extension is compiled on first use (g++ and ninja; cached by torch under
`~/.cache/torch_extensions`); when that fails, `available()` is False and dispatch uses the
reference kernel.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rsavq.config import ChannelAxis, LayerSpec

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "lut_gemv.cpp"
_extension = None
_failed = False


def extension():
    """The compiled extension module, or None when it cannot be built here."""
    global _extension, _failed
    if _extension is None and not _failed:
        try:
            from torch.utils.cpp_extension import load

            _extension = load(
                name="rsavq_lut_gemv",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # compiler or ninja missing: fall back, say why once
            _failed = True
            logger.warning("CPU LUT kernel unavailable (%s); using the reference kernel", exc)
    return _extension


def available() -> bool:
    return extension() is not None


@torch.library.custom_op("rsavq::lut_gemv", mutates_args=())
def lut_gemv(lut: torch.Tensor, codes: torch.Tensor, width: int, rows: int) -> torch.Tensor:
    """`out[t, r] = sum_j lut[t, j, code(r, j)]` with codes `[rows, words]` packed at `width`."""
    out = torch.zeros(lut.shape[0], rows, dtype=torch.float32)
    extension().lut_gemv_(lut.contiguous(), codes.contiguous(), width, out)
    return out


@lut_gemv.register_fake
def _(lut, codes, width, rows):
    return lut.new_empty(lut.shape[0], rows)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None) -> torch.Tensor:
    """The kernel contract on the CPU via lookup tables (input-channel groups only)."""
    if spec.axis != ChannelAxis.INPUT.value:
        raise ValueError("the LUT kernel needs input-channel groups")
    lead, n = x.shape[:-1], x.shape[-1]
    xp = x.reshape(-1, n).float()[:, perm.long()]  # [T, n] in permuted channel order
    out = torch.zeros(xp.shape[0], spec.out_features, dtype=torch.float32)
    start = 0
    for g, size in enumerate(spec.group_sizes):
        lut = _table(xp[:, start : start + size], codebooks[g], spec)
        out += lut_gemv(lut, codes[g], spec.code_bits(g), spec.out_features)
        start += size
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, spec.out_features)


def _table(block: torch.Tensor, codebooks: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """`[T, cols]` inputs of a group -> `[T, n_vec * P, K]` dot products with every codeword."""
    v, P, d = spec.vector_length, spec.sub_vectors, spec.sub_dim
    T, cols = block.shape
    padded = F.pad(block, (0, math.ceil(cols / v) * v - cols)).view(T, -1, P, d)
    lut = torch.einsum("tjpd,pkd->tjpk", padded, codebooks.float())
    return lut.reshape(T, -1, codebooks.shape[1]).contiguous()
