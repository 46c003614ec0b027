"""Input Hessians `H = 2/N sum_t x_t x_t^T` per linear layer (GPTQ's proxy), from forward passes.

All layers are hooked in one pass over the full-precision model (not GPTQ's layer-sequential
pass over the partly quantized model): one forward per window serves every layer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def input_hessians(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    windows: torch.Tensor,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """`{name: H [in, in]}` (fp32, CPU) from the inputs each layer sees on `windows` `[N, T]`."""
    sums = {name: None for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def fn(_module, args, _output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = x.T @ x
            sums[name] = gram if sums[name] is None else sums[name].add_(gram)
            counts[name] += x.shape[0]

        return fn

    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for name, layer in layers.items():
            stack.callback(layer.register_forward_hook(hook(name)).remove)
        for window in tqdm(windows, desc="input hessians", unit="seq", disable=not progress):
            model(window[None].to(device), use_cache=False)
    return {name: (2 * sums[name] / max(counts[name], 1)).cpu() for name in layers}
