"""The one generic model walk: which linear layers of a model get quantized."""

from __future__ import annotations

import fnmatch

from torch import nn

DEFAULT_SKIP = ("lm_head", "*embed*")


def find_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """All `nn.Linear` modules by qualified name, in model order, except those matching `skip`.

    `skip` holds fnmatch patterns on the qualified name or its last part; the output embedding
    (`lm_head`, tied or not) is skipped by default, like the input embeddings.
    """
    output = getattr(model, "get_output_embeddings", lambda: None)()
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output and "lm_head" in skip:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(leaf, p) for p in skip):
            continue
        found[name] = module
    return found
