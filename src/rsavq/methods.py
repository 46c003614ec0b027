"""The registry of quantization methods (docs/architecture.md section 3).

A method declares the statistics it needs and turns one layer's weight into a `LayerResult`;
every result answers the same protocol (bits, tensors to store, how it goes into the model), so
the pipeline never asks which method made it. To add a method: write its per-layer function
(pure tensors, in `rsavq.algorithms`), a result class if none fits, and one `Method` entry in
`METHODS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import nn

from rsavq.algorithms.rsavq import QuantizedLayer, quantize_layer
from rsavq.algorithms.scalar import gptq, rtn, scalar_bits
from rsavq.config import LayerSpec, RSAVQConfig, ScalarConfig, preset
from rsavq.errors import UsageError
from rsavq.modules import weight_matrix
from rsavq.nn.codebooks import decode_codebook
from rsavq.serialization import set_module

FISHER, HESSIAN = "fisher", "hessian"  # the statistics a method can ask for


class LayerResult(Protocol):
    """What every method returns for one layer."""

    @property
    def group_bits(self) -> tuple[int, ...]: ...

    def stored_bits(self) -> int:
        """Bits the checkpoint stores for the layer's weight, counted from its tensors."""

    def dequantize(self) -> torch.Tensor:
        """The weight `[out, in]` the model will compute with (fp32)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata that `Method.load` turns back into the result."""

    def install(self, model: nn.Module, name: str, layer: nn.Module) -> None:
        """Put the result into `model` in place of (or into) the layer `name`."""

    def spec(self) -> LayerSpec | None:
        """The layer's entry in the checkpoint's `quantization_config`, if it has one."""


@dataclass
class VQResult:
    """Product-VQ codes and codebooks: the layer becomes a `VQLinear`."""

    layer: QuantizedLayer

    @property
    def group_bits(self) -> tuple[int, ...]:
        return self.layer.spec.group_bits

    def stored_bits(self) -> int:
        return self.layer.stored_bits()

    def dequantize(self) -> torch.Tensor:
        return self.layer.dequantize()

    def state(self):
        """The checkpoint's tensors."""
        tensors = self.layer.tensors()
        if self.layer.bias is not None:
            tensors["bias"] = self.layer.bias
        return tensors, {"spec": json.dumps(self.layer.spec.to_dict())}

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> VQResult:
        spec = LayerSpec.from_dict(json.loads(meta["spec"]))
        groups = range(len(spec.group_bits))
        books = [
            decode_codebook(tensors[f"codebooks_{g}"], tensors.get(f"codebook_scales_{g}"))
            for g in groups
        ]
        return cls(
            QuantizedLayer(
                spec,
                tensors["perm"],
                [tensors[f"codes_{g}"] for g in groups],
                books,
                tensors.get("bias"),
                tensors.get("scales"),
            )
        )

    def install(self, model: nn.Module, name: str, layer: nn.Module) -> None:
        """Replace the layer by its `VQLinear`."""
        weight = weight_matrix(layer)
        module = self.layer.module()
        set_module(model, name, module.to(weight.device, weight.dtype))

    def spec(self) -> LayerSpec:
        return self.layer.spec


@dataclass
class WeightResult:
    """A scalar baseline's dequantized weight and the bits its packed format would take; it is
    written into the layer itself (so `Conv1D` layers keep their layout) and saved as a plain
    checkpoint tensor."""

    weight: torch.Tensor
    bits: int

    @property
    def group_bits(self) -> tuple[int, ...]:
        return (round(self.bits / self.weight.numel()),)

    def stored_bits(self) -> int:
        return self.bits

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def state(self):
        return {"weight": self.weight}, {"stored_bits": str(self.bits)}

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> WeightResult:
        return cls(tensors["weight"], int(meta["stored_bits"]))

    def install(self, model: nn.Module, name: str, layer: nn.Module) -> None:
        weight = weight_matrix(layer)
        weight.data.copy_(self.weight.to(weight.dtype))

    def spec(self) -> None:
        return None


@dataclass(frozen=True)
class Method:
    """One quantization method: how to configure it, what it needs, how it quantizes a layer
    (`quantize(config, layer, fisher, hessian) -> (result, EDSG step)`), how a stored result
    is read back."""

    name: str
    summary: str
    config_type: type
    configure: Callable[..., object]  # (bits, seed, **options) -> config
    quantize: Callable[..., tuple[LayerResult, float]]
    load: Callable[[dict, dict], LayerResult]

    def needs(self, config) -> frozenset[str]:
        """The statistics `config` asks for: Fisher factors, input Hessians, both or none."""
        wanted = {FISHER: config.needs_stats, HESSIAN: config.needs_hessian}
        return frozenset(k for k, v in wanted.items() if v)


def _vq(config: RSAVQConfig, layer, fisher, hessian):
    W = weight_matrix(layer)
    quantized, step = quantize_layer(W, fisher, config, layer.bias, hessian)
    return VQResult(quantized), step


def _scalar(config: ScalarConfig, layer, fisher, hessian):
    W = weight_matrix(layer).detach().float().cpu()
    if config.method == "rtn":
        W_hat = rtn(W, config.bits, config.group_size)
    else:
        W_hat = gptq(W, hessian, config.bits, config.group_size, config.act_order, config.damping)
    act_order = config.method == "gptq" and config.act_order
    return WeightResult(W_hat, scalar_bits(W.shape, config.bits, config.group_size, act_order)), 0.0


def _checked(name: str, config_type: type, options: dict) -> dict:
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not an option of method {name}; drop it")
    return options


def _preset_maker(fixed: str | None):
    def make(bits: float, seed: int = 0, preset_name: str = "default", **options) -> RSAVQConfig:
        options = _checked(fixed or "rsavq", RSAVQConfig, options)
        return preset(fixed or preset_name, bits, seed=seed, **options)

    return make


def _scalar_maker(name: str):
    def make(bits: float, seed: int = 0, **options) -> ScalarConfig:
        if bits != int(bits):
            raise UsageError(f"method {name} needs whole bits, not {bits}")
        return ScalarConfig(name, int(bits), **_checked(name, ScalarConfig, options))

    return make


METHODS: dict[str, Method] = {
    "rsavq": Method(
        "rsavq",
        "RSAVQ product VQ (presets default | paper | kmeans)",
        RSAVQConfig,
        _preset_maker(None),
        _vq,
        VQResult.load,
    ),
    "kmeans": Method(
        "kmeans",
        "plain product VQ: the rsavq quantizer under the kmeans preset",
        RSAVQConfig,
        _preset_maker("kmeans"),
        _vq,
        VQResult.load,
    ),
    "gptq": Method(
        "gptq",
        "GPTQ, scalar, asymmetric, groups of columns, act-order",
        ScalarConfig,
        _scalar_maker("gptq"),
        _scalar,
        WeightResult.load,
    ),
    "rtn": Method(
        "rtn",
        "round to nearest, scalar, asymmetric, groups of columns",
        ScalarConfig,
        _scalar_maker("rtn"),
        _scalar,
        WeightResult.load,
    ),
}


def method_for(config) -> Method:
    """The registered method a configuration belongs to (by its `method` name)."""
    try:
        return METHODS[config.method]
    except (AttributeError, KeyError):
        raise UsageError(
            f"no registered method for {type(config).__name__}; use one of {', '.join(METHODS)}"
        ) from None
