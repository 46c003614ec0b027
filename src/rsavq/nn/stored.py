"""Embeddings kept in the 16-bit dtype a checkpoint stored them in, inside a float32 model.

A checkpoint saved with `--save-dtype bfloat16` holds its embeddings (and, tied to them, the output
head) in bfloat16. Widened to float32 at load they would cost twice the memory, and the output
head, read once per generated token, twice the bytes: on SmolLM2-135M it is 49152 x 576 weights,
more than all quantized decoder linears together at 2 bits. `keep_stored_embeddings` leaves them
in bfloat16; the modules compute in the model's dtype (the input embedding's rows are widened as
they are looked up, the head multiplies through `rsavq.kernels.stored_linear`), with the same
values as the widened copy (bfloat16 widens to float32 exactly).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rsavq.kernels import stored_linear

logger = logging.getLogger(__name__)


class _Stored:
    """A module whose weight stays in its stored dtype while it computes in `compute_dtype`."""

    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` moves the compute dtype along (probed on an empty tensor), and the
        # weight with it: the module keeps computing in the model's dtype
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)


class StoredEmbedding(_Stored, nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


class StoredLinear(_Stored, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return stored_linear(x, self.weight, self.bias)


_STORED = {nn.Embedding: StoredEmbedding, nn.Linear: StoredLinear}


def keep_stored_embeddings(model: nn.Module, stored: torch.dtype) -> bool:
    """Hold the input and output embeddings' weights in `stored` (tied ones stay one tensor)
    while the model computes in the embeddings' current dtype. Only plain `nn.Embedding` and
    `nn.Linear` modules are changed; returns whether any was."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    modules = [m for m in modules if m is not None and type(m) in _STORED]
    if not modules or modules[0].weight.dtype == stored:
        return False
    compute = modules[0].weight.dtype
    with torch.no_grad():
        for module in modules:
            if module.weight.dtype != stored:  # a tied weight is converted once
                module.weight.data = module.weight.data.to(stored)
            module.__class__ = _STORED[type(module)]
            module.compute_dtype = compute
    logger.info("embeddings kept in %s, computing in %s", stored, compute)
    return True
