"""Input Hessians `H = 2/N sum_t x_t x_t^T` per linear layer (GPTQ's proxy), from forward passes.

`input_hessians` hooks every layer in one pass over the model as it is; the block-sequential
pipeline (`stats.sequential`) uses the same hooks one decoder block at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


@contextlib.contextmanager
def hessian_hooks(layers: dict[str, nn.Module]) -> Iterator[Callable[[], dict]]:
    """Hook `layers` while the block runs; yields `finish() -> {name: H [in, in]}` (fp32, CPU).
    Activations of any shape `[..., in]` count token by token."""
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def fn(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.T @ x
            sums[name] = gram if sums[name] is None else sums[name].add_(gram)
            counts[name] += x.shape[0]

        return fn

    def finish() -> dict[str, torch.Tensor]:
        return {
            name: (2 * sums[name] / max(counts[name], 1)).cpu()
            for name in layers
            if sums[name] is not None
        }

    with contextlib.ExitStack() as stack:
        for name, layer in layers.items():
            stack.callback(layer.register_forward_hook(hook(name)).remove)
        yield finish


@torch.no_grad()
def input_hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    windows: torch.Tensor,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """`{name: H [in, in]}` (fp32, CPU) from the inputs each layer sees on `windows` `[N, T]`."""
    device = next(model.parameters()).device
    with hessian_hooks(layers) as finish:
        for window in tqdm(windows, desc="input hessians", unit="seq", disable=not progress):
            model(window[None].to(device), use_cache=False)
        return finish()
