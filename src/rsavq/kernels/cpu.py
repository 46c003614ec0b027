"""CPU backend, a small C++ extension: a lookup-table GEMV for decode (AQLM's trick) and a
dequantizer for prefill.

Decode (at most `DECODE_TOKENS` tokens, input-channel groups): per group, the input's sub-vectors
are dotted with every codeword once (a table `[T, J, K]`); each output is then a sum of `J` table
entries picked by the packed codes, read straight from the int32 words (AVX-512: 64 rows at a
time, tables of <= 64 entries held in registers). One call of the op `rsavq::vq_gemv` does every
group of a layer. Prefill (more tokens, or output-channel groups): `rsavq::vq_dequantize` writes
the float32 weight once per call into a per-thread buffer reused across calls (columns left in
the permuted order, met by `x[:, perm]`), then one dense matmul. The extension is
compiled on first use (g++ and ninja, `-march=native`; cached by torch under
`~/.cache/torch_extensions`); when that fails, `available()` is False and dispatch uses the
reference kernel.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from rsavq.config import ChannelAxis, LayerSpec

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "lut_gemv.cpp"
DECODE_TOKENS = 8  # at most this many tokens per call use the LUT GEMV
_extension = None
_failed = False
_local = threading.local()


def extension():
    """The compiled extension module, or None when it cannot be built here."""
    global _extension, _failed
    if _extension is None and not _failed:
        try:
            from torch.utils.cpp_extension import load

            logger.info("loading the CPU kernels (compiled on first use: about a minute)")
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
    args = (codes, codebooks, perm, sizes, widths, vector_length, out_features, in_features)
    return extension().vq_dequantize(*args, input_axis, None)


@vq_dequantize.register_fake
def _(codes, codebooks, perm, sizes, widths, vector_length, out_features, in_features, input_axis):
    return perm.new_empty(out_features, in_features, dtype=torch.float32)


@functools.lru_cache(maxsize=1024)
def _spec_args(spec: LayerSpec) -> tuple[list[int], list[int], int]:
    widths = [spec.code_bits(g) for g in range(len(spec.group_sizes))]
    return list(spec.group_sizes), widths, spec.vector_length


def _workspace(numel: int) -> torch.Tensor:
    """This thread's float32 buffer for dequantized weights (grown to the largest layer seen)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        _local.buffer = buffer = torch.empty(numel)
    return buffer


# Eager calls go to the extension directly (the same functions without the custom ops' Python
# dispatch, ~30 us per call: decode calls are short); `torch.compile` traces the custom ops.
def _gemv(x, perm, codes, books, spec: LayerSpec) -> torch.Tensor:
    args = (x, perm, codes, books, *_spec_args(spec), spec.out_features)
    return vq_gemv(*args) if torch.compiler.is_compiling() else extension().vq_gemv(*args)


def _dequantize(codes, books, perm, spec: LayerSpec, inputs: bool, reuse: bool) -> torch.Tensor:
    """The weight for one matmul; in the shared workspace when `reuse` (autograd saves none)."""
    args = (codes, books, perm, *_spec_args(spec), spec.out_features, spec.in_features, inputs)
    if torch.compiler.is_compiling():
        return vq_dequantize(*args)
    workspace = _workspace(spec.out_features * spec.in_features) if reuse else None
    return extension().vq_dequantize(*args, workspace)


def vq_linear(x, codes, codebooks, perm, spec: LayerSpec, bias=None) -> torch.Tensor:
    """The kernel contract on the CPU: LUT GEMV for decode, dequantize + matmul otherwise."""
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    codes, books = list(codes), [cb.half().contiguous() for cb in codebooks]
    inputs = spec.axis == ChannelAxis.INPUT.value
    if x2.shape[0] <= DECODE_TOKENS and inputs:
        out = _gemv(x2.float().contiguous(), perm, codes, books, spec)
        if bias is not None:
            out = out + bias.float()
        out = out.to(x.dtype)
    else:
        reuse = not (torch.is_grad_enabled() and x.requires_grad)
        W = _dequantize(codes, books, perm, spec, inputs, reuse)
        out = F.linear(x2[:, perm.long()] if inputs else x2, W.to(x.dtype), bias)
    return out.reshape(*lead, spec.out_features)
