"""Quantize a whole model layer by layer, resumably, and write the checkpoint and report.

Work in progress lives in `OUT/.partial/`, a `rsavq.store.Store`: the run's identity and one item
per finished layer. A killed run resumes from there; the finished checkpoint replaces it. The
method comes from the registry (`rsavq.methods`): the pipeline only gathers the statistics it
declares and handles its results through their common protocol.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rsavq.algorithms.metrics import layer_metrics
from rsavq.clock import current, timed
from rsavq.config import RSAVQConfig, ScalarConfig
from rsavq.distill import Distillation, distill, teacher_targets
from rsavq.errors import UsageError
from rsavq.finetune import BlockTuning, tune_block, tuned_state
from rsavq.io import atomic_write, atomic_write_json
from rsavq.methods import HESSIAN, Method, method_for
from rsavq.modules import require_linears, weight_matrix, weight_shape
from rsavq.serialization import quantization_config, round_unquantized, save_quantized
from rsavq.stats import distributed
from rsavq.stats.artifact import FisherStats, config_hash
from rsavq.stats.hessian import input_hessians
from rsavq.stats.sequential import BATCH, sequential_hessians
from rsavq.store import Store
from rsavq.streaming import materialize, release

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
    config: RSAVQConfig | ScalarConfig,
    stats: FisherStats | None,
    out: str | Path,
    tokenizer=None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    calibration_id: dict | None = None,
    save_dtype: torch.dtype | None = None,
    tuning: BlockTuning | None = None,
    heldout: torch.Tensor | None = None,
    distillation: Distillation | None = None,
    distill_windows: torch.Tensor | None = None,
) -> list[LayerRecord]:
    """Quantize the model's linears and write the checkpoint to `out`.

    RSAVQ configs give `VQLinear`s and an rsavq checkpoint; the scalar baselines give a plain
    checkpoint of their dequantized weights (their bits are those of the GPTQ packed format).
    Methods that need input Hessians (`config.needs_hessian`) get them from the `calibration`
    token windows `[N, T]`: block by block from the already-quantized prefix when
    `config.sequential`, else in one pass over the FP model. `calibration_id` describes those
    windows and joins the run's identity. `save_dtype` stores the unquantized tensors
    (embeddings, norms, biases) in that dtype, and rounds them so in memory too. `tuning`
    fine-tunes each decoder block once quantized (`rsavq.finetune`; block-sequential VQ only);
    its error on the `heldout` windows (never trained on) goes into the report. `distillation`
    then trains the whole quantized model towards the FP model's next-token distributions on
    the calibration windows, or `distill_windows` when given (`rsavq.distill`; rsavq's VQ
    methods).

    Under torch.distributed (`torchrun`) every rank runs this with the same arguments and `out`
    (shared): each block's layers are spread over the ranks, rank 0 fine-tunes, distills and
    writes the checkpoint (docs/architecture.md section 5).
    """
    out = Path(out)
    layers = require_linears(model, config.skip)
    method = method_for(config)
    needs = method.needs(config)
    if stats is not None:
        stats.check_model(model, layers)
    if HESSIAN in needs and calibration is None:
        raise UsageError("this method needs calibration windows for its input Hessians")
    run = {
        "config": config.to_dict(),
        "model_config_hash": config_hash(model.config),
        "stats": stats.manifest["calibration"] if stats else None,
        "hessians": calibration_id if HESSIAN in needs else None,
    }
    if tuning is not None:
        check_tuning(config)
        run["tuning"] = tuning.to_dict()
    if distillation is not None:
        check_distillation(config)
        if calibration is None:
            raise UsageError("end-to-end distillation needs the calibration windows")
        run["distillation"] = distillation.to_dict()
    distill_windows = distill_windows if distill_windows is not None else calibration
    rank, size = distributed.world()
    shapes = {name: list(weight_shape(layer)) for name, layer in layers.items()}
    distributed.check_same({"module list": shapes, "settings": run, "calibration windows":
                            calibration if calibration is not None else "none"})  # fmt: skip
    store = _open_store(out, run)
    if distillation is not None and rank == 0:  # from the FP model, before quantizing
        with timed("teacher"):
            teacher = _teacher(store, model, distill_windows, heldout, distillation)
    records, specs, tuned = [], {}, []
    bar = tqdm(total=len(layers), desc="quantize", unit="layer", disable=not progress or rank)
    tune = _tuner(store, tuning, tuned, bar) if tuning is not None else None
    batch = tuning.micro_batch if tuning is not None else BATCH
    hessians = HESSIAN in needs, calibration, tune, heldout, batch
    work = Work(model, layers, method, config, stats, store)
    for batch in _hessian_schedule(model, layers, config, store, *hessians):
        for result, record in _quantize_batch(batch, work):
            records.append(record)
            if result.spec() is not None:
                specs[record.name] = result.spec()
            bar.update()
    bar.close()
    materialize(model)  # what is still streamed (norms of blocks quantized without a pass)
    if size > 1:
        torch.distributed.barrier()  # every rank has read the store: rank 0 may remove it
    if rank:
        return records  # rank 0 distills and writes the checkpoint
    distilled = None
    if distillation is not None:
        with timed("distill"):
            distilled = _distill(model, store, distill_windows, heldout, teacher, distillation,
                                 progress)  # fmt: skip
    qconfig = quantization_config(config.to_dict(), specs) if specs else None
    if qconfig is not None:
        finetune = {"block": tuning, "e2e": distillation}
        finetune = {k: v.to_dict() for k, v in finetune.items() if v is not None}
        qconfig |= {"finetune": finetune} if finetune else {}
    with timed("save"):
        _save(model, out, qconfig, tokenizer, save_dtype)
    windows = None
    if calibration is not None:
        windows = {"windows": calibration.shape[0], "seqlen": calibration.shape[1]}
        if stats is not None:
            windows["fisher_windows"] = stats.manifest["calibration"]["nsamples"]
    write_report(out, records, tuned, distilled, windows)
    store.remove()
    return records


@dataclass(frozen=True)
class Work:
    """What quantizing one layer needs besides its name and Hessian."""

    model: nn.Module
    layers: dict[str, nn.Module]
    method: Method
    config: object
    stats: FisherStats | None
    store: Store


def _quantize_batch(batch: dict, work: Work):
    """Quantize and install the layers of `batch` (`{name: H}`), yielding `(result, record)`.
    Under torch.distributed the layers are spread over the ranks by size (each rank puts its
    results in the shared store), then every rank installs them all from the store."""
    rank, size = distributed.world()
    computed = {}
    if size > 1:
        sizes = {name: math.prod(weight_shape(work.layers[name])) for name in batch}
        owners = distributed.assign_owners(sizes, size)
        for name in (n for n in batch if owners[n] == rank):
            computed[name] = _layer(name, batch[name], work)
        torch.distributed.barrier()
    for name, hessian in batch.items():
        result, record = computed.get(name) or _layer(name, hessian, work)
        layer = materialize(work.layers[name])  # (a streamed layer read back from the store)
        result.install(work.model, name, layer)
        if work.model.get_submodule(name) is not layer:
            release(layer)  # a streamed FP layer's weights go once it is replaced
        yield result, record


def _save(model, out: Path, qconfig, tokenizer, save_dtype) -> None:
    if save_dtype is not None:
        round_unquantized(model, save_dtype)
    save_quantized(model, out, qconfig, tokenizer, save_dtype)


def _hessian_schedule(
    model, layers, config, store: Store, needed, calibration, tune, heldout, batch
):
    """Batches `{name: H or None}` in model order (see `stats.sequential`); `tune` (block
    fine-tuning) joins the block-sequential pass, whose blocks run on `batch` sequences at a
    time."""
    if not needed:
        yield dict.fromkeys(layers)
        return
    if config.sequential:
        yield from sequential_hessians(
            model, layers, calibration, store.has, tune, heldout, config.true_sequential, batch,
        )  # fmt: skip
        return
    todo = {n: m for n, m in layers.items() if not store.has(n)}
    hessians = input_hessians(model, todo, calibration) if todo else {}
    yield {n: hessians.get(n) for n in layers}


def supports_tuning(config) -> bool:
    """Whether `config` runs a block-sequential VQ pass that block fine-tuning can join."""
    method = method_for(config)
    return method.name == "rsavq" and HESSIAN in method.needs(config) and config.sequential


def check_tuning(config) -> None:
    """Refuse block fine-tuning where there is no block-sequential VQ pass to run it in."""
    if not supports_tuning(config):
        raise UsageError(
            "block fine-tuning runs inside the block-sequential pass of rsavq's VQ methods; "
            "use --method rsavq without --one-pass, or --finetune none"
        )


def check_distillation(config) -> None:
    """Refuse distillation where there are no VQ layers to train."""
    if method_for(config).name != "rsavq":
        raise UsageError(
            "end-to-end distillation trains the codebooks of rsavq's VQ layers; use --method "
            "rsavq, or --finetune none"
        )


def _teacher(store: Store, model, calibration, heldout, options: Distillation) -> dict:
    """The FP model's compact next-token distributions on the calibration (and held-out)
    windows: computed once, kept as a store item."""
    if not store.has("teacher"):
        logger.info("teacher distributions for distillation (top %d tokens)", options.top_k)
        tensors = teacher_targets(model, calibration, options.top_k, bf16=options.bf16)
        if heldout is not None:
            held = teacher_targets(model, heldout, options.top_k, bf16=options.bf16)
            tensors |= {f"heldout.{k}": v for k, v in held.items()}
        store.put("teacher", tensors, {})
    return store.get("teacher")[0]


def _distill(model, store: Store, calibration, heldout, teacher: dict, options, progress):
    """Distill the quantized model, resuming from the store's snapshot when there is one."""
    train = {k: v for k, v in teacher.items() if not k.startswith("heldout.")}
    held = {k.removeprefix("heldout."): v for k, v in teacher.items() if k.startswith("heldout.")}
    resume = store.get("distill") if store.has("distill") else None
    if resume is not None:
        logger.info("resuming distillation at step %d", len(resume[0]["losses"]))
    return distill(
        model, calibration, train, options, resume,
        save=lambda snapshot: store.put("distill", *snapshot),
        heldout=(heldout, held) if heldout is not None and held else None,
        progress=progress,
    )  # fmt: skip


def _tuner(store: Store, tuning: BlockTuning, tuned: list, bar):
    """`tune(index, block, data)`: fine-tunes a quantized block once and returns its outputs
    (the next block's inputs; None when it did not train); its tuned tensors are a store item,
    so a resumed run loads them instead of training again. Under torch.distributed rank 0 tunes
    and the other ranks load its result."""
    rank, size = distributed.world()

    def tune(index, block, data) -> list | None:
        key = f"tuned-block-{index}"
        train = rank == 0 and not store.has(key)
        outputs: list = []
        if train:
            bar.set_postfix_str(f"fine-tuning block {index}")
            (inputs, targets), *held = data
            with timed("finetune", index):
                losses = tune_block(block, inputs, targets, tuning, index, *held, outputs=outputs)
            store.put(key, tuned_state(block), {k: repr(v) for k, v in losses.items()})
            bar.set_postfix_str(f"block {index} rel. MSE {_losses_text(losses)}")
        if size > 1:
            torch.distributed.barrier()
        if not train:
            tensors, meta = store.get(key)
            block.load_state_dict(tensors, strict=False)
            losses = {k: float(v) for k, v in meta.items()}
        tuned.append({"block": index, **losses})
        return outputs or None

    return tune


def _losses_text(losses: dict[str, float]) -> str:
    text = f"{losses['before']:.3g} -> {losses['after']:.3g}"
    if "heldout_after" in losses:
        text += f" (held out {losses['heldout_before']:.3g} -> {losses['heldout_after']:.3g})"
    return text


def check_output_dir(out: Path) -> None:
    """Refuse an output directory holding a checkpoint or other files (nothing is overwritten)."""
    if (out / "config.json").exists():
        raise UsageError(
            f"{out} already holds a checkpoint; choose another --out or delete it "
            "(nothing was overwritten)"
        )
    if out.is_file() or out.exists() and any(p.name != PARTIAL for p in out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no rsavq work; choose another --out")


def _open_store(out: Path, run: dict) -> Store:
    """The run's store in `out/.partial` (after checking `out` holds nothing of another run)."""
    check_output_dir(out)
    store = Store.open(
        out / PARTIAL,
        run,
        refuse=f"{out} holds an interrupted run with other settings; rerun it with the same "
        "settings to resume, or choose another --out",
        fix=f"delete {out / PARTIAL} to start over",
    )
    if store.keys():
        logger.info("resuming in %s: %d layers already quantized", out, len(store.keys()))
    return store


def _layer(name: str, hessian, work: Work):
    """One layer's result and report row: read back when the store has it, else computed and
    stored."""
    layer, method, config, store = work.layers[name], work.method, work.config, work.store
    if store.has(name):
        tensors, meta = store.get(name)
        data = json.loads(meta["record"])
        data["shape"], data["group_bits"] = tuple(data["shape"]), tuple(data["group_bits"])
        return method.load(tensors, meta), LayerRecord(**data)
    start = time.perf_counter()
    fisher = work.stats.layer(name) if work.stats is not None else None
    with timed("quantize"):
        result, step = method.quantize(config.for_layer(name), materialize(layer), fisher, hessian)
        W = weight_matrix(layer).detach().float().cpu()
        record = LayerRecord(
            name,
            tuple(W.shape),
            tuple(result.group_bits),
            result.stored_bits() / W.numel(),
            step,
            layer_metrics(W, result.dequantize(), fisher),
            time.perf_counter() - start,
        )
    tensors, meta = result.state()
    store.put(name, tensors, {**meta, "record": json.dumps(record.__dict__)})
    return result, record


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


def write_report(
    out: Path,
    records: list[LayerRecord],
    tuned: list[dict] = (),
    distilled: dict | None = None,
    calibration: dict | None = None,
) -> None:
    """`report.json` (with the calibration windows' count and length and the Fisher
    statistics' window count, each fine-tuned block's
    relative MSE before and after, and the distillation's losses), a readable `report.md`
    table, and `bits.png` (when matplotlib is there)."""
    report = {"summary": summarize(records), "layers": [r.__dict__ for r in records]}
    if calibration is not None:
        report["calibration"] = calibration
    if current() is not None:
        report["clock"] = current().to_dict()
    if tuned:
        report["finetune"] = list(tuned)
    if distilled:
        report["distill"] = distilled
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(report_table(records)))
    try:
        plot_bits(out / "bits.png", records)
    except ImportError:
        logger.info("matplotlib not installed: no bits.png (pip install 'rsavq[plot]')")


def update_report(out: str | Path, **entries) -> None:
    """Add (or replace) top-level `entries` of `out/report.json`, e.g. the stage clock once the
    evaluation after quantizing has run too."""
    path = Path(out) / "report.json"
    atomic_write_json(path, {**json.loads(path.read_text()), **entries})


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
