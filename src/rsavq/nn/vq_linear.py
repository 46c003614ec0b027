"""`VQLinear`: a linear layer stored as RSAVQ codes, codebooks and a channel permutation."""

from __future__ import annotations

import torch
from torch import nn

from rsavq.config import LayerSpec
from rsavq.kernels import Backend, reference
from rsavq.kernels import vq_linear as vq_linear_kernel
from rsavq.packing import packed_words


class VQLinear(nn.Module):
    """Drop-in for `nn.Linear`; buffers `perm`, `codes_{g}`, `codebooks_{g}` (+ `scales`, `bias`).

    Built empty from a `LayerSpec` alone (so checkpoints load onto the meta device), then filled
    with `load_state_dict` or `from_quantized`.
    """

    def __init__(self, spec: LayerSpec, device=None, dtype=torch.float32):
        super().__init__()
        self.spec = spec
        self.backend = Backend.AUTO  # or pin one: REFERENCE, CPU, TRITON
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.register_buffer(
            "perm", torch.empty(spec.channels, dtype=spec.perm_dtype, device=device)
        )
        for g in range(len(spec.group_bits)):
            rows = spec.block_shape(g)[0]
            words = packed_words(spec.codes_per_row(g), spec.code_bits(g))
            self.register_buffer(
                f"codes_{g}", torch.empty(rows, words, dtype=torch.int32, device=device)
            )
            shape = (spec.sub_vectors, 2 ** spec.code_bits(g), spec.sub_dim)
            self.register_buffer(
                f"codebooks_{g}", torch.empty(shape, dtype=torch.float16, device=device)
            )
        scales = torch.empty(spec.out_features, dtype=torch.float16, device=device)
        self.register_buffer("scales", scales if spec.row_scales else None)  # multiplies y
        self.bias = (
            nn.Parameter(
                torch.empty(spec.out_features, device=device, dtype=dtype), requires_grad=False
            )
            if spec.bias
            else None
        )

    @classmethod
    def from_quantized(cls, layer) -> VQLinear:
        """From an `rsavq.algorithms.rsavq.QuantizedLayer`."""
        module = cls(layer.spec, dtype=layer.bias.dtype if layer.bias is not None else None)
        state = layer.tensors()
        if layer.bias is not None:
            state["bias"] = layer.bias
        module.load_state_dict(state)
        return module

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{g}") for g in range(len(self.spec.group_bits))]

    @property
    def codebooks(self) -> list[torch.Tensor]:
        return [getattr(self, f"codebooks_{g}") for g in range(len(self.spec.group_bits))]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        W = reference.dequantize(self.codes, self.codebooks, self.perm, self.spec, dtype)
        return W if self.scales is None else W * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return vq_linear_kernel(
                x, self.codes, self.codebooks, self.perm, self.spec, self.bias, self.backend
            )
        y = vq_linear_kernel(
            x, self.codes, self.codebooks, self.perm, self.spec, None, self.backend
        )
        y = y * self.scales.to(y.dtype)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):
        """Move codebooks and scales with the module but keep them fp16 (`model.to(bfloat16)`
        is safe)."""
        names = [
            n
            for n, t in self._buffers.items()
            if t is not None and (n.startswith("codebooks_") or n == "scales")
        ]
        kept = {n: self._buffers.pop(n) for n in names}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float16, device=self.perm.device)).device
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_bits={list(self.spec.group_bits)}, axis={self.spec.axis}"
        )


def set_backend(model: nn.Module, backend: Backend | str) -> int:
    """Pin every `VQLinear` of `model` to `backend` (`auto` restores dispatch); returns how many."""
    backend = Backend(backend)
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)
