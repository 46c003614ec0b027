import json

import pytest
import torch

from helpers import build_tiny_llama
from rsavq.errors import UsageError
from rsavq.modules import find_linears
from rsavq.stats import load_stats
from rsavq.stats.artifact import pack_upper, unpack_upper
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import CalibrationSpec, fisher_stats

SPEC = CalibrationSpec("test", 5, 24, 0)


def run(model, layers, windows, out, **options):
    opts = CollectOptions(progress=False, **options)
    return fisher_stats(model, "tiny", windows, layers, out, SPEC, opts)


def test_layout_and_reload(tiny, tmp_path):
    model, layers, windows = tiny
    stats = run(model, layers, windows, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["calibration"] == {"source": "test", "nsamples": 5, "seqlen": 24, "seed": 0}
    assert len(manifest["layers"]) == len(layers) == 14
    assert len(list((tmp_path / "s" / "layers").glob("*.safetensors"))) == 14
    reloaded = load_stats(tmp_path / "s")
    name = stats.layer_names[0]
    assert torch.equal(reloaded.layer(name).F_I, stats.layer(name).F_I)
    assert reloaded.layer(name).count == 5
    reloaded.check_model(model, layers)


def test_resume_after_interruption_is_identical(tiny, tmp_path):
    model, layers, windows = tiny
    full = run(model, layers, windows, tmp_path / "full")

    class Stop(Exception):
        pass

    import rsavq.stats.run as run_module

    original = run_module.save_checkpoint
    calls = []

    def save_then_die(*args):
        original(*args)
        calls.append(1)
        raise Stop

    run_module.save_checkpoint = save_then_die
    try:
        with pytest.raises(Stop):
            run(model, layers, windows, tmp_path / "resumed", checkpoint_every=2)
    finally:
        run_module.save_checkpoint = original
    assert calls and not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(UsageError, match="rerun the same `rsavq fisher` command to resume"):
        load_stats(tmp_path / "resumed")
    resumed = run(model, layers, windows, tmp_path / "resumed", checkpoint_every=2)
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    for name in full.layer_names:
        a, b = full.layer(name), resumed.layer(name)
        assert torch.equal(a.F_O, b.F_O) and torch.equal(a.F_I, b.F_I)
        assert torch.equal(a.g, b.g) and a.sq_norm == b.sq_norm and a.count == b.count == 5


def test_stats_from_another_model_are_refused(tiny, tmp_path):
    model, layers, windows = tiny
    stats = run(model, layers, windows[:2], tmp_path / "s")
    other = build_tiny_llama(vocab_size=64, layers=3)
    with pytest.raises(UsageError, match="made from another model"):
        stats.check_model(other, find_linears(other))


def test_complete_dir_of_a_different_run_is_not_overwritten(tiny, tmp_path):
    model, layers, windows = tiny
    run(model, layers, windows[:2], tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(UsageError, match="already holds Fisher statistics of a different run"):
        run(model, layers, windows[:2], tmp_path / "s", diag_output=True)
    assert (tmp_path / "s" / "manifest.json").read_text() == before


def test_missing_and_corrupt_files(tiny, tmp_path):
    model, layers, windows = tiny
    with pytest.raises(UsageError, match="manifest.json missing; collect them"):
        load_stats(tmp_path)
    stats = run(model, layers, windows[:1], tmp_path / "s")
    name = stats.layer_names[0]
    (tmp_path / "s" / "layers" / f"{name}.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="missing or corrupt"):
        load_stats(tmp_path / "s").layer(name)


def test_a_memory_budget_collects_in_passes_with_the_same_result(tiny, tmp_path):
    from rsavq.stats.memory import layer_bytes

    model, layers, windows = tiny
    one = run(model, layers, windows, tmp_path / "one")
    largest = max(layer_bytes(*one.layer(n).g.shape, False) for n in one.layer_names)
    calls = []
    import rsavq.stats.run as run_module

    original = run_module.collect_fisher
    run_module.collect_fisher = lambda *a, **k: calls.append(len(a[2])) or original(*a, **k)
    try:
        passes = run(model, layers, windows, tmp_path / "passes", memory_budget=2 * largest)
    finally:
        run_module.collect_fisher = original
    assert len(calls) > 2 and sum(calls) == len(layers)  # several passes, each layer once
    for name in one.layer_names:
        a, b = one.layer(name), passes.layer(name)
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("F_O", "F_I", "g"))
    with pytest.raises(UsageError, match="the minimum is"):
        run(model, layers, windows, tmp_path / "small", memory_budget=largest - 1)
    assert not (tmp_path / "small").exists()


BUDGET = 150_000  # bytes: the tiny model's 14 layers in 5 passes


def test_a_run_killed_between_passes_resumes(tiny, tmp_path):
    import rsavq.stats.run as run_module

    model, layers, windows = tiny
    whole = run(model, layers, windows, tmp_path / "whole", memory_budget=BUDGET)
    original, calls = run_module.collect_fisher, []

    def dies_in_second_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    run_module.collect_fisher = dies_in_second_pass
    try:
        with pytest.raises(KeyboardInterrupt):
            run(model, layers, windows, tmp_path / "killed", memory_budget=BUDGET)
    finally:
        run_module.collect_fisher = original
    written = len(list((tmp_path / "killed" / "layers").glob("*.safetensors")))
    assert 0 < written < len(layers)
    resumed = run(model, layers, windows, tmp_path / "killed", memory_budget=BUDGET)
    for name in whole.layer_names:
        assert torch.equal(whole.layer(name).F_O, resumed.layer(name).F_O)


@pytest.mark.parametrize("k", [1, 2, 7, 64])
def test_packed_triangles_round_trip(k):
    A = torch.randn(k, k + 3)
    F = A @ A.T
    packed = pack_upper(F)
    assert packed.shape == (k * (k + 1) // 2,)
    assert torch.equal(unpack_upper(packed, k), torch.triu(F) + torch.triu(F, 1).T)
    with pytest.raises(ValueError, match="not"):
        unpack_upper(packed, k + 1)


@pytest.mark.parametrize("diag_output", [False, True])
def test_factors_are_stored_as_triangles_and_format_1_still_reads(tiny, tmp_path, diag_output):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, layers, windows = tiny
    stats = run(model, layers, windows[:2], tmp_path / "s", diag_output=diag_output)
    name = stats.layer_names[0]
    path = tmp_path / "s" / "layers" / f"{name}.safetensors"
    stored, layer = load_file(path), stats.layer(name)
    m, n = layer.g.shape
    assert stored["F_I.upper"].numel() == n * (n + 1) // 2 and "F_I" not in stored
    assert ("F_O" in stored) == diag_output and ("F_O.upper" in stored) != diag_output
    assert torch.equal(layer.F_I, layer.F_I.T) and layer.F_O.shape == (
        (m,) if diag_output else (m, m)
    )
    # the same directory as format 1 wrote it: whole factors
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file(layer.state(), path, metadata)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest | {"format_version": 1}))
    old = load_stats(tmp_path / "s").layer(name)
    assert torch.equal(old.F_I, layer.F_I) and torch.equal(old.F_O, layer.F_O)
    assert run(model, layers, windows[:2], tmp_path / "s", diag_output=diag_output)  # reused
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest | {"format_version": 9}))
    with pytest.raises(UsageError, match="stats format 9, this rsavq reads 1, 2"):
        load_stats(tmp_path / "s")
