"""Device and dtype choice, checked against what the device supports."""

from __future__ import annotations

import torch

from rsavq.errors import UsageError

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
    return dtype
