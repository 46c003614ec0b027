"""Kernels behind one contract: `vq_linear(x, codes, codebooks, perm, spec, bias, scales)`,
`y = (x W^T) * scales + bias` (row scales and bias optional).

Backends: `reference` (dequantize, then matmul: the oracle), `cpu` (C++: lookup-table GEMV for
decode, a GEMM that decodes the weight as it multiplies for prefill) and `triton` (fused
dequantize-GEMV/GEMM on CUDA GPUs; the `[triton]` extra). `choose_backend` picks by device; a
module may pin one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from enum import Enum

import torch

from rsavq.config import LayerSpec
from rsavq.kernels.reference import dequantize

__all__ = ["Backend", "choose_backend", "decoder", "dequantize", "stored_linear", "vq_linear"]


class Backend(str, Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"


def choose_backend(x: torch.Tensor) -> Backend:
    """`triton` on CUDA when installed, `cpu` on the CPU when the extension builds, else
    `reference`. (Each backend picks its decode or prefill kernel by the token count.)"""
    device = x.device.type
    if device == "cpu":
        return Backend.CPU if _cpu().available() else Backend.REFERENCE
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        return Backend.TRITON
    return Backend.REFERENCE


@functools.cache
def _cpu():
    """The CPU backend's module (imported on first use)."""
    return importlib.import_module(_MODULES[Backend.CPU])


_MODULES = {  # the dispatch table: backend -> module with `vq_linear` (imported on first use)
    Backend.REFERENCE: "rsavq.kernels.reference",
    Backend.CPU: "rsavq.kernels.cpu",
    Backend.TRITON: "rsavq.kernels.triton",
}


def vq_linear(
    x, codes, codebooks, perm, spec: LayerSpec, bias=None, backend: Backend = Backend.AUTO,
    scales=None, cache: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """`y = (x W_hat^T) * scales + bias` by the chosen backend (all agree with `reference`).

    `cache`: a dict the caller keeps per layer and empties whenever a tensor of the layer
    changes; a backend keeps what it derives from the layer there (the CPU backend's repacked
    codes). Without it, the backend checks every tensor's version on each call."""
    if not isinstance(backend, Backend):
        backend = Backend(backend)
    if backend is Backend.AUTO:
        backend = choose_backend(x)
    if backend is Backend.CPU:
        return _cpu().vq_linear(x, codes, codebooks, perm, spec, bias, scales, cache)
    kernel = importlib.import_module(_MODULES[backend])
    return kernel.vq_linear(x, codes, codebooks, perm, spec, bias, scales)


def decoder(
    codes, codebooks, perm, spec: LayerSpec, bias=None, backend: Backend = Backend.AUTO,
    scales=None, cache: dict | None = None,
):  # fmt: skip
    """The layer's decode function `x -> y` with its kernel and arguments bound once (the
    contract of `vq_linear`, without its dispatch on every call), or None where no backend has
    one. The function returns None for an input it does not serve; `vq_linear` serves those.
    Today: the CPU backend's LUT GEMVs (`cpu.decoder`) for a layer on the CPU under `auto` or
    `cpu`."""
    backend = Backend(backend)
    on_cpu = perm.device.type == "cpu" and backend in (Backend.AUTO, Backend.CPU)
    if on_cpu and _cpu().available():
        return _cpu().decoder(codes, codebooks, perm, spec, bias, scales, cache)
    return None


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`y = x weight^T + bias` in `x`'s dtype for a weight kept in another dtype (a bfloat16
    output head beside a float32 model, as a checkpoint stored it). Float32 inputs of at most
    `cpu.DECODE_TOKENS` tokens on the CPU read the bfloat16 weight as it is (`cpu.stored_gemv`:
    half the bytes of a float32 copy); otherwise the weight is widened for one `F.linear`."""
    flat = x.reshape(-1, x.shape[-1])
    cpu = _cpu() if x.device.type == "cpu" else None
    if cpu is not None and cpu.serves_stored(flat, weight):
        y = cpu.stored_gemv(flat, weight).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias.to(y.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
