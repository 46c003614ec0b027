"""CPU backend, a small C++ extension: a lookup-table GEMV for decode (AQLM's trick) and a
dequantizer for prefill.

Decode (at most `DECODE_TOKENS` tokens, input-channel groups): per group, the input's sub-vectors
are dotted with every codeword once (a table `[T, J, K]`); each output is then a sum of `J` table
entries picked by the packed codes, read straight from the int32 words (AVX-512: 64 rows at a
time, tables of <= 64 entries held in registers). One call of the op `rsavq::vq_gemv` does every
group of a layer. Prefill (more tokens, or output-channel groups): `rsavq::vq_dequantize` writes
the float32 weight once per call (columns left in the permuted order, met by `x[:, perm]`), then
one dense matmul. The extension is
compiled on first use (g++ and ninja, `-march=native`; cached by torch under
`~/.cache/torch_extensions`); when that fails, `available()` is False and dispatch uses the
reference kernel.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from rsavq.config import ChannelAxis, LayerSpec

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "lut_gemv.cpp"
DECODE_TOKENS = 8  # at most this many tokens per call use the LUT GEMV
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
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # compiler or ninja missing: fall back, say why once
            _failed = True
            logger.warning("CPU kernels unavailable (%s); using the reference kernel", exc)
    return _extension


def available() -> bool:
    return extension() is not None


@torch.library.custom_op("rsavq::vq_gemv", mutates_args=())
def vq_gemv(
    x: torch.Tensor,
    perm: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    sizes: list[int],
    widths: list[int],
    vector_length: int,
    rows: int,
) -> torch.Tensor:
    """`[T, n]` float32 inputs -> `[T, rows]` outputs of all input-channel groups (no bias)."""
    return extension().vq_gemv(x, perm, codes, codebooks, sizes, widths, vector_length, rows)


@vq_gemv.register_fake
def _(x, perm, codes, codebooks, sizes, widths, vector_length, rows):
    return x.new_empty(x.shape[0], rows)


@torch.library.custom_op("rsavq::vq_dequantize", mutates_args=())
def vq_dequantize(
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    perm: torch.Tensor,
    sizes: list[int],
    widths: list[int],
    vector_length: int,
    out_features: int,
    in_features: int,
    input_axis: bool,
) -> torch.Tensor:
    """The float32 weight `[out_features, in_features]`: rows in the original order, columns in
    the codes' permuted order when `input_axis` (`W[:, perm]`, to meet `x[:, perm]`)."""
    return extension().vq_dequantize(
        codes, codebooks, perm, sizes, widths, vector_length, out_features, in_features, input_axis
    )


@vq_dequantize.register_fake
def _(codes, codebooks, perm, sizes, widths, vector_length, out_features, in_features, input_axis):
    return perm.new_empty(out_features, in_features, dtype=torch.float32)


@functools.lru_cache(maxsize=1024)
def _spec_args(spec: LayerSpec) -> tuple[list[int], list[int], int]:
    widths = [spec.code_bits(g) for g in range(len(spec.group_sizes))]
    return list(spec.group_sizes), widths, spec.vector_length


def _op(op, name: str):
    """The custom op while `torch.compile` traces; the extension directly in eager mode (the
    same function without the op's Python dispatch, ~30 us per call: decode calls are short)."""
    return op if torch.compiler.is_compiling() else getattr(extension(), name)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None) -> torch.Tensor:
    """The kernel contract on the CPU: LUT GEMV for decode, dequantize + matmul otherwise."""
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    codes, books = list(codes), [cb.half().contiguous() for cb in codebooks]
    inputs = spec.axis == ChannelAxis.INPUT.value
    if x2.shape[0] <= DECODE_TOKENS and inputs:
        args = (*_spec_args(spec), spec.out_features)
        out = _op(vq_gemv, "vq_gemv")(x2.float().contiguous(), perm, codes, books, *args)
        if bias is not None:
            out = out + bias.float()
        out = out.to(x.dtype)
    else:
        args = (*_spec_args(spec), spec.out_features, spec.in_features, inputs)
        W = _op(vq_dequantize, "vq_dequantize")(codes, books, perm, *args)
        out = F.linear(x2[:, perm.long()] if inputs else x2, W.to(x.dtype), bias)
    return out.reshape(*lead, spec.out_features)
