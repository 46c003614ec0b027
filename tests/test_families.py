"""The generic model walk on several HF families, offline: Fisher statistics, the default path
(block-sequential quantization, block fine-tuning, distillation), loading and generation."""

import json

import pytest
import torch

from families import FAMILIES, build_family
from rsavq.config import preset
from rsavq.distill import Distillation
from rsavq.finetune import BlockTuning
from rsavq.modules import find_linears
from rsavq.pipeline import quantize_model
from rsavq.serialization import load_quantized
from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_load_and_generate(family, tmp_path):
    model = build_family(family)
    layers = find_linears(model)
    windows = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    accumulators = make_accumulators(layers, False, "cpu")
    collect_fisher(model, windows, layers, accumulators, CollectOptions(progress=False))
    assert all(a.count == 6 for a in accumulators.values())
    config = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2)
    tuning = BlockTuning(epochs=1, lr=1e-3, micro_batch=4)  # micro-batches of 4 and of 2
    distillation = Distillation(lr=1e-4, windows=None, micro_batch=2, save_every=2)
    quantize_model(
        model, config, None, tmp_path / "q", progress=False, calibration=windows, tuning=tuning,
        heldout=windows[:2], distillation=distillation,
    )  # fmt: skip
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert len(report["finetune"]) == 2 and report["distill"]["steps"] == 3
    loaded = load_quantized(tmp_path / "q")
    ids = windows[:1, :6]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)
