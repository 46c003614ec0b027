"""Device and dtype choice, checked against what the device supports."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from rsavq.errors import UsageError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; an unavailable device is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch, refusing combinations the device cannot run well."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; use float32, bfloat16 or float16")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise UsageError("float16 is not supported on CPU; use --dtype bfloat16 or float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"bfloat16 is not supported on {device}; use --dtype float16 or float32")
    if device.type == "cpu" and dtype == torch.bfloat16 and not fast_bf16(device):
        logger.warning(
            "bfloat16 matrix products are slow on this CPU (no AVX-512 or AMX: tens of times "
            "float32's time); use --dtype float32"
        )
    return dtype


@functools.cache
def _fast_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run about as fast as float32 ones on `device`, or faster:
    GPUs that support bfloat16, and CPUs for which oneDNN has bfloat16 kernels (AVX-512 and up:
    AVX-512 BF16, AMX). Without them (AVX2-only CPUs) torch multiplies bfloat16 matrices in a
    generic loop: a 2048 x 576 by 576 x 1536 product took 86 times as long as in float32 on an
    AMD EPYC (Zen 3)."""
    return _fast_bf16(torch.device(device).type)


def uses_bf16(device: torch.device, wanted: bool) -> bool:
    """Whether work that asks for bfloat16 (`wanted`) runs in it on `device`: where it is fast."""
    return wanted and fast_bf16(device)


def bf16_autocast(device: torch.device, wanted: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` where `uses_bf16`; float32 otherwise."""
    device = torch.device(device)
    return torch.autocast(device.type, torch.bfloat16, enabled=uses_bf16(device, wanted))
