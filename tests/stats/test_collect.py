import pytest
import torch

from helpers import brute_force
from rsavq.stats.collect import CollectOptions, collect_fisher, make_accumulators


def collected(model, layers, windows, **options):
    """The statistics in float32 (exact against the brute force) unless `bf16=True`."""
    options = CollectOptions(**{"progress": False, "bf16": False, **options})
    accs = make_accumulators(layers, options.diag_output, "cpu")
    collect_fisher(model, windows, layers, accs, options)
    return {name: acc.stats for name, acc in accs.items()}


def test_bf16_collection_stays_close_to_float32(tiny, bf16_units):
    assert CollectOptions().bf16  # the default: bfloat16 forward and backward passes
    model, layers, windows = tiny
    exact, fast = collected(model, layers, windows), collected(model, layers, windows, bf16=True)
    for name in layers:
        for key in ("F_O", "F_I", "g"):
            ref, got = getattr(exact[name], key).double(), getattr(fast[name], key).double()
            assert (got - ref).norm() / ref.norm() < 0.05, (name, key)
            assert not torch.equal(got, ref)  # bfloat16 really ran


def test_bf16_collection_runs_in_float32_where_bfloat16_products_are_slow(tiny, monkeypatch):
    """On a CPU without bfloat16 kernels (`fast_bf16` False: AVX2 only) the default's bfloat16
    passes run in float32: the statistics of the float32 collection, bit for bit."""
    monkeypatch.setattr("rsavq.runtime._fast_bf16", lambda device_type: False)
    model, layers, windows = tiny
    exact = collected(model, layers, windows)
    fallback = collected(model, layers, windows, bf16=True)
    for name in layers:
        for key in ("F_O", "F_I", "g"):
            assert torch.equal(getattr(fallback[name], key), getattr(exact[name], key))


@pytest.mark.parametrize("options", [{}, {"batch_size": 2}, {"gradient_checkpointing": True}])
def test_matches_explicit_per_sample_gradients(tiny, options):
    model, layers, windows = tiny
    expected = brute_force(model, layers, windows)
    got = collected(model, layers, windows, **options)
    for name, stats in got.items():
        ref = expected[name]
        scale = ref["F_I"].abs().max().item()
        assert stats.count == len(windows)
        torch.testing.assert_close(stats.F_O.double(), ref["F_O"], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(stats.F_I.double(), ref["F_I"], rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(stats.g.double(), ref["g"], rtol=1e-4, atol=1e-6)
        assert stats.sq_norm == pytest.approx(ref["sq_norm"], rel=1e-5)


def test_diag_output_mode_keeps_the_diagonal(tiny):
    model, layers, windows = tiny
    full = collected(model, layers, windows)
    diag = collected(model, layers, windows, diag_output=True)
    for name in layers:
        assert diag[name].diag_output and diag[name].F_O.dim() == 1
        torch.testing.assert_close(diag[name].F_O, full[name].F_O.diagonal(), rtol=1e-5, atol=0)
        torch.testing.assert_close(diag[name].F_I, full[name].F_I, rtol=1e-5, atol=0)


def test_collection_leaves_the_model_as_it_was(tiny):
    model, layers, windows = tiny
    flags = [p.requires_grad for p in model.parameters()]
    collected(model, layers, windows[:1], gradient_checkpointing=True)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not model.is_gradient_checkpointing
    assert all("forward" not in vars(block) for block in model.model.layers)  # unwrapped
