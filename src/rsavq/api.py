"""The Python API: quantize a loaded model in place, in one call.

    import rsavq
    model, tokenizer = rsavq.load_model("smollm2-135m")
    rsavq.quantize(model, rsavq.preset("default", bits=3), tokenizer=tokenizer, out="q3/")
    model = rsavq.load_quantized("q3/")          # later, or AutoModelForCausalLM.from_pretrained

The command line (`rsavq quantize`) is a thin layer over `quantize`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from rsavq.clock import StageClock, current, timed, using
from rsavq.config import RSAVQConfig, ScalarConfig, default_windows, preset
from rsavq.data import Corpus, calibration_windows, heldout_windows, load_corpus
from rsavq.distill import Distillation, is_default_count
from rsavq.errors import DataError, UsageError
from rsavq.finetune import BlockTuning
from rsavq.methods import FISHER, HESSIAN, method_for
from rsavq.pipeline import (
    LayerRecord,
    check_distillation,
    check_tuning,
    quantize_model,
    supports_tuning,
)
from rsavq.stats import distributed
from rsavq.stats.artifact import MANIFEST, FisherStats, load_stats
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import CalibrationSpec, collect_model_stats, default_stats_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from: a source name (`c4`, `wikitext2`, a file path) or a
    loaded `Corpus`, and how many windows of how many tokens are drawn from it."""

    source: str | Corpus = "c4"
    nsamples: int | None = None  # None: the default's count at the width (`default_windows`)
    seqlen: int = 512
    seed: int = 0
    data_dir: str | Path | None = None  # default: $RSAVQ_DATA_DIR, else the hub
    # windows of the Fisher statistics; None: `nsamples` when given, else the default's
    fisher_nsamples: int | None = None

    def resolved(self, bits: float) -> Calibration:
        """The counts a quantization at `bits` reads: those given, the default's for the rest."""
        if self.nsamples is not None:
            return replace(self, fisher_nsamples=self.fisher_nsamples or self.nsamples)
        budget = default_windows(bits)
        fisher = self.fisher_nsamples or budget.fisher
        return replace(self, nsamples=budget.calibration, fisher_nsamples=fisher)

    def corpus(self) -> Corpus:
        if isinstance(self.source, Corpus):
            return self.source
        return load_corpus(self.source, self.data_dir)

    def spec(self, corpus: Corpus) -> CalibrationSpec:
        """The calibration windows (input Hessians, block fine-tuning)."""
        return CalibrationSpec(corpus.name, self.nsamples, self.seqlen, self.seed)

    def fisher_spec(self, corpus: Corpus) -> CalibrationSpec:
        """The Fisher statistics' windows."""
        n = self.fisher_nsamples or self.nsamples
        return CalibrationSpec(corpus.name, n, self.seqlen, self.seed)


def quantize(
    model: nn.Module,
    config: RSAVQConfig | ScalarConfig | None = None,
    *,
    tokenizer=None,
    calibration: Calibration | None = None,
    out: str | Path | None = None,
    stats: str | Path | FisherStats | None = None,
    model_id: str = "model",
    progress: bool = True,
    save_dtype: torch.dtype | None = None,
    finetune: Finetune = "auto",
) -> list[LayerRecord]:
    """Quantize `model` in place (its linears become `VQLinear`s) and write the checkpoint to
    `out` (a temporary directory, removed afterwards, when `out` is None).

    `config` defaults to `preset("default", bits=3)`. Fisher statistics (for EDSG and WCSG) are
    collected from `calibration` unless `stats` gives them (a directory is reused when complete,
    filled otherwise; by default a cache entry keyed by model and calibration); the input Hessians
    come from the same calibration windows, block by block. `tokenizer` is needed whenever
    calibration text must be tokenized. `save_dtype` (e.g. `torch.bfloat16`) stores the
    unquantized tensors (embeddings, norms) in that dtype and rounds the model's copies to match.
    `finetune` chooses the fine-tuning stages: "block" fine-tunes each decoder block once
    quantized (`BlockTuning()`), "e2e" distills the whole quantized model from the FP one
    (`Distillation()`), "both" does both, "none" (or None) neither; "auto" (default) is "both"
    wherever the configuration runs the block-sequential VQ pass ("block" where the width's
    default does not distill: `default_windows`), else "none". A
    `rsavq.BlockTuning(...)`, a `rsavq.Distillation(...)` or a tuple of both chooses their
    options. A stage that cannot run with `config` is refused before any work.
    Returns the per-layer records of the report."""
    config = config or preset("default", 3)
    calibration = (calibration or Calibration()).resolved(config.bits)
    with using(current() or StageClock()):  # the report's stage clock (the caller's, if any)
        return _quantize(
            model, config, tokenizer, calibration, out, stats, model_id, progress, save_dtype,
            finetune,
        )  # fmt: skip


def _quantize(
    model, config, tokenizer, calibration, out, stats, model_id, progress, save_dtype, finetune
) -> list[LayerRecord]:
    needs = method_for(config).needs(config)
    tuning, distillation = finetune_stages(finetune, config)  # checked before any work
    if out is None and distributed.world()[1] > 1:
        raise UsageError("under torch.distributed the ranks share their work through out=: pass it")
    needs_windows = HESSIAN in needs or distillation is not None
    needs_text = needs_windows or (FISHER in needs and not _complete(stats))
    if needs_text and tokenizer is None:
        raise UsageError("this configuration calibrates on text: pass tokenizer=")
    corpus = calibration.corpus() if needs_text else None
    fisher = None
    if FISHER in needs:
        with timed("fisher"):
            fisher = _fisher(model, tokenizer, corpus, calibration, stats, model_id,
                             config.skip, progress)  # fmt: skip
    c, windows = calibration, None
    if needs_windows:
        windows = calibration_windows(tokenizer, corpus, c.nsamples, c.seqlen, c.seed)
    identity = asdict(calibration.spec(corpus)) if corpus else None
    distill_windows, heldout = finetune_windows(tokenizer, corpus, c, tuning, distillation)
    run = lambda path: quantize_model(  # noqa: E731
        model, config, fisher, path, tokenizer, progress, windows, identity, save_dtype, tuning,
        heldout, distillation, distill_windows,
    )  # fmt: skip
    if out is not None:
        return run(out)
    with tempfile.TemporaryDirectory() as tmp:
        return run(Path(tmp) / "q")


Finetune = str | BlockTuning | Distillation | tuple | None
STAGES = ("auto", "none", "block", "e2e", "both")


def finetune_stages(finetune: Finetune, config) -> tuple[BlockTuning | None, Distillation | None]:
    """The fine-tuning stages `finetune` asks for (see `quantize`), checked against `config`."""
    if isinstance(finetune, str):
        if finetune not in STAGES:
            raise UsageError(f"finetune={finetune!r}: use one of {', '.join(STAGES)}")
        budget = default_windows(config.bits)
        if finetune == "auto":
            auto = "both" if budget.distillation else "block"
            finetune = auto if supports_tuning(config) else "none"
        block = BlockTuning(epochs=budget.block_epochs) if finetune in ("block", "both") else None
        e2e = Distillation(windows=budget.distillation or None)
        finetune = (block, e2e if finetune in ("e2e", "both") else None)
    stages = finetune if isinstance(finetune, tuple) else (finetune,)
    tuning = next((s for s in stages if isinstance(s, BlockTuning)), None)
    distillation = next((s for s in stages if isinstance(s, Distillation)), None)
    if any(s is not None and s not in (tuning, distillation) for s in stages):
        raise UsageError(f"finetune={finetune!r}: use a string, BlockTuning or Distillation")
    if tuning is not None:
        check_tuning(config)
    if distillation is not None:
        check_distillation(config)
    return tuning, distillation


def finetune_windows(
    tokenizer,
    corpus: Corpus | None,
    c: Calibration,
    tuning: BlockTuning | None,
    distillation: Distillation | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The fine-tuning stages' own text: the distillation's windows when it asks for a number
    of its own (else None: it trains on the calibration's), and the held-out windows from
    documents that neither the calibration nor those windows reach (None, with a warning,
    when none are left or none are asked for)."""
    distill_windows = _distill_windows(tokenizer, corpus, c, distillation)
    read = c.nsamples if distill_windows is None else max(c.nsamples, len(distill_windows))
    count = max((s.heldout for s in (tuning, distillation) if s is not None), default=0)
    if not count:
        return distill_windows, None
    try:
        return distill_windows, heldout_windows(tokenizer, corpus, read, c.seqlen, c.seed, count)
    except DataError as exc:
        logger.warning("no held-out fine-tuning loss: %s", exc)
        return distill_windows, None


def _distill_windows(tokenizer, corpus, c: Calibration, distillation: Distillation | None):
    """The distillation's own windows, or None for the calibration's: asked for by
    `windows=None`, and what the default count gives way to when the calibration has at least
    as many windows or the corpus has too few (then with a warning)."""
    count = distillation.windows if distillation is not None else None
    if not count or (is_default_count(count) and c.nsamples >= count):
        return None
    try:
        return calibration_windows(tokenizer, corpus, count, c.seqlen, c.seed)
    except DataError as exc:
        if not is_default_count(count):
            raise
        logger.warning("distilling on the calibration's %d windows: %s", c.nsamples, exc)
        return None


def _complete(stats) -> bool:
    if isinstance(stats, FisherStats):
        return True
    return stats is not None and (Path(stats) / MANIFEST).exists()


def fisher_statistics(
    model: nn.Module,
    tokenizer=None,
    calibration: Calibration | None = None,
    stats: str | Path | FisherStats | None = None,
    *,
    bits: float = 3,
    model_id: str = "model",
    skip: tuple[str, ...] | None = None,
    progress: bool = True,
) -> FisherStats:
    """The Fisher statistics `quantize` would use at `bits`: `stats` when given, a complete
    directory reused, else collected from `calibration` (resolved for `bits`) into `stats` or the
    cache entry keyed by model and calibration. `skip`: layers left out (default: the default
    preset's)."""
    calibration = (calibration or Calibration()).resolved(bits)
    given = isinstance(stats, FisherStats) or _complete(stats)
    corpus = None if given else calibration.corpus()
    skip = preset("default", bits).skip if skip is None else skip
    return _fisher(model, tokenizer, corpus, calibration, stats, model_id, skip, progress)


def _fisher(model, tokenizer, corpus, calibration, stats, model_id, skip, progress):
    """The Fisher statistics: given, reused when complete, else collected."""
    if isinstance(stats, FisherStats):
        return stats
    if stats is None:
        root = default_stats_dir(model, calibration.fisher_spec(corpus))
    else:
        root = Path(stats)  # (reused without text when complete)
    if (root / MANIFEST).exists():
        logger.info("reusing Fisher statistics in %s", root)
        return load_stats(root)
    if tokenizer is None:
        raise UsageError("collecting Fisher statistics tokenizes calibration text: pass tokenizer=")
    logger.info("collecting Fisher statistics into %s", root)
    options = CollectOptions(checkpoint_every=16, progress=progress)
    spec = calibration.fisher_spec(corpus)
    return collect_model_stats(model, tokenizer, model_id, corpus, spec, root, options, skip)
