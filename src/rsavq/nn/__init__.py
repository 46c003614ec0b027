"""Quantized modules."""

from rsavq.nn.vq_linear import VQLinear

__all__ = ["VQLinear"]
