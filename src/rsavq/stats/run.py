"""Collect a model's Fisher statistics into a stats directory, resumably."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rsavq.data import Corpus, calibration_windows
from rsavq.errors import UsageError
from rsavq.io import atomic_write_json
from rsavq.modules import DEFAULT_SKIP, require_linears, weight_shape
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
    save_stats,
)
from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration windows come from; recorded in the manifest."""

    source: str = "c4"
    nsamples: int = 128
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
    refused, never overwritten. Under torch.distributed (`torchrun`) the ranks share the
    windows and `out` (a shared directory when they run on several machines): see
    `rsavq.stats.distributed`.
    """
    out = Path(out)
    device = next(model.parameters()).device
    accumulators = make_accumulators(layers, options.diag_output, device)
    run = {
        "calibration": asdict(calibration),
        "dtype": str(next(model.parameters()).dtype),
        "diag_output": options.diag_output,
    }
    manifest = build_manifest(model, model_id, run, accumulators)
    rank, size = distributed.world()
    shapes = {name: list(weight_shape(layer)) for name, layer in layers.items()}
    distributed.check_same({"module list": shapes, "settings": run_key(manifest),
                            "calibration windows": windows})  # fmt: skip
    if (out / MANIFEST).exists():
        return _reuse(out, manifest)
    name = CHECKPOINT if size == 1 else f"{CHECKPOINT}-rank{rank}-of-{size}"
    mine = distributed.shard(windows)
    done = load_checkpoint(out, manifest, accumulators, name)
    if done:
        logger.info("resuming from checkpoint in %s: %d of %d sequences done", out, done, len(mine))

    def checkpoint(seen: int) -> None:
        manifest = build_manifest(model, model_id, run, accumulators)
        save_checkpoint(out, manifest, accumulators, name)
        logger.info("checkpoint: %d sequences", seen)

    if rank:
        options = replace(options, progress=False)
    collect_fisher(model, mine, layers, accumulators, options, checkpoint)
    if size == 1:
        return save_stats(out, build_manifest(model, model_id, run, accumulators), accumulators)
    return _save_distributed(out, build_manifest, (model, model_id, run), accumulators, name)


def _save_distributed(out: Path, build, args, accumulators, checkpoint: str) -> FisherStats:
    """Reduce every layer onto its owner, which writes it; rank 0 writes the manifest last."""
    import torch.distributed as dist

    rank, _ = distributed.world()
    owners = distributed.reduce_to_owners(accumulators)
    save_layers(out, {n: a for n, a in accumulators.items() if owners[n] == rank})
    manifest = build(*args, accumulators)  # counts are the totals on every rank now
    dist.barrier()
    if rank == 0:
        atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / checkpoint, ignore_errors=True)
    dist.barrier()
    return FisherStats(out, manifest)


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

    key = json.dumps(asdict(calibration), sort_keys=True).encode()
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
