"""Weight streaming: a model whose decoder blocks stay in their safetensors files until used.

`load_streamed` loads a Hugging Face causal LM with every decoder block offloaded to disk
(accelerate's hooks over the checkpoint's own safetensors files, read in place: nothing is
copied): the embeddings, final norm and head are in memory, and each block's weights are read when
the block runs and dropped after. A forward pass then holds about one block of weights; Fisher
collection holds about one block more while it recomputes a block in the backward pass (it turns
activation checkpointing on for a streamed model, see `rsavq.stats.collect`).

The quantization pipeline `materialize`s a block (or a layer) when its turn comes (its weights
read into memory for good, its hooks removed, so it can be quantized and fine-tuned like any
module) and `release`s each FP linear once its quantized replacement is installed. Peak memory
is then the quantized prefix plus one FP block, not the whole model (docs/architecture.md
section 5).
"""

from __future__ import annotations

import atexit
import gc
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rsavq.errors import UsageError

logger = logging.getLogger(__name__)

_STREAMED = "_rsavq_streamed"  # set on a module whose weights were streamed, then materialized


def stream_device_map(model: nn.Module, device: torch.device | str) -> dict[str, str]:
    """A device map (accelerate's format) of `model` (a meta-device skeleton is enough) that
    puts each decoder block on "disk" and every other module on `device`."""
    from rsavq.modules import decoder_blocks, find_linears

    name, blocks = decoder_blocks(model, find_linears(model, ()))
    if not len(blocks):
        raise UsageError(
            f"{type(model).__name__} has no repeated decoder blocks to stream; run it without "
            "--stream-weights"
        )
    device_map = {f"{name}.{i}": "disk" for i in range(len(blocks))}
    path = name.split(".")
    for depth in range(len(path)):  # siblings of every module on the way down to the blocks
        parent = model.get_submodule(".".join(path[:depth]))
        for child, _ in parent.named_children():
            if child != path[depth]:
                device_map[".".join([*path[:depth], child])] = str(device)
    return device_map


def load_streamed(location: str | Path, dtype: torch.dtype, device: torch.device | str):
    """The causal LM at `location` (a Hugging Face directory or hub id) with its decoder blocks
    streamed from disk (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(location))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    device_map = stream_device_map(skeleton, device)
    # safetensors checkpoints are read in place; other formats are copied to this folder first
    offload = tempfile.mkdtemp(prefix="rsavq-offload-")
    atexit.register(shutil.rmtree, offload, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(location), dtype=dtype, device_map=device_map, offload_folder=offload
    )
    _own_resident_tensors(model)
    _read_copies(model)
    blocks = sum(1 for where in device_map.values() if where == "disk")
    logger.info("streaming %d decoder blocks from %s", blocks, location)
    return model.eval()


def _own_resident_tensors(model: nn.Module) -> None:
    """Copy the tensors kept in memory (embeddings, head, norms) out of the checkpoint file's
    memory map, so that the map is released: otherwise every block read through it stays
    resident in the process (tests/test_streaming.py checks that no map outlives a read)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    gc.collect()


class _Copies(Mapping):
    """An offloaded-weights loader whose tensors are copies, not views of the file's memory
    map: a view keeps the map (and every page read through it) alive in the process."""

    def __init__(self, loader: Mapping):
        self.loader = loader

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.loader[key].clone()

    def __contains__(self, key: object) -> bool:
        return key in self.loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _read_copies(model: nn.Module) -> None:
    """Make every offload hook of `model` read copies (`_Copies`)."""
    for module in model.modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        dataset = getattr(weights, "dataset", None)  # accelerate's PrefixedDataset
        if dataset is not None and not isinstance(dataset, _Copies):
            weights.dataset = _Copies(dataset)


def is_streamed(module: nn.Module) -> bool:
    """Whether any weight of `module` is still streamed (offloaded by a hook)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


def materialize(module: nn.Module) -> nn.Module:
    """Read every streamed tensor of `module` into memory for good and remove its offload
    hooks (a no-op on a module that is not streamed). Returns `module`."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for sub in list(module.modules()):
        hook = getattr(sub, "_hf_hook", None)
        if hook is None:
            continue
        values = {}
        if getattr(hook, "offload", False):
            tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
            values = {n: hook.weights_map[n].to(t.dtype) for n, t in tensors if t.is_meta}
        remove_hook_from_module(sub)
        for name, value in values.items():
            set_module_tensor_to_device(sub, name, hook.execution_device, value=value)
        if values:
            setattr(sub, _STREAMED, True)
    return module


def release(layer: nn.Module) -> None:
    """Drop the weights of a layer that was streamed and has been replaced (they can be read
    again from disk); a layer that was never streamed is left alone (its tensors may be shared,
    e.g. tied embeddings)."""
    if getattr(layer, _STREAMED, False):
        layer.to("meta")
