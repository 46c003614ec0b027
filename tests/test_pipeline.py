import json

import pytest
import torch
from safetensors.torch import load_file

import rsavq.methods as methods
from helpers import build_tiny_llama, plain_config
from rsavq.config import Compensation, ScalarConfig, preset
from rsavq.errors import UsageError
from rsavq.modules import find_linears
from rsavq.nn import VQLinear
from rsavq.pipeline import quantize_model
from rsavq.serialization import load_quantized
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import CalibrationSpec, fisher_stats

CONFIG = plain_config(bits=2, groups=2, kmeans_iters=3, budget_includes_overhead=False)
DEFAULT = preset("default", 2, kmeans_iters=3)  # block-sequential, OBS, scales, refit
# int8 codebooks, WCSG groups at two widths
INT8 = preset("default", 2, kmeans_iters=3, codebook_dtype="int8", groups=2, vector_length=2)
BOTH = pytest.mark.parametrize(
    "config", [CONFIG, DEFAULT, INT8], ids=["fisher-only", "default", "int8"]
)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    model = build_tiny_llama(vocab_size=64, seed=7)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("stats")
    fisher_stats(
        model,
        "tiny",
        windows,
        find_linears(model),
        out,
        CalibrationSpec("rand", 4, 16, 0),
        CollectOptions(progress=False),
    )
    return out


def _windows():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))


def fresh():
    return build_tiny_llama(vocab_size=64, seed=7)


def quantize(out, stats_dir, config=CONFIG):
    from rsavq.stats import load_stats

    model = fresh()
    quantize_model(
        model, config, load_stats(stats_dir), out, progress=False, calibration=_windows()
    )
    return model


@BOTH
def test_checkpoint_loads_with_identical_logits(tmp_path, stats_dir, config):
    model = quantize(tmp_path / "q", stats_dir, config)
    assert sum(isinstance(m, VQLinear) for m in model.modules()) == 14
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # ties restored


@BOTH
def test_report_bits_are_the_stored_bits(tmp_path, stats_dir, config):
    quantize(tmp_path / "q", stats_dir, config)
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["calibration"] == {"windows": 3, "seqlen": 16, "fisher_windows": 4}
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    for row in report["layers"]:
        stored = sum(
            t.numel() * t.element_size() * 8
            for k, t in tensors.items()
            if k.startswith(row["name"] + ".") and not k.endswith(".bias")
        )
        counted = row["bits_per_weight"] * row["shape"][0] * row["shape"][1]
        assert stored == pytest.approx(counted)
    assert (tmp_path / "q" / "report.md").read_text().startswith("# RSAVQ report: 14 layers")


@BOTH
def test_resume_after_interruption_gives_the_same_checkpoint(
    tmp_path, stats_dir, monkeypatch, config
):
    quantize(tmp_path / "full", stats_dir, config)
    original, calls = methods.quantize_layer, []

    def dies_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(methods, "quantize_layer", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        quantize(tmp_path / "resumed", stats_dir, config)
    items = (tmp_path / "resumed" / ".partial" / "items").iterdir()
    assert len([p for p in items if "codebooks" not in p.name]) == 4
    monkeypatch.setattr(methods, "quantize_layer", original)
    quantize(tmp_path / "resumed", stats_dir, config)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / ".partial").exists()


def test_existing_checkpoint_is_never_overwritten(tmp_path, stats_dir):
    quantize(tmp_path / "q", stats_dir)
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a checkpoint"):
        quantize(
            tmp_path / "q",
            stats_dir,
            plain_config(bits=3, groups=1, budget_includes_overhead=False),
        )
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before


def test_interrupted_run_with_other_settings_is_refused(tmp_path, stats_dir):
    (tmp_path / "q" / ".partial").mkdir(parents=True)
    (tmp_path / "q" / ".partial" / "run.json").write_text('{"config": {}}')
    with pytest.raises(UsageError, match="interrupted run with other settings"):
        quantize(tmp_path / "q", stats_dir)


def test_stats_from_another_model_are_refused(tmp_path, stats_dir):
    from rsavq.stats import load_stats

    other = build_tiny_llama(vocab_size=64, layers=3)
    with pytest.raises(UsageError, match="made from another model"):
        quantize_model(other, CONFIG, load_stats(stats_dir), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_missing_stats_directory(tmp_path):
    from rsavq.stats import load_stats

    with pytest.raises(UsageError, match="no Fisher statistics"):
        load_stats(tmp_path / "nowhere")


def test_kmeans_baseline_needs_no_stats(tmp_path):
    config = plain_config(
        bits=2, groups=1, uniform_bits=True, lam=0, kmeans_iters=2, budget_includes_overhead=False
    )
    quantize_model(fresh(), config, None, tmp_path / "q", progress=False)
    assert load_quantized(tmp_path / "q") is not None


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scalar_baselines_write_a_plain_checkpoint(tmp_path, method):
    from transformers import AutoModelForCausalLM

    model = fresh()
    config = ScalarConfig(method=method, bits=3, group_size=32)
    calibration = _windows() if method == "gptq" else None
    records = quantize_model(
        model, config, None, tmp_path / "q", progress=False, calibration=calibration
    )
    layer = find_linears(model)["model.layers.0.mlp.down_proj"]  # 48 x 96: 3 groups of 32
    assert len(torch.unique(layer.weight[0])) <= 3 * 8  # 3 groups (act-order permutes them)
    row = next(r for r in records if r.name == "model.layers.0.mlp.down_proj")
    act_order = 32 * 96 if method == "gptq" else 0
    assert row.bits_per_weight == (48 * 96 * 3 + 48 * 3 * 19 + act_order) / (48 * 96)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["summary"]["layers"] == 14


def test_gptq_without_hessians_is_refused(tmp_path):
    with pytest.raises(UsageError, match="calibration windows"):
        quantize_model(fresh(), ScalarConfig(method="gptq"), None, tmp_path / "q", progress=False)


def test_hessian_compensation_in_the_pipeline(tmp_path, stats_dir):
    from rsavq.stats import load_stats

    model = fresh()
    config = plain_config(bits=2, groups=2, kmeans_iters=2, compensation=Compensation.HESSIAN)
    quantize_model(
        model,
        config,
        load_stats(stats_dir),
        tmp_path / "q",
        progress=False,
        calibration=_windows(),
        calibration_id={"source": "rand"},
    )
    loaded = load_quantized(tmp_path / "q")
    assert loaded.config.quantization_config["config"]["compensation"] == "hessian"


def test_a_model_without_linear_layers_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no quantizable layer"):
        quantize_model(fresh(), plain_config(skip=("*",)), None, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def _quantize_rank(rank, size, init, out, stats, die, errors):
    import sys
    from pathlib import Path

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rsavq.finetune import BlockTuning
    from rsavq.stats.artifact import load_stats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    if die and rank == 1:
        import rsavq.pipeline as pipeline

        original = pipeline._layer

        def dies_after_one_layer(*args):
            original(*args)
            raise KeyboardInterrupt("rank 1 killed")

        pipeline._layer = dies_after_one_layer
    try:
        model = build_tiny_llama(vocab_size=64, seed=7)
        windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
        quantize_model(model, DEFAULT, load_stats(stats), out, progress=False, calibration=windows,
                       tuning=BlockTuning(epochs=1))  # fmt: skip
    except KeyboardInterrupt as exc:
        errors.put((rank, str(exc)))
        raise SystemExit(1) from exc
    finally:
        dist.destroy_process_group()


def test_two_ranks_killed_and_resumed_equal_one_process(stats_dir, tmp_path):
    """Layer-parallel quantization: a rank dies mid-way, the rerun resumes from the shared store
    and the checkpoint equals a single process's, bit for bit."""
    import uuid

    import torch.multiprocessing as mp

    from rsavq.finetune import BlockTuning
    from rsavq.stats.artifact import load_stats

    model = build_tiny_llama(vocab_size=64, seed=7)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, DEFAULT, load_stats(stats_dir), tmp_path / "one", progress=False,
                   calibration=windows, tuning=BlockTuning(epochs=1))  # fmt: skip
    out, errors = tmp_path / "two", mp.get_context("spawn").SimpleQueue()

    def spawn(die: bool):
        init = f"file://{tmp_path / uuid.uuid4().hex}"
        args = (2, init, str(out), str(stats_dir), die, errors)
        mp.spawn(_quantize_rank, args=args, nprocs=2)

    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):  # either rank
        spawn(die=True)
    assert errors.get() == (1, "rank 1 killed")
    assert list((out / ".partial" / "items").glob("*.safetensors"))  # work kept
    spawn(die=False)
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_layer_bits_give_matching_layers_their_own_width(tmp_path, stats_dir):
    layer_bits = (("*.v_proj", 3), ("k_proj", 4))
    config = preset("default", 2, vector_length=2, kmeans_iters=3, layer_bits=layer_bits)
    model = quantize(tmp_path / "q", stats_dir, config)
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    widths = {row["name"].rsplit(".", 1)[-1]: set(row["group_bits"]) for row in report["layers"]}
    assert widths["v_proj"] == {3} and widths["k_proj"] == {4}
    assert widths["q_proj"] == widths["down_proj"] == {2}
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_4_bit_default_widens_k_and_v_to_5_bits(tmp_path, stats_dir):
    """1,024-entry codebooks on layers with fewer vectors than entries still quantize and load."""
    model = quantize(tmp_path / "q", stats_dir, preset("default", 4, kmeans_iters=3))
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    widths = {row["name"].rsplit(".", 1)[-1]: set(row["group_bits"]) for row in report["layers"]}
    assert widths["k_proj"] == widths["v_proj"] == {5} and widths["up_proj"] == {4}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loaded = load_quantized(tmp_path / "q")(ids).logits
        torch.testing.assert_close(loaded, model(ids).logits, rtol=0, atol=0)
