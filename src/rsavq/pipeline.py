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

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from rsavq.algorithms.metrics import layer_metrics
from rsavq.algorithms.rsavq import QuantizedLayer, quantize_layer
from rsavq.config import LayerSpec, RSAVQConfig
from rsavq.errors import UsageError
from rsavq.io import atomic_write, atomic_write_json
from rsavq.kernels import dequantize
from rsavq.modules import find_linears
from rsavq.nn import VQLinear
from rsavq.serialization import quantization_config, save_quantized, set_module
from rsavq.stats.artifact import FisherStats, config_hash

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


def quantize_model(
    model: nn.Module,
    config: RSAVQConfig,
    stats: FisherStats | None,
    out: str | Path,
    tokenizer=None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Replace the model's linears by `VQLinear`s and write the checkpoint to `out`."""
    out = Path(out)
    layers = find_linears(model, config.skip)
    if stats is not None:
        stats.check_model(model, layers)
    run = {
        "config": config.to_dict(),
        "model_config_hash": config_hash(model.config),
        "stats": stats.manifest["calibration"] if stats else None,
    }
    work = _prepare(out, run)
    records, specs = [], {}
    for name, layer in tqdm(layers.items(), desc="quantize", unit="layer", disable=not progress):
        quantized, record = _layer(name, layer, stats, config, work)
        set_module(model, name, VQLinear.from_quantized(quantized).to(layer.weight.device))
        records.append(record)
        specs[name] = quantized.spec
    save_quantized(model, out, quantization_config(config.to_dict(), specs), tokenizer)
    write_report(out, records)
    shutil.rmtree(work, ignore_errors=True)
    return records


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


def _layer(name, layer, stats, config, work) -> tuple[QuantizedLayer, LayerRecord]:
    path = work / "layers" / f"{name}.safetensors"
    if path.exists():
        return _read_layer(path)
    start = time.perf_counter()
    layer_stats = stats.layer(name) if stats is not None else None
    quantized, step = quantize_layer(layer.weight, layer_stats, config, layer.bias)
    W_hat = dequantize(quantized.codes, quantized.codebooks, quantized.perm, quantized.spec)
    W = layer.weight.detach().float().cpu()
    record = LayerRecord(
        name,
        tuple(W.shape),
        quantized.spec.group_bits,
        quantized.stored_bits() / W.numel(),
        step,
        layer_metrics(W, W_hat, layer_stats),
        time.perf_counter() - start,
    )
    _write_layer(path, quantized, record)
    return quantized, record


def _write_layer(path: Path, quantized: QuantizedLayer, record: LayerRecord) -> None:
    tensors = {k: v.contiguous() for k, v in quantized.tensors().items()}
    if quantized.bias is not None:
        tensors["bias"] = quantized.bias.detach().contiguous().cpu()
    meta = {"spec": json.dumps(quantized.spec.to_dict()), "record": json.dumps(record.__dict__)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read_layer(path: Path) -> tuple[QuantizedLayer, LayerRecord]:
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    spec = LayerSpec.from_dict(json.loads(meta["spec"]))
    groups = len(spec.group_bits)
    quantized = QuantizedLayer(
        spec,
        tensors["perm"],
        [tensors[f"codes_{g}"] for g in range(groups)],
        [tensors[f"codebooks_{g}"] for g in range(groups)],
        tensors.get("bias"),
    )
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
