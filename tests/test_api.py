"""The Python API: `rsavq.quantize` in place, then load."""

import pytest
import torch

import rsavq
from helpers import build_tiny_llama


def test_quantize_in_place_then_load(tmp_path, tiny_tokenizer, text_file):
    model = build_tiny_llama(len(tiny_tokenizer))
    config = rsavq.preset("default", bits=2, kmeans_iters=2)
    calibration = rsavq.Calibration(str(text_file), nsamples=4, seqlen=16)
    records = rsavq.quantize(
        model,
        config,
        tokenizer=tiny_tokenizer,
        calibration=calibration,
        out=tmp_path / "q",
        stats=tmp_path / "stats",
    )
    assert len(records) == 14 and (tmp_path / "stats" / "manifest.json").exists()
    loaded = rsavq.load_quantized(tmp_path / "q")
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_without_out_nothing_is_left_behind(tiny_tokenizer, text_file):
    model = build_tiny_llama(len(tiny_tokenizer))
    config = rsavq.preset("kmeans", bits=2, kmeans_iters=2)  # needs no calibration at all
    rsavq.quantize(model, config)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "VQLinear"


def test_calibrating_configurations_need_a_tokenizer():
    with pytest.raises(rsavq.UsageError, match="pass tokenizer="):
        rsavq.quantize(build_tiny_llama(64), rsavq.preset("default", bits=2))
