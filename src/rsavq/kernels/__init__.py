"""Kernels behind one contract: `vq_linear(x, codes, codebooks, perm, spec, bias)`.

Backends: `reference` (dequantize, then matmul: the oracle), `cpu` (lookup-table GEMV, for
decode) and `triton` (fused dequantize-GEMV/GEMM on CUDA GPUs; the `[triton]` extra).
`choose_backend` picks by device, token count and layout; a module may pin one.
"""

from __future__ import annotations

import importlib.util
from enum import Enum

import torch

from rsavq.config import ChannelAxis, LayerSpec
from rsavq.kernels import reference
from rsavq.kernels.reference import dequantize

__all__ = ["Backend", "choose_backend", "dequantize", "vq_linear"]

DECODE_TOKENS = 8  # at most this many tokens per call use the LUT kernel on CPU


class Backend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"


def choose_backend(x: torch.Tensor, spec: LayerSpec) -> Backend:
    """`triton` on CUDA when installed; `cpu` for few tokens of input-grouped layers on the CPU
    when the kernel builds; else `reference`."""
    if x.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return Backend.TRITON
    tokens = x.numel() // max(1, x.shape[-1])
    if x.device.type == "cpu" and tokens <= DECODE_TOKENS and spec.axis == ChannelAxis.INPUT.value:
        from rsavq.kernels import cpu

        if cpu.available():
            return Backend.CPU
    return Backend.REFERENCE


def vq_linear(
    x, codes, codebooks, perm, spec: LayerSpec, bias=None, backend: Backend = Backend.AUTO
) -> torch.Tensor:
    """`y = x W_hat^T + bias` by the chosen backend (all agree with `reference`)."""
    if backend == Backend.AUTO:
        backend = choose_backend(x, spec)
    if backend == Backend.CPU:
        from rsavq.kernels import cpu

        return cpu.vq_linear(x, codes, codebooks, perm, spec, bias)
    if backend == Backend.TRITON:
        from rsavq.kernels import triton

        return triton.vq_linear(x, codes, codebooks, perm, spec, bias)
    return reference.vq_linear(x, codes, codebooks, perm, spec, bias)
