"""Kernels behind one contract: `vq_linear(x, codes, codebooks, perm, spec, bias)`."""

from rsavq.kernels.reference import dequantize, vq_linear

__all__ = ["dequantize", "vq_linear"]
