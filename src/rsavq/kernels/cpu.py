"""CPU backend: a lookup-table GEMV for decode (AQLM's trick), as a small C++ extension.

Per group, the input's sub-vectors are dotted with every codeword once (a table `[T, J, K]`);
each output is then a sum of `J` table entries picked by the packed codes, read straight from the
int32 words. One call of the op `rsavq::vq_gemv` does every group of a layer. The extension is
compiled on first use (g++ and ninja; cached by torch under
`~/.cache/torch_extensions`); when that fails, `available()` is False and dispatch uses the
reference kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

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


@torch.library.custom_op("rsavq::vq_gemv", mutates_args=())
def vq_gemv(
    x: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    sizes: list[int],
    widths: list[int],
    vector_length: int,
    rows: int,
) -> torch.Tensor:
    """`[T, n]` permuted float32 inputs -> `[T, rows]` outputs of all groups (no bias)."""
    return extension().vq_gemv(x, codes, codebooks, sizes, widths, vector_length, rows)


@vq_gemv.register_fake
def _(x, codes, codebooks, sizes, widths, vector_length, rows):
    return x.new_empty(x.shape[0], rows)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None) -> torch.Tensor:
    """The kernel contract on the CPU via lookup tables (input-channel groups only)."""
    if spec.axis != ChannelAxis.INPUT.value:
        raise ValueError("the LUT kernel needs input-channel groups")
    lead, n = x.shape[:-1], x.shape[-1]
    xp = x.reshape(-1, n).float()[:, perm.long()].contiguous()  # [T, n] permuted
    widths = [spec.code_bits(g) for g in range(len(spec.group_sizes))]
    books = [cb.half().contiguous() for cb in codebooks]
    out = vq_gemv(
        xp,
        list(codes),
        books,
        list(spec.group_sizes),
        widths,
        spec.vector_length,
        spec.out_features,
    )
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, spec.out_features)
