"""`VQLinear`: a linear layer stored as RSAVQ codes, codebooks and a channel permutation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rsavq.config import LayerSpec
from rsavq.errors import UsageError
from rsavq.kernels import Backend, decoder, reference
from rsavq.kernels import vq_linear as vq_linear_kernel
from rsavq.nn.codebooks import decode_codebook, store_codebook, stored_dtype
from rsavq.packing import packed_words


class VQLinear(nn.Module):
    """Drop-in for `nn.Linear`; buffers `perm`, `codes_{g}`, `codebooks_{g}` (+ `scales`, `bias`;
    `codebook_scales_{g}` with int8 codebooks).

    Built empty from a `LayerSpec` alone (so checkpoints load onto the meta device), then filled
    with `load_state_dict` or `from_quantized`.
    """

    def __init__(self, spec: LayerSpec, device=None, dtype=torch.float32):
        super().__init__()
        self.spec = spec
        self.backend = Backend.AUTO  # or pin one: REFERENCE, CPU, TRITON
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.register_buffer(
            "perm", torch.empty(spec.in_features, dtype=spec.perm_dtype, device=device)
        )
        for g in range(len(spec.group_bits)):
            rows = spec.block_shape(g)[0]
            words = packed_words(spec.codes_per_row(g), spec.code_bits(g))
            self.register_buffer(
                f"codes_{g}", torch.empty(rows, words, dtype=torch.int32, device=device)
            )
            stored = stored_dtype(spec.codebook_dtype)
            book = torch.empty(spec.codebook_shape(g), dtype=stored, device=device)
            self.register_buffer(f"codebooks_{g}", book)
            if stored == torch.int8:
                scale = torch.empty(spec.sub_vectors, dtype=torch.float16, device=device)
                self.register_buffer(f"codebook_scales_{g}", scale)
        self._inputs: tuple[list, list] | None = None  # codes and decoded codebooks, kept
        self._kernel_state: dict = {}  # what the kernels derived from the buffers, kept
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

    def refresh(self) -> None:
        """Forget what was derived from the buffers (the decoded codebooks, the kernels' own
        layouts). Done by `load_state_dict`, `.to()`, `set_codebook` and assigning a
        buffer; call it after editing a buffer in place."""
        self._inputs = None
        self._kernel_state.clear()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__.get("_buffers", ()) or (
            name == "backend" and "_kernel_state" in self.__dict__
        ):
            self.refresh()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def _stored_codebook(self, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return getattr(self, f"codebooks_{g}"), getattr(self, f"codebook_scales_{g}", None)

    def set_codebook(self, g: int, book: torch.Tensor) -> None:
        """Store `book` (float `[P, K, d]`) as group g's codebook, in the spec's dtype."""
        store_codebook(book, self.spec.codebook_dtype, *self._stored_codebook(g))
        self.refresh()

    @property
    def codes(self) -> list[torch.Tensor]:
        return self._kernel_inputs()[0]

    @property
    def codebooks(self) -> list[torch.Tensor]:
        """Every group's codebook as the kernels read it: `[P, K, d]` fp16 (int8 ones decoded
        once, kept until `refresh`)."""
        return self._kernel_inputs()[1]

    def _kernel_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Codes and decoded codebooks, kept until `refresh`."""
        if self._inputs is None:
            groups = range(len(self.spec.group_bits))
            codes = [getattr(self, f"codes_{g}") for g in groups]
            books = [decode_codebook(*self._stored_codebook(g)) for g in groups]
            self._inputs = (codes, books)
        return self._inputs

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        W = reference.dequantize(self.codes, self.codebooks, self.perm, self.spec, dtype)
        return W if self.scales is None else W * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._kernel_state
        if "decode" not in state:  # the backend's decode function, bound once (or None)
            codes, books = self._kernel_inputs()
            state["decode"] = decoder(
                codes, books, self.perm, self.spec, self.bias, self.backend, self.scales, state
            )
        if state["decode"] is not None and (y := state["decode"](x)) is not None:
            return y
        codes, books = self._kernel_inputs()
        return vq_linear_kernel(
            x, codes, books, self.perm, self.spec, self.bias, self.backend, self.scales,
            self._kernel_state,
        )  # fmt: skip

    def _apply(self, fn, recurse=True):
        """Move codebooks and scales with the module but keep their stored dtypes
        (`model.to(bfloat16)` is safe)."""
        names = [
            n
            for n, t in self._buffers.items()
            if t is not None and (n.startswith("codebook") or n == "scales")
        ]
        kept = {n: self._buffers.pop(n) for n in names}
        self.refresh()
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float16, device=self.perm.device)).device
        for name, tensor in kept.items():
            self._buffers[name] = tensor.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_bits={list(self.spec.group_bits)}"
        )


@contextlib.contextmanager
def dequantized(module: nn.Module) -> Iterator[None]:
    """Run every `VQLinear` of `module` as a dense linear whose weight is dequantized once on
    entry: the same function as its kernel (up to summation order), and as fast as a dense
    layer on many tokens at a time (calibration and loss passes), at the memory of the dense
    weights. A layer whose forward is already replaced (being trained) is left as it is."""
    layers = [m for m in module.modules() if isinstance(m, VQLinear) and "forward" not in vars(m)]
    for layer in layers:
        layer.forward = _dense(layer.dequantize(), layer.bias)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _dense(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), b)

    return forward


def set_backend(model: nn.Module, backend: Backend | str) -> int:
    """Pin every `VQLinear` of `model` to `backend` (`auto` restores dispatch); returns how many.
    A backend that cannot serve the layers where they are is refused (`UsageError`)."""
    try:
        backend = Backend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise UsageError(f"unknown backend '{backend}'; use one of {choices}") from None
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    for device in {layer.perm.device.type for layer in layers}:
        _check_backend(backend, device)
    for layer in layers:
        layer.backend = backend
    return len(layers)


def _check_backend(backend: Backend, device: str) -> None:
    if backend == Backend.CPU:
        from rsavq.kernels import cpu

        if device != "cpu":
            raise UsageError(f"--backend cpu serves CPU tensors, the model is on {device}")
        if not cpu.available():
            raise UsageError(
                "--backend cpu: the CPU kernels could not be built here (they need g++ and "
                "ninja; see the log); use --backend reference"
            )
    if backend == Backend.TRITON and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(
            f"--backend triton needs a CUDA GPU, the model is on {device}; use --backend auto"
        )
