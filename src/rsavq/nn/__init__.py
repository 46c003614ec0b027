"""Quantized modules."""

from rsavq.nn.codebooks import SharedCodebooks
from rsavq.nn.vq_linear import VQLinear, dequantized, set_backend

__all__ = ["SharedCodebooks", "VQLinear", "dequantized", "set_backend"]
