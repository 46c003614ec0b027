"""Quantized checkpoints: `model.safetensors` + `config.json` with `quantization_config`.

`quantization_config` = {"quant_method": "rsavq", "format_version", "config": RSAVQConfig,
"layers": {name: LayerSpec}}: the model is rebuilt from the config alone, then the tensors are
loaded onto it (parameters never materialized before loading).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rsavq.config import FORMAT_VERSION, QUANT_METHOD, READABLE_FORMAT_VERSIONS, LayerSpec
from rsavq.errors import UsageError
from rsavq.io import atomic_write, atomic_write_json
from rsavq.nn import VQLinear
from rsavq.nn.stored import keep_stored_embeddings

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def quantization_config(config_dict: dict, specs: dict[str, LayerSpec]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "config": config_dict,
        "layers": {n: s.to_dict() for n, s in specs.items()},
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the first name of a shared tensor is kept)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else name
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def unquantized_names(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Names in `state` of the model's unquantized floating tensors (embeddings, norms, biases,
    skipped linears): everything but the `VQLinear`s' codes, codebooks, perm and scales."""
    quantized = {
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, VQLinear)
        for buffer, value in module.named_buffers(recurse=False)
        if value is not None
    }
    return [n for n, t in state.items() if n not in quantized and t.is_floating_point()]


def round_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every unquantized floating tensor to `dtype`'s precision in place, keeping the
    model's compute dtype: the model in memory then computes exactly what a checkpoint stored
    in `dtype` holds."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in unquantized_names(model, state):
            state[name].data = state[name].data.to(dtype).to(state[name].dtype)


def save_quantized(
    model: nn.Module,
    out: Path,
    qconfig: dict | None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write weights, then config.json (whose presence marks a complete checkpoint).

    `qconfig=None` writes a plain checkpoint (the scalar baselines' dequantized weights).
    `dtype` stores the unquantized floating tensors in that dtype (default: as they are);
    `config.json` keeps the model's compute dtype, which `load_quantized` restores."""
    out.mkdir(parents=True, exist_ok=True)
    state = unique_state_dict(model)
    if dtype is not None:
        state.update({n: state[n].to(dtype) for n in unquantized_names(model, state)})
    meta = {"format": "pt", "rsavq_format_version": str(FORMAT_VERSION)}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=meta))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    config = model.config.to_dict()
    if qconfig is not None:
        config["quantization_config"] = qconfig
    atomic_write_json(out / "config.json", config)


def read_quantization_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise UsageError(f"{path} has no config.json; is it a quantized checkpoint?")
    qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise UsageError(
            f"{path} is not an rsavq checkpoint (quant_method "
            f"{qconfig.get('quant_method')!r}); quantize it with `rsavq quantize`"
        )
    check_format_version(qconfig.get("format_version"), str(path))
    return qconfig


def check_format_version(version, where: str) -> None:
    """Refuse a checkpoint format this rsavq cannot read (older readable ones load as they are)."""
    if version not in READABLE_FORMAT_VERSIONS:
        raise UsageError(
            f"{where} has rsavq format {version}; this rsavq reads formats "
            f"{list(READABLE_FORMAT_VERSIONS)}: upgrade rsavq or requantize"
        )


def replace_linears(model: nn.Module, layers: dict[str, dict]) -> None:
    """Swap every listed linear for an empty `VQLinear` built from its spec, on the linear's
    device (meta when the model is being built empty)."""
    for name, data in layers.items():
        spec = LayerSpec.from_dict(data)
        device = model.get_submodule(name).weight.device
        set_module(model, name, VQLinear(spec, device=device))


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype=None):
    """A ready transformers model from a quantized checkpoint directory (eval mode), in `dtype`
    (default: the compute dtype its config.json declares, else fp32; codebooks and scales stay
    fp16). Embeddings the checkpoint stores in bfloat16 stay in bfloat16 in a float32 model on
    the CPU (`rsavq.nn.stored`: the same values, half the bytes)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qconfig = read_quantization_config(path)
    config = AutoConfig.from_pretrained(str(path))
    config.quantization_config = None
    with init_empty_weights():  # parameters on meta; buffers (rotary) computed for real
        model = AutoModelForCausalLM.from_config(config)
    replace_linears(model, qconfig["layers"])
    _load_tensors(model, path / WEIGHTS)
    model.config.quantization_config = qconfig
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = dtype or declared or torch.float32  # transformers' default when none is declared
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    stored = model.get_input_embeddings().weight.dtype
    model = model.to(dtype).to(device).eval()
    if stored == torch.bfloat16 and dtype == torch.float32 and model.device.type == "cpu":
        keep_stored_embeddings(model, stored)  # half the bytes the output head reads per token
    return model


def _load_tensors(model: nn.Module, weights: Path) -> None:
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise UsageError(
            f"cannot read {weights} ({exc}); the checkpoint is incomplete or corrupt: requantize"
        ) from exc
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise UsageError(
                f"{weights}: tensor {name} has shape {list(tensor.shape)}, the "
                f"config says {list(expected[name].shape)}; the checkpoint is corrupt"
            )
    unexpected = set(state) - set(expected)
    if unexpected:
        raise UsageError(
            f"{weights} holds tensors the config does not describe: "
            f"{sorted(unexpected)[:5]}; the checkpoint is corrupt"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    missing = [n for n, t in tensors if t.is_meta]
    if missing:
        raise UsageError(f"{weights} lacks tensors {missing[:5]}; the checkpoint is incomplete")
