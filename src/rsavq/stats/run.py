"""Collect a model's Fisher statistics into a stats directory, resumably."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rsavq.config import CALIBRATION_WINDOWS
from rsavq.data import Corpus, calibration_windows
from rsavq.errors import UsageError
from rsavq.io import atomic_write_json
from rsavq.modules import DEFAULT_SKIP, require_linears, weight_shape
from rsavq.runtime import uses_bf16
from rsavq.stats import distributed
from rsavq.stats.artifact import (
    CHECKPOINT,
    MANIFEST,
    FisherStats,
    build_manifest,
    config_hash,
    load_checkpoint,
    load_stats,
    run_key,
    save_checkpoint,
    save_layers,
)
from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators
from rsavq.stats.memory import plan_passes, plan_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from; recorded in the manifest."""

    source: str = "c4"
    nsamples: int = CALIBRATION_WINDOWS
    seqlen: int = 512
    seed: int = 0


def fisher_stats(
    model: nn.Module,
    model_id: str,
    windows: torch.Tensor,
    layers: dict[str, nn.Linear],
    out: str | Path,
    calibration: CalibrationSpec,
    options: CollectOptions = CollectOptions(),
) -> FisherStats:
    """Collect statistics of `layers` over `windows` into `out` (resuming a checkpoint there).

    A complete directory made by the same run is returned as is; one made by another run is
    refused, never overwritten. With `options.memory_budget` the layers are collected in as
    many passes over the windows as keep each pass's accumulators within it (`plan_passes`).
    Under torch.distributed (`torchrun`) the ranks share the windows and `out` (a shared
    directory when they run on several machines): see `rsavq.stats.distributed`.
    """
    out = Path(out)
    run = {
        "calibration": asdict(calibration),
        "dtype": str(next(model.parameters()).dtype),
        "diag_output": options.diag_output,
    }
    if uses_bf16(next(model.parameters()).device, options.bf16):
        run["compute"] = "bfloat16"  # (float32 runs keep the identity they had before it)
    shapes = {name: weight_shape(layer) for name, layer in layers.items()}
    entries = {name: _entry(shape, len(windows), options.diag_output) for name, shape in
               shapes.items()}  # fmt: skip
    manifest = build_manifest(model, model_id, run, entries)
    rank, size = distributed.world()
    distributed.check_same({"module list": shapes, "settings": run_key(manifest),
                            "calibration windows": windows})  # fmt: skip
    if (out / MANIFEST).exists():
        return _reuse(out, manifest)
    passes = plan_passes(shapes, options.diag_output, options.memory_budget)
    logger.info("Fisher plan: %s", plan_text(passes, shapes, options.diag_output, size))
    name = CHECKPOINT if size == 1 else f"{CHECKPOINT}-rank{rank}-of-{size}"
    if (out / "layers").exists() and not (out / name).exists():
        raise UsageError(
            f"{out} holds statistics of an unfinished run that left no checkpoint; delete it "
            "or choose another --out"
        )
    if rank:
        options = replace(options, progress=False)
    for i, names in enumerate(passes):
        if all((out / "layers" / f"{n}.safetensors").exists() for n in names):
            continue  # a finished pass of this run (resumed)
        if len(passes) > 1:
            logger.info("pass %d of %d: %d layers", i + 1, len(passes), len(names))
        todo = {n: layers[n] for n in names}
        _collect_pass(model, distributed.shard(windows), todo, out, manifest, options, name)
    if size > 1:
        torch.distributed.barrier()
    if rank == 0:
        atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / name, ignore_errors=True)
    if size > 1:
        torch.distributed.barrier()
    return FisherStats(out, manifest)


def _entry(shape: tuple[int, int], count: int, diag_output: bool) -> dict:
    return {"shape": list(shape), "count": count, "diag_output": diag_output}


def _collect_pass(model, windows, layers, out: Path, manifest, options, checkpoint: str) -> None:
    """Collect `layers` over this rank's `windows`, resumably, and write them (each layer by
    its owner rank when distributed)."""
    device = next(model.parameters()).device
    accumulators = make_accumulators(layers, options.diag_output, device)
    done = load_checkpoint(out, manifest, accumulators, checkpoint)
    if done:
        logger.info("resuming from checkpoint in %s: %d of %d sequences done", out, done,
                    len(windows))  # fmt: skip

    def save(seen: int) -> None:
        save_checkpoint(out, manifest, accumulators, checkpoint)
        logger.info("checkpoint: %d sequences", seen)

    collect_fisher(model, windows, layers, accumulators, options, save)
    rank, size = distributed.world()
    if size > 1:
        owners = distributed.reduce_to_owners(accumulators)
        accumulators = {n: a for n, a in accumulators.items() if owners[n] == rank}
    save_layers(out, accumulators)
    if size > 1:
        torch.distributed.barrier()  # every layer of the pass is written


def collect_model_stats(
    model: nn.Module,
    tokenizer,
    model_id: str,
    corpus: Corpus,
    calibration: CalibrationSpec,
    out: str | Path,
    options: CollectOptions = CollectOptions(),
    skip: tuple[str, ...] = DEFAULT_SKIP,
) -> FisherStats:
    """Draw the calibration windows from `corpus`, then `fisher_stats` for the model's linears."""
    c = calibration
    windows = calibration_windows(tokenizer, corpus, c.nsamples, c.seqlen, c.seed)
    layers = require_linears(model, skip)
    return fisher_stats(model, model_id, windows, layers, out, calibration, options)


def default_stats_dir(model: nn.Module, calibration: CalibrationSpec) -> Path:
    """The statistics cache entry of a model and calibration: `<cache>/fisher/<model>-<calib>`."""
    import hashlib
    import json

    from rsavq.models import cache_dir

    bf16 = uses_bf16(next(model.parameters()).device, CollectOptions.bf16)
    key = asdict(calibration) | ({"compute": "bfloat16"} if bf16 else {})
    key = json.dumps(key, sort_keys=True).encode()
    return (
        cache_dir()
        / "fisher"
        / f"{config_hash(model.config)}-{hashlib.sha256(key).hexdigest()[:12]}"
    )


def _reuse(out: Path, manifest: dict) -> FisherStats:
    existing = load_stats(out)
    if run_key(existing.manifest) != run_key(manifest):
        raise UsageError(
            f"{out} already holds Fisher statistics of a different run (model, "
            "data or settings differ); choose another --out or delete it"
        )
    logger.info("statistics in %s are complete; reusing them", out)
    return existing
