"""Typed, versioned configuration of RSAVQ, and the per-layer spec stored in checkpoints.

Glossary of tensor names (one vocabulary everywhere):
- `W` `[m, n]`: a linear layer's weight (`out_features`, `in_features`); `T`: the EDSG target.
- `perm` `[n]`: input-channel order (most sensitive first); `x[..., perm]` meets the codes.
- a *group* g: `group_sizes[g]` consecutive permuted columns, quantized at `group_bits[g]`.
- a *vector*: `vector_length` (v) consecutive weights of one row within a group (padded at the
  group's end); split into `sub_vectors` (P) sub-vectors of `sub_dim = v / P` weights.
- `codebooks[g]` `[P, K_g, sub_dim]` fp16, `K_g = 2 ** code_bits(g)`, `code_bits = b_g * sub_dim`.
- `codes[g]` `[m, words]` int32: per row, the `n_vectors(g) * P` codes packed at `code_bits` each.
- `scales` `[m]` fp16 (when `row_scales`): row i of the weight is `scales[i]` times its decoded row.
- a *block*: consecutive columns of one channel group that share codebooks; each block is stored
  as a group of its own (same bits), so more blocks mean more, smaller-scope codebooks.
- `codebook_dtype` "int8": a codebook is stored as int8 with one fp16 scale per sub-vector
  position (`codebook_scales_*` `[P]`); it decodes to `fp16(int8 * scale)`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import ClassVar, NamedTuple

from rsavq.errors import UsageError
from rsavq.modules import DEFAULT_SKIP, name_matches

FORMAT_VERSION = 3  # 2: optional per-row scales; 3: optional int8 codebooks
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # each older version is the next without its options
QUANT_METHOD = "rsavq"  # `quantization_config.quant_method` of rsavq checkpoints
MAX_CODE_BITS = 16


class EdsgSign(str, Enum):
    DESCENT = "descent"  # T = W - lambda * ng (docs/method.md section 3)
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


class ChannelOrder(str, Enum):
    FISHER = "fisher"  # WCSG: input channels by Fisher curvature (the paper)
    HESSIAN = "hessian"  # GPTQ's act-order: by diag(X^T X); needs input Hessians


class CodebookDtype(str, Enum):
    FLOAT16 = "float16"
    INT8 = "int8"  # int8 entries, an fp16 scale per sub-vector position (GPTVQ)


@dataclass(frozen=True)
class RSAVQConfig:
    """Everything that defines an RSAVQ quantization run (docs/method.md sections 2-7)."""

    method: ClassVar[str] = "rsavq"  # its entry in `rsavq.methods.METHODS`
    bits: float = 2.0  # average code bits per weight; fractional budgets allowed
    vector_length: int = 0  # 0: by bits (`default_vector_length`)
    sub_vectors: int = 1
    groups: int = 1  # measured best on SmolLM2 (BENCHMARKS.md); the paper uses 4
    lam: float = 0.01  # EDSG step, relative: `lambda * ||W||` along `ng` (docs/method.md 3)
    edsg_sign: EdsgSign = EdsgSign.DESCENT
    metric: Metric = Metric.EUCLIDEAN
    allocation: Allocation = Allocation.PAPER
    compensation: Compensation = Compensation.HESSIAN
    block_size: int = 0  # columns per codebook within a channel group; 0: see codebook_overhead
    codebook_overhead: float = 0.04  # block_size 0: blocks sized for about this many codebook
    # bits per weight (never smaller than needed); 0 with block_size 0: one codebook per group
    row_scales: bool = True  # an fp16 scale per output row; the codebooks see unit-RMS rows
    codebook_dtype: CodebookDtype = CodebookDtype.FLOAT16
    refit: bool = True  # after assignment: codebooks and scales refit to the Hessian objective
    order: ChannelOrder = ChannelOrder.FISHER
    sequential: bool = True  # input Hessians from the already-quantized prefix, block by block
    # within a block too: each stage of linears (q/k/v, o, gate/up, down) calibrated on what the
    # block's quantized earlier stages produce (GPTQ's true-sequential); needs `sequential`
    true_sequential: bool = False
    uniform_bits: bool = False  # every group at `bits` (with groups=1: no WCSG)
    budget_includes_overhead: bool = False  # True: codebooks + perm count against the budget
    min_group_bits: int = 1
    max_group_bits: int = 5
    kmeans_iters: int = 20
    kmeans_tol: float = 1e-4
    damping: float = 0.01
    seed: int = 0
    skip: tuple[str, ...] = DEFAULT_SKIP
    # (fnmatch pattern on the qualified name or its last part, bits): matching layers take these
    # bits instead of `bits` (the first pattern that matches wins)
    layer_bits: tuple[tuple[str, float], ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.vector_length == 0:
            object.__setattr__(self, "vector_length", default_vector_length(self.bits))
        pairs = tuple((str(p), float(b)) for p, b in self.layer_bits)
        object.__setattr__(self, "layer_bits", pairs)
        validate(self)
        for pattern, bits in pairs:
            try:
                replace(self, bits=bits, layer_bits=())
            except UsageError as e:
                raise UsageError(f"layer bits {pattern}={bits:g}: {e}") from None

    def for_layer(self, name: str) -> RSAVQConfig:
        """The configuration layer `name` is quantized with (`layer_bits` applied)."""
        for pattern, bits in self.layer_bits:
            if name_matches(name, pattern):
                return replace(self, bits=bits, layer_bits=())
        return self

    @property
    def sub_dim(self) -> int:
        return self.vector_length // self.sub_vectors

    @property
    def bit_range(self) -> tuple[int, int]:
        """Bits a group may get: `max_group_bits` capped so codes fit in 16 bits."""
        return self.min_group_bits, min(self.max_group_bits, MAX_CODE_BITS // self.sub_dim)

    @property
    def needs_stats(self) -> bool:
        """False for the plain k-means baseline (no EDSG, no WCSG, Euclidean)."""
        no_wcsg = self.uniform_bits and self.groups == 1
        plain = self.lam == 0 and no_wcsg and self.metric == Metric.EUCLIDEAN
        return not (plain and self.compensation != Compensation.FISHER)

    @property
    def needs_hessian(self) -> bool:
        """True when error compensation, refit or the channel order use `X^T X`."""
        return (
            self.compensation == Compensation.HESSIAN
            or self.refit
            or self.order == ChannelOrder.HESSIAN
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        data["layer_bits"] = [list(pair) for pair in self.layer_bits]
        if not self.layer_bits:  # (the identity of configurations from before the option)
            del data["layer_bits"]
        for key in ("true_sequential", "codebook_dtype"):
            if data[key] == getattr(RSAVQConfig, key):
                del data[key]
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> RSAVQConfig:
        known = {f.name: f for f in fields(cls)}
        data = _without_removed(data)
        unknown = set(data) - set(known)
        if unknown:
            raise UsageError(
                f"unknown RSAVQ config keys {sorted(unknown)}; is the checkpoint "
                "from a newer rsavq? upgrade rsavq"
            )
        kwargs = dict(data)
        if "skip" in kwargs:
            kwargs["skip"] = tuple(kwargs["skip"])
        if "layer_bits" in kwargs:
            kwargs["layer_bits"] = tuple(tuple(pair) for pair in kwargs["layer_bits"])
        return cls(**_enums(kwargs))


# options removed since they were written: the value that means "off" and what they were (a
# checkpoint that used one cannot be read: its layers need what was removed)
REMOVED = {
    "codebook_scope": ("layer", "block-shared codebooks"),
    "codebook_fallback": (0.0, "block-shared codebooks"),
    "lambda_mode": ("relative", "the raw EDSG step"),
    "channel_axis": ("input", "output-channel groups"),
}


def _without_removed(data: dict) -> dict:
    used = sorted(k for k, (off, _) in REMOVED.items() if k in data and data[k] != off)
    if used:
        what = sorted({REMOVED[k][1] for k in used})
        raise UsageError(
            f"this checkpoint was quantized with {', '.join(used)} ({', '.join(what)}), "
            "which rsavq no longer supports; quantize the model again"
        )
    return {k: v for k, v in data.items() if k not in REMOVED}


def _enums(kwargs: dict) -> dict:
    types = {
        "edsg_sign": EdsgSign,
        "metric": Metric,
        "allocation": Allocation,
        "compensation": Compensation,
        "order": ChannelOrder,
        "codebook_dtype": CodebookDtype,
    }
    for key, enum in types.items():
        if key in kwargs:
            try:
                kwargs[key] = enum(kwargs[key])
            except ValueError:
                choices = ", ".join(e.value for e in enum)
                raise UsageError(f"{key} '{kwargs[key]}' unknown; use one of {choices}") from None
    return kwargs


def default_vector_length(bits: float) -> int:
    """Vector length by width: 4 below 2.5 bits (256-entry codebooks at 2 bits), else 2."""
    return 4 if bits < 2.5 else 2


def _check_true_sequential(config: RSAVQConfig | ScalarConfig) -> None:
    if config.true_sequential and not config.sequential:
        raise UsageError(
            "--true-sequential stages the block-sequential pass; drop --one-pass"
            " (or --true-sequential)"
        )


def validate(config: RSAVQConfig) -> None:
    """Refuse configurations that cannot be quantized, naming the fix."""
    _check_true_sequential(config)
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
    if math.ceil(config.bits) * config.sub_dim > MAX_CODE_BITS:
        raise UsageError(
            f"codes of {math.ceil(config.bits)} bits x {config.sub_dim} weights exceed "
            f"{MAX_CODE_BITS} bits; lower the vector length"
        )
    if config.uniform_bits and config.bits != int(config.bits):
        raise UsageError("uniform bits need a whole number of bits")
    if config.block_size < 0 or config.codebook_overhead < 0:
        raise UsageError("block size and codebook overhead must be >= 0")
    if config.block_size and config.block_size % v:
        raise UsageError(
            f"block size {config.block_size} must be a multiple of the vector length {v}"
        )
    if config.groups < 1 or config.kmeans_iters < 1 or config.lam < 0 or config.damping < 0:
        raise UsageError("groups and k-means iterations must be >= 1; lambda, damping >= 0")


@dataclass(frozen=True)
class LayerSpec:
    """What is needed to rebuild one quantized layer from the config alone."""

    in_features: int
    out_features: int
    group_sizes: tuple[int, ...]  # input channels per group, most sensitive first
    group_bits: tuple[int, ...]
    vector_length: int
    sub_vectors: int
    bias: bool = False
    row_scales: bool = False
    codebook_dtype: str = CodebookDtype.FLOAT16.value

    @property
    def perm_dtype(self):
        import torch

        return torch.int16 if self.in_features <= 2**15 else torch.int32

    def block_shape(self, g: int) -> tuple[int, int]:
        """`[rows, cols]` of group g's block of permuted weights (vectors run along cols)."""
        return self.out_features, self.group_sizes[g]

    @property
    def sub_dim(self) -> int:
        return self.vector_length // self.sub_vectors

    def code_bits(self, g: int) -> int:
        return self.group_bits[g] * self.sub_dim

    def n_vectors(self, g: int) -> int:
        return math.ceil(self.block_shape(g)[1] / self.vector_length)

    def codes_per_row(self, g: int) -> int:
        return self.n_vectors(g) * self.sub_vectors

    def codebook_shape(self, g: int) -> tuple[int, int, int]:
        return self.sub_vectors, 2 ** self.code_bits(g), self.sub_dim

    def to_dict(self) -> dict:
        data = asdict(self)
        data["group_sizes"], data["group_bits"] = list(self.group_sizes), list(self.group_bits)
        if data["codebook_dtype"] == LayerSpec.codebook_dtype:  # (specs from before the option)
            del data["codebook_dtype"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LayerSpec:
        return _spec_from_json(text)

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        data = dict(data)
        if data.pop("codebook_source", ""):
            raise UsageError(
                "this checkpoint's layers read block-shared codebooks (--codebook-scope block), "
                "which rsavq no longer supports; quantize the model again"
            )
        if data.pop("axis", "input") != "input":
            raise UsageError(
                "this checkpoint's layers group output channels (--channel-axis output), "
                "which rsavq no longer supports; quantize the model again"
            )
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
    sequential: bool = True  # GPTQ only: Hessians from the already-quantized prefix
    true_sequential: bool = False  # GPTQ only: and from the block's quantized earlier stages

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "gptq"):
            raise UsageError(f"scalar method '{self.method}' unknown; use rtn or gptq")
        _check_true_sequential(self)
        if not 1 <= self.bits <= 8 or self.group_size < 1:
            raise UsageError("scalar baselines need 1 <= bits <= 8 and a group size >= 1")

    @property
    def needs_stats(self) -> bool:
        return False

    @property
    def needs_hessian(self) -> bool:
        return self.method == "gptq"

    def for_layer(self, name: str) -> ScalarConfig:
        """Every layer takes the same scalar configuration."""
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        if not self.true_sequential:  # (the identity of configurations from before the option)
            del data["true_sequential"]
        return data


PRESETS = ("default", "paper", "kmeans")

# the 3-bit default's text: calibration windows (Fisher statistics, Hessians, block fine-tuning)
# and distillation windows; the other widths' are in `default_windows`
CALIBRATION_WINDOWS = 64
DISTILL_WINDOWS = 128


class TextBudget(NamedTuple):
    """The calibration text the default reads at one width, per use."""

    fisher: int  # windows of the Fisher statistics (EDSG, WCSG)
    calibration: int  # windows of the input Hessians and block fine-tuning
    distillation: int  # windows of end-to-end distillation (0: the default does not distill)
    block_epochs: int  # passes of block fine-tuning over its windows


def default_windows(bits: float) -> TextBudget:
    """The default's text at `bits` (SmolLM2-135M; BENCHMARKS.md, Cost and Results).
    - 2 bits is data-bound: 128 calibration and 256 distillation windows (47.59 over 16 windows
      bf16, against 50.01 with 64 and 256 and 53.66 with 64 and 128), and one pass of block
      fine-tuning (47.48 against two passes' 47.59, in 29.1 minutes against 31.9).
    - 3 bits: halving both to 64 and 128 kept it within 3% at 0.6x the time.
    - 4 bits: 128 calibration windows, two passes of block fine-tuning and no distillation, whose
      held-out KL did not fall at 4 bits: 23.12 on the headline protocol (148 windows, fp32)
      against 23.48 with 64 calibration windows and distillation on 128."""
    if bits < 2.5:
        return TextBudget(2 * CALIBRATION_WINDOWS, 2 * CALIBRATION_WINDOWS, 2 * DISTILL_WINDOWS, 1)
    if bits < 3.5:
        return TextBudget(CALIBRATION_WINDOWS, CALIBRATION_WINDOWS, DISTILL_WINDOWS, 2)
    return TextBudget(2 * CALIBRATION_WINDOWS, 2 * CALIBRATION_WINDOWS, 0, 2)


def describe_default(field: str, unit: str = "") -> str:
    """A `TextBudget` field's default per width, for help texts: "128 at 2 and 4 bits, 64 at 3"."""
    by_value: dict[int, list[str]] = {}
    for bits in (2, 3, 4):
        by_value.setdefault(getattr(default_windows(bits), field), []).append(str(bits))
    parts = [f"{value}{unit} at {' and '.join(widths)}" for value, widths in by_value.items()]
    return ", ".join(parts) + " bits"


def default_widths(bits: float) -> dict:
    """The default's settings that depend on the width: at 3 and 4 bits `k_proj` and `v_proj`
    take one bit more. On SmolLM2-135M they are 6.25% of the weights and cost 5-18x more
    perplexity per weight than the other roles; one more bit on them took the 3-bit model from
    38.93 to 29.97 (16 windows) at 3.150 bits/weight (BENCHMARKS.md, "Where the error
    costs perplexity"). At 4 bits a 5-bit codebook cannot be spread over less than a whole k/v
    layer, so the other layers' codebooks are halved to fit under 4.15 (`codebook_overhead`
    0.02: 4.1455 bits/weight, 23.40 -> 22.48 over 16 windows), and stored in int8 (`codebook_dtype`:
    its bits buy more blocks of columns; under the full default 22.65 against 22.93 over all 148
    windows, 21.66 against 22.13 over 16; at 2 and 3 bits int8 does not win: BENCHMARKS.md,
    "Codebook format under the full default"). At 2 bits the wider k/v do not fit under 2.15
    bits/weight."""
    if bits == 3:
        return {"layer_bits": (("k_proj", 4), ("v_proj", 4))}
    if bits == 4:
        return {
            "layer_bits": (("k_proj", 5), ("v_proj", 5)),
            "codebook_overhead": 0.02,
            "codebook_dtype": CodebookDtype.INT8,
        }
    return {}


def preset(name: str, bits: float, **overrides) -> RSAVQConfig:
    """A named configuration at `bits`, with `overrides` (field names) on top.

    - `default`: the best configuration measured (BENCHMARKS.md): vectors by width, blocks of
      columns sharing codebooks (int8 at 4 bits; fp16 at 2 and 3, where int8 does not win under
      the full default: BENCHMARKS.md, "Codebook format under the full default"), row scales,
      block-sequential Hessians, OBS assignment, refit, EDSG; at 3 and 4 bits the key and value
      projections one bit wider (`default_widths`).
    - `paper`: RSAVQ as published: 4 Fisher-sorted groups under an exact budget (codebooks and
      permutation count), EDSG lambda 0.01 (relative), 6-weight vectors as 2 sub-vectors of 3,
      one codebook per group, every vector assigned independently, no scales.
    - `kmeans`: the plain product-VQ baseline: the default's vector shape, one codebook per
      layer, no EDSG, no WCSG, no scales, no Hessian.
    """
    plain = {
        "compensation": Compensation.NONE,
        "codebook_overhead": 0.0,
        "row_scales": False,
        "refit": False,
    }
    if name == "default":
        base = default_widths(bits)
    elif name == "paper":
        base = {**plain, "vector_length": 6, "sub_vectors": 2, "groups": 4}
        base["budget_includes_overhead"] = True
    elif name == "kmeans":
        base = {**plain, "groups": 1, "uniform_bits": True, "lam": 0.0}
    else:
        raise UsageError(f"preset '{name}' unknown; use one of {', '.join(PRESETS)}")
    return RSAVQConfig.from_dict({**base, "bits": bits, **overrides})
