"""Quantized modules."""

from rsavq.nn.vq_linear import VQLinear, set_backend

__all__ = ["VQLinear", "set_backend"]
