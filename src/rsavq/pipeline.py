"""Quantize a whole model layer by layer, resumably, and write the checkpoint and report.

Work in progress lives in `OUT/.partial/`: `run.json` (what this run is) and one safetensors file
per finished layer. A killed run resumes from there; the finished checkpoint replaces it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from rsavq.algorithms.metrics import layer_metrics
from rsavq.algorithms.rsavq import QuantizedLayer, quantize_layer
from rsavq.algorithms.scalar import gptq, rtn, scalar_bits
from rsavq.config import LayerSpec, RSAVQConfig, ScalarConfig
from rsavq.errors import UsageError
from rsavq.io import atomic_write, atomic_write_json
from rsavq.modules import require_linears, weight_matrix
from rsavq.serialization import quantization_config, save_quantized, set_module
from rsavq.stats.artifact import FisherStats, config_hash
from rsavq.stats.hessian import input_hessians
from rsavq.stats.sequential import sequential_hessians

logger = logging.getLogger(__name__)

PARTIAL = ".partial"


@dataclass(frozen=True)
class LayerRecord:
    """One row of the report."""

    name: str
    shape: tuple[int, int]
    group_bits: tuple[int, ...]
    bits_per_weight: float  # stored bits / weights, counted from the tensors
    step_norm: float  # ||lambda * ng|| / ||W||
    metrics: dict
    seconds: float


@dataclass
class FakeQuantLayer:
    """A scalar baseline's result: the dequantized weight and the bits its packed format takes."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    spec = None  # no VQ spec: a plain checkpoint tensor

    def stored_bits(self) -> int:
        return self.bits

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def dequantize(self) -> torch.Tensor:
        return self.weight


def quantize_model(
    model: nn.Module,
    config: RSAVQConfig | ScalarConfig,
    stats: FisherStats | None,
    out: str | Path,
    tokenizer=None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    calibration_id: dict | None = None,
) -> list[LayerRecord]:
    """Quantize the model's linears and write the checkpoint to `out`.

    RSAVQ configs give `VQLinear`s and an rsavq checkpoint; the scalar baselines give a plain
    checkpoint of their dequantized weights (their bits are those of the GPTQ packed format).
    Methods that need input Hessians (`config.needs_hessian`) get them from the `calibration`
    token windows `[N, T]`: block by block from the already-quantized prefix when
    `config.sequential`, else in one pass over the FP model. `calibration_id` describes those
    windows and joins the run's identity.
    """
    out = Path(out)
    layers = require_linears(model, config.skip)
    if stats is not None:
        stats.check_model(model, layers)
    if config.needs_hessian and calibration is None:
        raise UsageError("this method needs calibration windows for its input Hessians")
    run = {
        "config": config.to_dict(),
        "model_config_hash": config_hash(model.config),
        "stats": stats.manifest["calibration"] if stats else None,
        "hessians": calibration_id if config.needs_hessian else None,
    }
    work = _prepare(out, run)
    records, specs = [], {}
    quantizer = _quantizer(config, stats)
    bar = tqdm(total=len(layers), desc="quantize", unit="layer", disable=not progress)
    for batch in _hessian_schedule(model, layers, config, calibration, work):
        for name, hessian in batch.items():
            layer = layers[name]
            quantized, record = _layer(name, layer, quantizer, hessian, stats, work)
            _install(model, name, layer, quantized)
            records.append(record)
            if quantized.spec is not None:
                specs[name] = quantized.spec
            bar.update()
    bar.close()
    qconfig = quantization_config(config.to_dict(), specs) if specs else None
    save_quantized(model, out, qconfig, tokenizer)
    write_report(out, records)
    shutil.rmtree(work, ignore_errors=True)
    return records


def _install(model: nn.Module, name: str, layer: nn.Module, quantized) -> None:
    """Put the result in the model: a `VQLinear` in the layer's place, or a scalar baseline's
    dequantized weight into the layer itself (so `Conv1D` layers keep their layout)."""
    weight = weight_matrix(layer)
    if quantized.spec is None:
        weight.data.copy_(quantized.weight.to(weight.dtype))
    else:
        set_module(model, name, quantized.module().to(weight.device, weight.dtype))


def _hessian_schedule(model, layers, config, calibration, work: Path):
    """Batches `{name: H or None}` in model order (see `stats.sequential`)."""
    if not config.needs_hessian:
        yield dict.fromkeys(layers)
        return
    done = lambda name: _layer_path(work, name).exists()  # noqa: E731
    if config.sequential:
        yield from sequential_hessians(model, layers, calibration, done)
        return
    todo = {n: m for n, m in layers.items() if not done(n)}
    hessians = input_hessians(model, todo, calibration) if todo else {}
    yield {n: hessians.get(n) for n in layers}


def _quantizer(config, stats: FisherStats | None):
    """`(name, layer, hessian) -> (QuantizedLayer | FakeQuantLayer, EDSG step)` for the method."""
    if isinstance(config, ScalarConfig):

        def scalar(name, layer, hessian):
            W = weight_matrix(layer).detach().float().cpu()
            if config.method == "rtn":
                W_hat = rtn(W, config.bits, config.group_size)
            else:
                W_hat = gptq(
                    W, hessian, config.bits, config.group_size, config.act_order, config.damping
                )
            act_order = config.method == "gptq" and config.act_order
            bits = scalar_bits(W.shape, config.bits, config.group_size, act_order)
            return FakeQuantLayer(W_hat, _bias(layer), bits), 0.0

        return scalar

    def vq(name, layer, hessian):
        layer_stats = stats.layer(name) if stats is not None else None
        return quantize_layer(weight_matrix(layer), layer_stats, config, layer.bias, hessian)

    return vq


def _bias(layer: nn.Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().cpu()


def check_output_dir(out: Path) -> None:
    """Refuse an output directory holding a checkpoint or other files (nothing is overwritten)."""
    if (out / "config.json").exists():
        raise UsageError(
            f"{out} already holds a checkpoint; choose another --out or delete it "
            "(nothing was overwritten)"
        )
    if out.is_file() or out.exists() and any(p.name != PARTIAL for p in out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no rsavq work; choose another --out")


def _prepare(out: Path, run: dict) -> Path:
    """Check `out` holds nothing of another run; return the work directory."""
    work = out / PARTIAL
    check_output_dir(out)
    if (work / "run.json").exists():
        if json.loads((work / "run.json").read_text()) != json.loads(json.dumps(run)):
            raise UsageError(
                f"{out} holds an interrupted run with other settings; rerun it with "
                "the same settings to resume, or choose another --out"
            )
        done = len(list((work / "layers").glob("*.safetensors")))
        logger.info("resuming in %s: %d layers already quantized", out, done)
    else:
        atomic_write_json(work / "run.json", run)
    return work


def _layer_path(work: Path, name: str) -> Path:
    return work / "layers" / f"{name}.safetensors"


def _layer(name, layer, quantizer, hessian, stats, work):
    path = _layer_path(work, name)
    if path.exists():
        return _read_layer(path)
    start = time.perf_counter()
    quantized, step = quantizer(name, layer, hessian)
    W_hat = quantized.dequantize()
    W = weight_matrix(layer).detach().float().cpu()
    layer_stats = stats.layer(name) if stats is not None else None
    if quantized.spec is not None:
        group_bits = quantized.spec.group_bits
    else:
        group_bits = (round(quantized.bits / W.numel()),)
    record = LayerRecord(
        name,
        tuple(W.shape),
        group_bits,
        quantized.stored_bits() / W.numel(),
        step,
        layer_metrics(W, W_hat, layer_stats),
        time.perf_counter() - start,
    )
    _write_layer(path, quantized, record)
    return quantized, record


def _write_layer(path: Path, quantized, record: LayerRecord) -> None:
    tensors = {k: v.contiguous() for k, v in quantized.tensors().items()}
    if quantized.bias is not None:
        tensors["bias"] = quantized.bias.detach().contiguous().cpu()
    meta = {"record": json.dumps(record.__dict__)}
    if quantized.spec is not None:
        meta["spec"] = json.dumps(quantized.spec.to_dict())
    else:
        meta["stored_bits"] = str(quantized.bits)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read_layer(path: Path):
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if "spec" in meta:
        spec = LayerSpec.from_dict(json.loads(meta["spec"]))
        groups = len(spec.group_bits)
        quantized = QuantizedLayer(
            spec,
            tensors["perm"],
            [tensors[f"codes_{g}"] for g in range(groups)],
            [tensors[f"codebooks_{g}"] for g in range(groups)],
            tensors.get("bias"),
            tensors.get("scales"),
        )
    else:
        quantized = FakeQuantLayer(tensors["weight"], tensors.get("bias"), int(meta["stored_bits"]))
    data = json.loads(meta["record"])
    data["shape"], data["group_bits"] = tuple(data["shape"]), tuple(data["group_bits"])
    return quantized, LayerRecord(**data)


def summarize(records: list[LayerRecord]) -> dict:
    weights = sum(r.shape[0] * r.shape[1] for r in records)
    bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in records)
    return {
        "layers": len(records),
        "weights": weights,
        "bits_per_weight": bits / weights,
        "seconds": sum(r.seconds for r in records),
        "first_order": sum(r.metrics.get("first_order", 0.0) for r in records),
    }


def write_report(out: Path, records: list[LayerRecord]) -> None:
    """`report.json`, a readable `report.md` table, and `bits.png` (when matplotlib is there)."""
    atomic_write_json(
        out / "report.json",
        {"summary": summarize(records), "layers": [r.__dict__ for r in records]},
    )
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(report_table(records)))
    try:
        plot_bits(out / "bits.png", records)
    except ImportError:
        logger.info("matplotlib not installed: no bits.png (pip install 'rsavq[plot]')")


def report_table(records: list[LayerRecord]) -> str:
    s = summarize(records)
    lines = [
        f"# RSAVQ report: {s['layers']} layers, {s['bits_per_weight']:.4f} bits/weight "
        f"(stored, codebooks and permutations included), {s['seconds']:.0f} s",
        "",
        "| layer | shape | group bits | bits/weight | rel. error | Fisher error | "
        "g.(W_hat-W) | step/||W|| | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r.metrics
        lines.append(
            f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {list(r.group_bits)} | "
            f"{r.bits_per_weight:.4f} | {m['relative_error']:.4f} | "
            f"{m.get('fisher_error', float('nan')):.3e} | "
            f"{m.get('first_order', float('nan')):.3e} | {r.step_norm:.4f} | "
            f"{r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_bits(path: Path, records: list[LayerRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = max(len(r.group_bits) for r in records)
    fig, ax = plt.subplots(figsize=(max(6, len(records) * 0.06), 3.5))
    for g in range(groups):
        shift = (g - (groups - 1) / 2) * 0.06  # so that groups at equal bits stay visible
        ys = [r.group_bits[g] + shift if g < len(r.group_bits) else None for r in records]
        ax.plot(
            range(len(records)), ys, marker=".", linestyle="", label=f"group {g + 1}", alpha=0.7
        )
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("bits per weight")
    ax.set_title("RSAVQ bits per group across layers (group 1 = most sensitive)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
