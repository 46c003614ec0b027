import argparse
import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from families import FAMILIES, build_family
from rsavq.cli import main
from rsavq.models import load_model
from rsavq.modules import require_linears
from rsavq.stats.run import CalibrationSpec, fisher_stats
from rsavq.streaming import is_streamed, load_streamed, materialize, release, stream_device_map


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture()
def models(tiny_model_dir):
    """The tiny LLaMA loaded whole and streamed."""
    return load_model(str(tiny_model_dir))[0], load_model(str(tiny_model_dir), stream=True)[0]


def test_blocks_stay_on_disk_and_the_model_computes_the_same(models):
    whole, streamed = models
    assert is_streamed(streamed) and not is_streamed(whole)
    assert streamed.model.layers[1].mlp.down_proj.weight.is_meta
    assert not streamed.model.embed_tokens.weight.is_meta
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(logits(whole, ids), logits(streamed, ids))
    assert streamed.model.layers[0].self_attn.q_proj.weight.is_meta  # dropped after use


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_no_memory_map_of_the_checkpoint_outlives_a_read(tiny_model_dir):
    """Pages read through a map that stays open would stay resident: a block per block read."""
    streamed = load_model(str(tiny_model_dir), stream=True)[0]
    logits(streamed, torch.randint(0, 300, (1, 8)))
    materialize(streamed.model.layers[0])
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(tiny_model_dir) not in maps


def test_device_map_puts_blocks_on_disk_and_the_rest_on_the_device(models):
    device_map = stream_device_map(models[0], "cpu")
    assert device_map == {
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }


def test_materialize_reads_a_block_for_good_and_release_drops_it(models):
    whole, streamed = models
    block = materialize(streamed.model.layers[0])
    assert not is_streamed(block) and is_streamed(streamed)
    for (name, a), (_, b) in zip(block.state_dict().items(), whole.model.layers[0].state_dict()
                                 .items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    ids = torch.randint(0, 300, (1, 8))
    assert torch.equal(logits(whole, ids), logits(streamed, ids))
    release(block.mlp.up_proj)
    assert block.mlp.up_proj.weight.is_meta
    release(whole.model.layers[0].mlp.up_proj)  # never streamed: kept (may be shared)
    assert not whole.model.layers[0].mlp.up_proj.weight.is_meta


def test_streamed_fisher_statistics_equal_the_whole_models(models, tmp_path):
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    spec = CalibrationSpec("test", 3, 16)
    stats = [
        fisher_stats(m, "tiny", windows, require_linears(m), tmp_path / str(i), spec)
        for i, m in enumerate(models)
    ]
    # every block's weights were dropped again after use (none left behind by a recomputation)
    assert all(p.is_meta for p in models[1].model.layers.parameters())
    for name in stats[0].layer_names:
        a, b = stats[0].layer(name), stats[1].layer(name)
        torch.testing.assert_close(a.F_O, b.F_O)
        torch.testing.assert_close(a.F_I, b.F_I)
        torch.testing.assert_close(a.g, b.g)


def test_streamed_quantize_writes_the_same_checkpoint(tiny_model_dir, text_file, tmp_path):
    """The whole default path (Fisher, block-sequential VQ, block fine-tuning, distillation)
    from a streamed model gives the checkpoint of the model loaded whole."""
    args = ["quantize", "--model", str(tiny_model_dir), "--calib", str(text_file)]
    args += ["--nsamples", "4", "--seqlen", "16", "--bits", "2", "--kmeans-iters", "2"]
    args += ["--finetune-epochs", "1", "--device", "cpu"]
    for run, extra in (("whole", []), ("streamed", ["--stream-weights"])):  # own statistics
        assert main([*args, *extra, "--stats", str(tmp_path / f"{run}-stats"), "--out",
                     str(tmp_path / run)]) == 0  # fmt: skip
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    assert whole.keys() == streamed.keys()
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)


def test_eval_of_a_streamed_model_gives_the_same_perplexity(tiny_model_dir, text_file, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--ppl", str(text_file), "--seqlen", "32"]
    args += ["--limit", "4"]
    printed = []
    for extra in ([], ["--stream-weights"]):
        assert main([*args, *extra, "--device", "cpu"]) == 0
        printed.append(capsys.readouterr().out.split(" (")[0])  # "corpus: PPL x over n windows"
    assert printed[0] == printed[1] and "PPL" in printed[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_streams_with_the_same_outputs_and_gradients(family, tmp_path):
    """The device map is found by the generic walk (GPT-2's Conv1D blocks, MoE experts, ...)."""
    from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators

    build_family(family).save_pretrained(tmp_path)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    streamed = load_streamed(tmp_path, torch.float32, "cpu")
    assert is_streamed(streamed)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(whole, ids), logits(streamed, ids))
    collected = []
    for model in (whole, streamed):
        layers = require_linears(model)
        accumulators = make_accumulators(layers, False, "cpu")
        collect_fisher(model, ids, layers, accumulators, CollectOptions(progress=False))
        collected.append(accumulators)
    for name, acc in collected[0].items():
        torch.testing.assert_close(acc.stats.F_I, collected[1][name].stats.F_I)
        torch.testing.assert_close(acc.stats.F_O, collected[1][name].stats.F_O)


def test_fisher_plan_of_a_streamed_model_counts_one_block(tiny_model_dir, monkeypatch):
    """`rsavq fisher` prints the expected peak; streamed, it adds the largest decoder block and
    the largest tensor being read to what the process holds (the blocks are not resident)."""
    from rsavq.cli.fisher import _expected_peak
    from rsavq.modules import weight_shape
    from rsavq.stats import memory as planner
    from rsavq.stats.memory import collection_peak, fisher_memory, held_bytes

    monkeypatch.setattr(planner, "resident_bytes", lambda: 10**9)  # what the process holds

    model = load_streamed(tiny_model_dir, torch.float32, "cpu")
    shapes = {n: weight_shape(m) for n, m in require_linears(model).items()}
    args = argparse.Namespace(diag_output=False, seqlen=16, batch_size=1, stream_weights=True)
    passes = [list(shapes)]
    peak = _expected_peak(model, shapes, passes, args, torch.float32)
    block = sum(m * n for name, (m, n) in shapes.items() if ".layers.0." in name) * 4
    read = max(m * n for m, n in shapes.values()) * 4
    memory = fisher_memory(list(shapes.values()), False, 16, 1, 4)
    rest = collection_peak(0, held_bytes(passes, shapes, False), memory, block, read)
    assert peak == 10**9 + rest
