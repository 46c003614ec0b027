"""Typed, versioned configuration of RSAVQ, and the per-layer spec stored in checkpoints.

Glossary of tensor names (one vocabulary everywhere):
- `W` `[m, n]`: a linear layer's weight (`out_features`, `in_features`); `T`: the EDSG target.
- `perm` `[n]`: input-channel order (most sensitive first); `x[..., perm]` meets the codes.
- a *group* g: `group_sizes[g]` consecutive permuted columns, quantized at `group_bits[g]`.
- a *vector*: `vector_length` (v) consecutive weights of one row within a group (padded at the
  group's end); split into `sub_vectors` (P) sub-vectors of `sub_dim = v / P` weights.
- `codebooks[g]` `[P, K_g, sub_dim]` fp16, `K_g = 2 ** code_bits(g)`, `code_bits = b_g * sub_dim`.
- `codes[g]` `[m, words]` int32: per row, the `n_vectors(g) * P` codes packed at `code_bits` each.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

from rsavq.errors import UsageError
from rsavq.modules import DEFAULT_SKIP

FORMAT_VERSION = 1
QUANT_METHOD = "rsavq"  # `quantization_config.quant_method` of rsavq checkpoints
MAX_CODE_BITS = 16


class LambdaMode(str, Enum):
    RELATIVE = "relative"  # step = lambda * ||W||_F along ng / ||ng||_F
    RAW = "raw"  # step = lambda * ng


class EdsgSign(str, Enum):
    DESCENT = "descent"  # T = W - lambda * ng (ALGORITHM.md section 3)
    PAPER = "paper"  # T = W + lambda * ng: the paper's literal sign, for the sign test only


class Metric(str, Enum):
    EUCLIDEAN = "euclidean"
    FISHER_DIAG = "fisher_diag"


class Allocation(str, Enum):
    PAPER = "paper"
    RATE_DISTORTION = "rate-distortion"


class Compensation(str, Enum):
    NONE = "none"  # the paper's method: every vector assigned independently
    FISHER = "fisher"  # OBS/GPTQ-style error feedback with F_I as the Hessian (an extension)
    HESSIAN = "hessian"  # ... with GPTQ's input Hessian X^T X (needs input statistics)


class ChannelAxis(str, Enum):
    INPUT = "input"  # columns of W (the paper's choice)
    OUTPUT = "output"  # rows of W, for comparison


@dataclass(frozen=True)
class RSAVQConfig:
    """Everything that defines an RSAVQ quantization run (ALGORITHM.md sections 2-4)."""

    bits: float = 2.0  # average code bits per weight; fractional budgets allowed
    vector_length: int = 6
    sub_vectors: int = 2
    groups: int = 1  # measured best on SmolLM2 (BENCHMARKS.md); the paper uses 4
    lam: float = 0.01
    lambda_mode: LambdaMode = LambdaMode.RELATIVE
    edsg_sign: EdsgSign = EdsgSign.DESCENT
    metric: Metric = Metric.EUCLIDEAN
    allocation: Allocation = Allocation.PAPER
    channel_axis: ChannelAxis = ChannelAxis.INPUT
    compensation: Compensation = Compensation.NONE
    uniform_bits: bool = False  # every group at `bits` (with groups=1: no WCSG)
    budget_includes_overhead: bool = False  # True: codebooks + perm count against the budget
    min_group_bits: int = 1
    max_group_bits: int = 5
    kmeans_iters: int = 20
    kmeans_tol: float = 1e-4
    damping: float = 0.01
    seed: int = 0
    skip: tuple[str, ...] = DEFAULT_SKIP
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        validate(self)

    @property
    def sub_dim(self) -> int:
        return self.vector_length // self.sub_vectors

    @property
    def needs_stats(self) -> bool:
        """False for the plain k-means baseline (no EDSG, no WCSG, Euclidean)."""
        no_wcsg = self.uniform_bits and self.groups == 1
        plain = self.lam == 0 and no_wcsg and self.metric == Metric.EUCLIDEAN
        return not (plain and self.compensation != Compensation.FISHER)

    @property
    def needs_hessian(self) -> bool:
        """True when error compensation uses the input Hessian `X^T X`."""
        return self.compensation == Compensation.HESSIAN

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> RSAVQConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise UsageError(
                f"unknown RSAVQ config keys {sorted(unknown)}; is the checkpoint "
                "from a newer rsavq? upgrade rsavq"
            )
        kwargs = dict(data)
        if "skip" in kwargs:
            kwargs["skip"] = tuple(kwargs["skip"])
        return replace(cls(), **_enums(kwargs))


def _enums(kwargs: dict) -> dict:
    types = {
        "lambda_mode": LambdaMode,
        "edsg_sign": EdsgSign,
        "metric": Metric,
        "allocation": Allocation,
        "channel_axis": ChannelAxis,
        "compensation": Compensation,
    }
    for key, enum in types.items():
        if key in kwargs:
            try:
                kwargs[key] = enum(kwargs[key])
            except ValueError:
                choices = ", ".join(e.value for e in enum)
                raise UsageError(f"{key} '{kwargs[key]}' unknown; use one of {choices}") from None
    return kwargs


def validate(config: RSAVQConfig) -> None:
    """Refuse configurations that cannot be quantized, naming the fix."""
    v, P = config.vector_length, config.sub_vectors
    if v < 1 or P < 1 or v % P:
        raise UsageError(f"vector length {v} must be a positive multiple of sub-vectors {P}")
    if not 1 <= config.min_group_bits <= config.max_group_bits:
        raise UsageError("need 1 <= min_group_bits <= max_group_bits")
    if not config.min_group_bits <= config.bits <= config.max_group_bits:
        raise UsageError(
            f"unsupported bits {config.bits}: use a value from "
            f"{config.min_group_bits} to {config.max_group_bits} (2, 3 or 4 typical)"
        )
    if config.max_group_bits * config.sub_dim > MAX_CODE_BITS:
        raise UsageError(
            f"codes of {config.max_group_bits} bits x {config.sub_dim} weights exceed "
            f"{MAX_CODE_BITS} bits; lower max_group_bits or the vector length"
        )
    if config.uniform_bits and config.bits != int(config.bits):
        raise UsageError("uniform bits need a whole number of bits")
    if config.compensation != Compensation.NONE and config.channel_axis != ChannelAxis.INPUT:
        raise UsageError("error compensation works along input channels; use --channel-axis input")
    if config.groups < 1 or config.kmeans_iters < 1 or config.lam < 0 or config.damping < 0:
        raise UsageError("groups and k-means iterations must be >= 1; lambda, damping >= 0")


@dataclass(frozen=True)
class LayerSpec:
    """What is needed to rebuild one quantized layer from the config alone."""

    in_features: int
    out_features: int
    group_sizes: tuple[int, ...]  # channels per group along `axis`, most sensitive first
    group_bits: tuple[int, ...]
    vector_length: int
    sub_vectors: int
    axis: str = ChannelAxis.INPUT.value
    bias: bool = False

    @property
    def perm_dtype(self):
        import torch

        return torch.int16 if self.channels <= 2**15 else torch.int32

    @property
    def channels(self) -> int:
        return self.in_features if self.axis == ChannelAxis.INPUT.value else self.out_features

    def block_shape(self, g: int) -> tuple[int, int]:
        """`[rows, cols]` of group g's block of permuted weights (vectors run along cols)."""
        if self.axis == ChannelAxis.INPUT.value:
            return self.out_features, self.group_sizes[g]
        return self.group_sizes[g], self.in_features

    @property
    def sub_dim(self) -> int:
        return self.vector_length // self.sub_vectors

    def code_bits(self, g: int) -> int:
        return self.group_bits[g] * self.sub_dim

    def n_vectors(self, g: int) -> int:
        return math.ceil(self.block_shape(g)[1] / self.vector_length)

    def codes_per_row(self, g: int) -> int:
        return self.n_vectors(g) * self.sub_vectors

    def to_dict(self) -> dict:
        data = asdict(self)
        data["group_sizes"], data["group_bits"] = list(self.group_sizes), list(self.group_bits)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LayerSpec:
        return _spec_from_json(text)

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        data = dict(data)
        data["group_sizes"], data["group_bits"] = (
            tuple(data["group_sizes"]),
            tuple(data["group_bits"]),
        )
        return cls(**data)


@functools.lru_cache(maxsize=4096)
def _spec_from_json(text: str) -> LayerSpec:  # kernels pass specs to custom ops as JSON
    return LayerSpec.from_dict(json.loads(text))


@dataclass(frozen=True)
class ScalarConfig:
    """The scalar baselines (`--method rtn|gptq`): asymmetric, per-row groups of input columns."""

    method: str = "gptq"  # "rtn" or "gptq"
    bits: int = 4
    group_size: int = 128
    act_order: bool = True  # GPTQ only
    damping: float = 0.01  # GPTQ only: fraction of mean(diag H)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "gptq"):
            raise UsageError(f"scalar method '{self.method}' unknown; use rtn or gptq")
        if not 1 <= self.bits <= 8 or self.group_size < 1:
            raise UsageError("scalar baselines need 1 <= bits <= 8 and a group size >= 1")

    @property
    def needs_stats(self) -> bool:
        return False

    @property
    def needs_hessian(self) -> bool:
        return self.method == "gptq"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        return data
