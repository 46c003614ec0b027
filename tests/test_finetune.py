import pytest
import torch

from helpers import build_tiny_llama
from rsavq.config import preset
from rsavq.errors import UsageError
from rsavq.finetune import BlockTuning, trainable, tune_block
from rsavq.pipeline import quantize_model
from rsavq.stats.sequential import capture_inputs, hidden_of, run_block

CONFIG = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2)
INT8 = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2, codebook_dtype="int8")


def windows(n=4, t=16, vocab=64):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def quantized(tmp_path, config=CONFIG):
    """A tiny FP model and its twin quantized without tuning."""
    torch.manual_seed(0)
    fp = build_tiny_llama(64)
    model = build_tiny_llama(64)
    model.load_state_dict(fp.state_dict())
    quantize_model(model, config, None, tmp_path / "q", progress=False, calibration=windows())
    return fp, model


def quantized_block(tmp_path, config=CONFIG):
    """A tiny model quantized without tuning, its FP twin, and block 0's inputs."""
    fp, model = quantized(tmp_path, config)
    inputs = capture_inputs(fp, fp.model.layers[0], windows())
    targets = [hidden_of(*b) for b in run_block(fp.model.layers[0], inputs)]
    return model.model.layers[0], inputs, targets


def test_trainable_forward_equals_the_kernel_and_restores_it(tmp_path):
    block, inputs, _ = quantized_block(tmp_path)
    args, kwargs = inputs[0]
    with torch.no_grad():
        expected = block(*args, **kwargs)[0]
        with trainable(block) as params:
            assert params and all(p.requires_grad for p in params)
            torch.testing.assert_close(block(*args, **kwargs)[0], expected, rtol=1e-4, atol=1e-5)
        assert "forward" not in vars(block.mlp.down_proj)
        torch.testing.assert_close(block(*args, **kwargs)[0], expected)


def test_tuning_lowers_the_block_error_and_is_deterministic(tmp_path):
    block, inputs, targets = quantized_block(tmp_path)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    options = BlockTuning(epochs=3, lr=1e-3)
    held = (inputs[:1], targets[:1])
    losses = tune_block(block, inputs, targets, options, 0, held)
    assert losses["after"] < losses["before"]
    assert set(losses) == {"before", "after", "heldout_before", "heldout_after", "seconds"}
    seconds = losses.pop("seconds")
    tuned = {k: v.clone() for k, v in block.state_dict().items()}
    assert block.mlp.down_proj.codebooks_0.dtype == torch.float16
    block.load_state_dict(state)
    again = tune_block(block, inputs, targets, options, 0, held)
    assert again.pop("seconds") > 0 < seconds and again == losses
    assert all(torch.equal(tuned[k], v) for k, v in block.state_dict().items())


@pytest.mark.parametrize("config", [CONFIG, INT8], ids=["fp16", "int8"])
def test_pipeline_tunes_resumes_and_reports(tmp_path, monkeypatch, config):
    import rsavq.pipeline as pipeline

    tuning = BlockTuning(epochs=1, lr=1e-3)

    def run(out):
        model = build_tiny_llama(64)
        kwargs = {"progress": False, "calibration": windows(), "tuning": tuning}
        kwargs["heldout"] = windows(2)
        quantize_model(model, config, None, out, **kwargs)
        return model

    torch.manual_seed(0)
    full = run(tmp_path / "full")
    original, calls = pipeline.tune_block, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tune_block", dies_on_second)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(pipeline, "tune_block", original)
    torch.manual_seed(0)
    resumed = run(tmp_path / "resumed")
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert [r["block"] for r in report["finetune"]] == [0, 1]
    assert all(r["after"] <= r["before"] for r in report["finetune"])
    assert all("heldout_after" in r for r in report["finetune"])
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    recorded = config["quantization_config"]["finetune"]["block"]
    assert recorded["epochs"] == 1
    assert "targets" not in recorded


def test_tuning_needs_the_sequential_vq_pass(tmp_path):
    one_pass = preset("default", 2, sequential=False)
    with pytest.raises(UsageError, match="block-sequential pass"):
        quantize_model(
            build_tiny_llama(64), one_pass, None, tmp_path / "q", calibration=windows(),
            tuning=BlockTuning(),
        )  # fmt: skip
    with pytest.raises(UsageError, match="epochs >= 1"):
        BlockTuning(epochs=0)
    assert not (tmp_path / "q").exists()


def test_bf16_autocast_trains_too(tmp_path, bf16_units):
    block, inputs, targets = quantized_block(tmp_path)
    losses = tune_block(block, inputs, targets, BlockTuning(epochs=2, lr=1e-3, bf16=True), 0)
    assert losses["after"] < losses["before"]
    assert block.mlp.down_proj.codebooks_0.dtype == torch.float16
