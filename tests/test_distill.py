import json
import math

import pytest
import torch

from helpers import build_tiny_llama
from rsavq.api import finetune_stages
from rsavq.config import preset
from rsavq.distill import Distillation, distill, mean_kl, sparse_kl, teacher_targets
from rsavq.errors import UsageError
from rsavq.finetune import BlockTuning
from rsavq.pipeline import quantize_model
from test_finetune import quantized  # the same tiny model, config and windows

CONFIG = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2)
INT8 = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2, codebook_dtype="int8")


def windows(n=4, t=16, vocab=64, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def kl_full(logits_p, logits_q):
    p, q = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


@pytest.mark.parametrize("k", [1, 5, 64])
def test_sparse_kl_is_the_kl_of_the_lumped_distributions(k):
    torch.manual_seed(0)
    p, q = torch.randn(2, 3, 64) * 3, torch.randn(2, 3, 64) * 3
    top = p.log_softmax(-1).topk(k, dim=-1)
    teacher = {
        "logp": top.values,
        "index": top.indices.int(),
        "rest": torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6)),
    }
    loss = sparse_kl(q, teacher)
    if k == 64:  # the whole vocabulary: the full KL
        torch.testing.assert_close(loss, kl_full(p, q), rtol=1e-4, atol=1e-5)
    else:  # lumping outcomes never raises a KL divergence (data processing inequality)
        assert 0 < loss <= kl_full(p, q) + 1e-5
    assert sparse_kl(p, teacher).abs() < 1e-4


def test_schedule_covers_epochs():
    steps = Distillation(epochs=2, micro_batch=2).schedule(5)
    assert len(steps) == 6 and sorted(sum(steps[:3], [])) == list(range(5))
    assert Distillation(seed=1).schedule(5) != Distillation(seed=2).schedule(5)
    with pytest.raises(UsageError, match="positive window count"):
        Distillation(windows=0)


def test_distillation_lowers_the_kl_deterministically_and_resumes(tmp_path):
    fp, model = quantized(tmp_path)
    options = Distillation(epochs=3, lr=3e-3, micro_batch=2, save_every=2, bf16=False)
    teacher = teacher_targets(fp, windows(), options.top_k)
    held = windows(2)  # scored on two training windows: the tiny model's gains are too small
    # to show on unseen ones (they came and went with the quantizer's random draws)
    heldout = (held, teacher_targets(fp, held, options.top_k))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    before = mean_kl(model, windows(), teacher)
    snapshots = []
    report = distill(model, windows(), teacher, options, save=snapshots.append,
                     heldout=heldout, progress=False)  # fmt: skip
    assert mean_kl(model, windows(), teacher) < before
    assert report["loss_last"] < report["loss_first"] and report["steps"] == 6
    assert report["heldout_after"] < report["heldout_before"] and report["kept"]
    last_step, last = report["heldout_scores"][-1]  # the last state is kept
    assert last_step == 6 and report["heldout_after"] == last
    assert model.model.layers[0].mlp.down_proj.codebooks_0.dtype == torch.float16
    assert len(snapshots) == 3 and len(snapshots[0][0]["losses"]) == 2
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)  # resumed from the first snapshot: the same end
    distill(model, windows(), teacher, options, resume=snapshots[0], heldout=heldout,
            progress=False)  # fmt: skip
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="does not match this run"):  # scored, now not
        distill(model, windows(), teacher, options, resume=snapshots[0], progress=False)


def test_a_distillation_that_raises_the_heldout_kl_is_undone(tmp_path):
    fp, model = quantized(tmp_path)
    options = Distillation(epochs=2, lr=0.5, micro_batch=2, bf16=False)  # far too large a step
    teacher = teacher_targets(fp, windows(), options.top_k)
    held = windows(2, seed=5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    report = distill(model, windows(), teacher, options, progress=False,
                     heldout=(held, teacher_targets(fp, held, options.top_k)))  # fmt: skip
    assert report["heldout_after"] == report["heldout_before"] and not report["kept"]
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    steps = len(options.schedule(len(windows())))
    every = math.ceil(steps / options.checks)  # no early stop: every step runs, then goes back
    assert report["steps"] == steps
    assert [s for s, _ in report["heldout_scores"]] == list(range(0, steps, every)) + [steps]


@pytest.mark.parametrize("config", [CONFIG, INT8], ids=["fp16", "int8"])
def test_pipeline_distills_resumes_and_reports(tmp_path, monkeypatch, config):
    import rsavq.distill as module

    options = Distillation(epochs=2, lr=3e-3, micro_batch=2, save_every=1)

    def run(out):
        torch.manual_seed(0)
        model = build_tiny_llama(64)
        quantize_model(
            model, config, None, out, progress=False, calibration=windows(),
            heldout=windows(2, seed=5), tuning=BlockTuning(epochs=1), distillation=options,
        )  # fmt: skip
        return model

    full = run(tmp_path / "full")
    original, calls = module.sparse_kl, []

    def dies_at_third_training_step(logits, teacher):  # (held-out windows score one by one)
        calls.extend([1] if len(logits) == options.micro_batch else [])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(logits, teacher)

    monkeypatch.setattr(module, "sparse_kl", dies_at_third_training_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / ".partial" / "items" / "distill.safetensors").exists()
    monkeypatch.setattr(module, "sparse_kl", original)
    resumed = run(tmp_path / "resumed")
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "full" / "report.json").read_text())
    assert report["distill"]["steps"] <= 4 and "heldout_after" in report["distill"]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert set(config["quantization_config"]["finetune"]) == {"block", "e2e"}


def test_distilling_a_saved_checkpoint_equals_the_pipeline(tmp_path):
    """What benchmarks/quality.py does for its distillation rows (reuse the block fine-tuned
    checkpoint) gives the pipeline's result."""
    from rsavq.serialization import load_quantized

    options = Distillation(epochs=1, lr=3e-3, micro_batch=2)
    kwargs = {"progress": False, "calibration": windows(), "tuning": BlockTuning(epochs=1)}
    torch.manual_seed(0)
    fp = build_tiny_llama(64)
    start = {k: v.clone() for k, v in fp.state_dict().items()}
    quantize_model(fp, CONFIG, None, tmp_path / "tuned", **kwargs)
    fp = build_tiny_llama(64)  # the FP model again (the layers were replaced in place)
    fp.load_state_dict(start)
    model = load_quantized(tmp_path / "tuned")
    teacher = teacher_targets(fp, windows(), options.top_k, bf16=options.bf16)
    distill(model, windows(), teacher, options,
            progress=False)  # fmt: skip
    torch.manual_seed(0)
    direct = build_tiny_llama(64)
    quantize_model(direct, CONFIG, None, tmp_path / "direct", distillation=options, **kwargs)
    a, b = model.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_stages_by_name_and_refusals():
    default, e2e = preset("default", 2), Distillation(windows=256)  # 2 bits: 256 windows
    block = BlockTuning(epochs=1)  # 2 bits: one epoch over twice the windows
    assert finetune_stages("auto", default) == (block, e2e)
    assert finetune_stages("block", default) == (block, None)
    assert finetune_stages("both", default) == (block, e2e)
    assert finetune_stages("e2e", default) == (None, e2e)
    assert finetune_stages("e2e", preset("default", 3)) == (None, Distillation())
    four = preset("default", 4)  # 4 bits: the default does not distill
    assert finetune_stages("auto", four) == (BlockTuning(epochs=2), None)
    assert finetune_stages("e2e", four) == (None, Distillation(windows=None))  # the calibration's
    assert finetune_stages(None, default) == (None, None)
    assert finetune_stages(Distillation(lr=1), default) == (None, Distillation(lr=1))
    from rsavq.methods import METHODS

    with pytest.raises(UsageError, match="rsavq's VQ layers"):
        finetune_stages("e2e", METHODS["gptq"].configure(3))
    with pytest.raises(UsageError, match="use one of"):
        finetune_stages("all", default)


def test_distillation_on_more_windows_than_the_calibration(tiny_model_dir, text_file, tmp_path):
    """`--distill-windows`: the teacher and the training see that many windows; the Hessians
    still come from --nsamples; the held-out windows come after both."""
    from rsavq.cli import main

    args = [
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--calib",
        str(text_file),
        "--seqlen",
        "16",
        "--bits",
        "2",
        "--kmeans-iters",
        "2",
        "--finetune",
        "e2e",
        "--device",
        "cpu",
    ]
    assert main([*args, "--nsamples", "4", "--distill-windows", "12", "--out",
                 str(tmp_path / "q")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["distill"]["tokens"] == 12 * 16 and report["distill"]["steps"] == 12
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["finetune"]["e2e"]["windows"] == 12
    with pytest.raises(UsageError, match="window count"):
        Distillation(windows=0)


def test_default_windows_by_width():
    from rsavq.config import default_windows
    from rsavq.distill import is_default_count

    assert default_windows(2) == default_windows(2.25) == (128, 128, 256, 1)
    assert default_windows(3) == default_windows(3.15) == (64, 64, 128, 2)
    assert default_windows(4) == (128, 128, 0, 2)
    assert Distillation().windows == 128
    assert is_default_count(256) and is_default_count(128) and not is_default_count(100)
    assert not is_default_count(None)
