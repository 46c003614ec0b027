"""The Python API: `rsavq.quantize` in place, then load."""

import logging

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


def readme_library_example() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Python API") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_readme_python_example_runs(tmp_path, monkeypatch, tiny_tokenizer, text_file):
    """The README's code as written, on a tiny model and a small local calibration text."""
    model = build_tiny_llama(len(tiny_tokenizer))
    real = rsavq.Calibration
    small = lambda *a, **k: real(str(text_file), nsamples=4, seqlen=16)  # noqa: E731
    monkeypatch.setattr(rsavq, "load_model", lambda name: (model, tiny_tokenizer))
    monkeypatch.setattr(rsavq, "Calibration", small)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_library_example(), "README.md", "exec"), namespace)
    assert (tmp_path / "q3" / "config.json").exists()
    assert type(namespace["model"].model.layers[0].mlp.down_proj).__name__ == "VQLinear"


def test_save_dtype_stores_unquantized_tensors_smaller_and_loads_what_ran(tmp_path):
    from safetensors import safe_open

    model = build_tiny_llama(64)
    config = rsavq.preset("kmeans", bits=2, kmeans_iters=2)
    rsavq.quantize(model, config, out=tmp_path / "q", save_dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.norm.weight"] == "BF16"
    assert dtypes["model.layers.0.mlp.down_proj.codebooks_0"] == "F16"
    loaded = rsavq.load_quantized(tmp_path / "q")  # computes in the config's fp32 again
    assert loaded.model.norm.weight.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16  # kept as stored (nn.stored)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, model(ids).logits)


def test_finetune_auto_runs_where_the_sequential_vq_pass_does(tmp_path, tiny_tokenizer, text_file):
    import json

    calibration = rsavq.Calibration(str(text_file), nsamples=4, seqlen=16)
    kwargs = {"tokenizer": tiny_tokenizer, "calibration": calibration, "progress": False}
    config = rsavq.preset("default", bits=2, kmeans_iters=2, lam=0, uniform_bits=True)
    rsavq.quantize(build_tiny_llama(len(tiny_tokenizer)), config, out=tmp_path / "a", **kwargs)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert len(report["finetune"]) == 2
    assert report["distill"]["windows"] == 256  # the default, drawn like the calibration
    plain = rsavq.preset("kmeans", bits=2, kmeans_iters=2)
    rsavq.quantize(build_tiny_llama(len(tiny_tokenizer)), plain, out=tmp_path / "b", **kwargs)
    assert "finetune" not in json.loads((tmp_path / "b" / "report.json").read_text())
    model = build_tiny_llama(len(tiny_tokenizer))
    rsavq.quantize(model, config, out=tmp_path / "c", finetune=None, **kwargs)
    assert "finetune" not in json.loads((tmp_path / "c" / "report.json").read_text())
    with pytest.raises(rsavq.UsageError, match="block-sequential pass"):
        rsavq.quantize(build_tiny_llama(64), plain, finetune=rsavq.BlockTuning(), **kwargs)
    with pytest.raises(rsavq.UsageError, match="use one of auto, none"):
        rsavq.quantize(build_tiny_llama(64), plain, finetune="yes", **kwargs)


def test_finetune_windows_hold_out_past_the_distillation_windows(tiny_tokenizer, caplog):
    """The distillation's own windows are drawn like the calibration's; the held-out windows
    come from documents neither reads (quantize and benchmarks/quality.py share this rule)."""
    from helpers import WORDS
    from rsavq.api import Calibration, finetune_windows
    from rsavq.config import DISTILL_WINDOWS, default_windows
    from rsavq.data import Corpus, calibration_windows, heldout_windows
    from rsavq.distill import Distillation
    from rsavq.finetune import BlockTuning

    corpus = Corpus("docs", tuple(" ".join([w] * 30) for w in sorted(set(WORDS))), shuffle=True)
    c = Calibration(corpus, nsamples=2, seqlen=16, seed=3)
    tuning = BlockTuning()
    windows, held = finetune_windows(tiny_tokenizer, corpus, c, tuning, Distillation(windows=6))
    assert torch.equal(windows, calibration_windows(tiny_tokenizer, corpus, 6, 16, 3))
    assert torch.equal(held, heldout_windows(tiny_tokenizer, corpus, 6, 16, 3, tuning.heldout))
    seen = lambda ws: {w for x in ws for w in tiny_tokenizer.decode(x).split()}  # noqa: E731
    assert not seen(held) & seen(windows)
    windows, held = finetune_windows(tiny_tokenizer, corpus, c, tuning, Distillation(windows=None))
    assert windows is None  # trains on the calibration's own windows
    assert torch.equal(held, heldout_windows(tiny_tokenizer, corpus, 2, 16, 3, tuning.heldout))
    with pytest.raises(rsavq.DataError, match="fewer than 300 windows"):
        finetune_windows(tiny_tokenizer, corpus, c, tuning, Distillation(windows=300))
    two_bit = Distillation(windows=default_windows(2).distillation)  # the 2-bit default's 256
    with caplog.at_level(logging.WARNING, logger="rsavq.api"):  # a default count gives way
        windows, _ = finetune_windows(tiny_tokenizer, corpus, c, tuning, two_bit)
    assert windows is None and "distilling on the calibration's 2 windows" in caplog.text
    large = Calibration(corpus, nsamples=DISTILL_WINDOWS, seqlen=1, seed=3)
    assert finetune_windows(tiny_tokenizer, corpus, large, None, Distillation())[0] is None
    assert finetune_windows(tiny_tokenizer, corpus, c, None, None) == (None, None)


def test_calibration_resolves_the_default_counts_by_width():
    """Counts not given take the default's at the width; a given `nsamples` serves the Fisher
    statistics too unless they have their own."""
    from rsavq.api import Calibration
    from rsavq.data import Corpus

    two, three, four = (Calibration().resolved(bits) for bits in (2, 3, 4))
    assert (two.fisher_nsamples, two.nsamples) == (128, 128)
    assert (three.fisher_nsamples, three.nsamples) == (64, 64)
    assert (four.fisher_nsamples, four.nsamples) == (128, 128)
    assert Calibration(nsamples=32).resolved(2).fisher_nsamples == 32
    own = Calibration(nsamples=32, fisher_nsamples=8).resolved(2)
    assert (own.fisher_nsamples, own.nsamples) == (8, 32)
    assert Calibration(fisher_nsamples=8).resolved(2).nsamples == 128
    assert own.fisher_spec(Corpus("c4", ("x",))).nsamples == 8


def test_fisher_statistics_collect_then_reuse(tmp_path, tiny_tokenizer, text_file):
    model = build_tiny_llama(len(tiny_tokenizer))
    calibration = rsavq.Calibration(str(text_file), nsamples=3, seqlen=16)
    stats = rsavq.fisher_statistics(model, tiny_tokenizer, calibration, tmp_path / "s", bits=2)
    assert len(stats.layer_names) == 14 and (tmp_path / "s" / "manifest.json").exists()
    again = rsavq.fisher_statistics(model, None, None, tmp_path / "s")  # no text needed
    name = stats.layer_names[0]
    torch.testing.assert_close(again.layer(name).F_I, stats.layer(name).F_I)
    with pytest.raises(rsavq.UsageError, match="pass tokenizer="):
        rsavq.fisher_statistics(model, None, calibration, tmp_path / "other")


def test_default_block_fine_tuning_steps_by_width():
    from rsavq.api import finetune_stages

    two, three, four = (
        finetune_stages("auto", rsavq.preset("default", bits=b))[0] for b in (2, 3, 4)
    )
    assert (two.epochs, three.epochs, four.epochs) == (1, 2, 2)  # 128, 128 and 256 steps
