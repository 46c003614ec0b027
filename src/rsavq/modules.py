"""The one generic model walk: which linear layers of a model get quantized, and their weights.

Both `nn.Linear` (weight `[out, in]`) and transformers' `Conv1D` (GPT-2 and relatives: weight
`[in, out]`) count as linear layers; `weight_matrix` always gives `[out, in]`.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from rsavq.errors import UsageError

DEFAULT_SKIP = ("lm_head", "*embed*")


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, _linear_types())


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as `[out_features, in_features]` (a view; `Conv1D` stores it
    transposed)."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.T


def weight_shape(layer: nn.Module) -> tuple[int, int]:
    return tuple(weight_matrix(layer).shape)


def find_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """All linear modules (`nn.Linear`, `Conv1D`) by qualified name, in model order, except
    those matching `skip`.

    `skip` holds fnmatch patterns on the qualified name or its last part; the output embedding
    (`lm_head`, tied or not) is skipped by default, like the input embeddings.
    """
    output = getattr(model, "get_output_embeddings", lambda: None)()
    found = {}
    for name, module in model.named_modules():
        if not is_linear(module) or module is output and "lm_head" in skip:
            continue
        if any(name_matches(name, p) for p in skip):
            continue
        found[name] = module
    return found


def name_matches(name: str, pattern: str) -> bool:
    """Whether fnmatch `pattern` matches a module's qualified `name` or its last part."""
    return fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], pattern)


def require_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict:
    """`find_linears`, refusing a model that has none with one clear line."""
    layers = find_linears(model, skip)
    if not layers:
        raise UsageError(
            f"{type(model).__name__} has no quantizable layer (nn.Linear or Conv1D) outside "
            f"--skip {','.join(skip)}; check the model or loosen --skip"
        )
    return layers


def decoder_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of repeated blocks that holds the most of `layers` (the decoder
    layers of every HF causal LM), as `(qualified name, list)`; `("", ModuleList())` if none."""
    best, count = ("", nn.ModuleList()), 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        inside = sum(1 for layer in layers if layer.startswith(name + "."))
        if inside > count:
            best, count = (name, module), inside
    return best
