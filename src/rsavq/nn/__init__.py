"""Quantized modules."""

from rsavq.nn.vq_linear import VQLinear, dequantized, set_backend

__all__ = ["VQLinear", "dequantized", "set_backend"]
