"""Data-parallel Fisher collection: 2 gloo ranks on the CPU against one process."""

import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsavq.errors import UsageError
from rsavq.stats import distributed
from rsavq.stats.artifact import load_stats
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import CalibrationSpec, fisher_stats

SPEC = CalibrationSpec("test", 6, 12, 0)


def _windows():
    return torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(3))


def _collect(out: Path, skip_last: bool = False, checkpoint_every: int = 0):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import build_tiny_llama
    from rsavq.modules import find_linears

    torch.set_num_threads(1)
    model = build_tiny_llama(64)
    layers = find_linears(model)
    if skip_last:
        layers.pop(sorted(layers)[-1])
    options = CollectOptions(progress=False, checkpoint_every=checkpoint_every)
    return fisher_stats(model, "tiny", _windows(), layers, out, SPEC, options)


def _dies_after_first_checkpoint():
    import rsavq.stats.run as run

    original = run.collect_fisher

    def collect(model, windows, layers, accumulators, options, on_checkpoint):
        def checkpoint(seen):
            on_checkpoint(seen)
            raise KeyboardInterrupt

        return original(model, windows, layers, accumulators, options, checkpoint)

    run.collect_fisher = collect


def _rank(rank: int, size: int, init: str, out: str, mode: str, errors) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    if mode == "die":
        _dies_after_first_checkpoint()
    try:
        every = 1 if mode in ("die", "resume") else 0
        _collect(Path(out), skip_last=mode == "mismatch" and rank == 1, checkpoint_every=every)
    except (UsageError, KeyboardInterrupt) as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, out: Path, mode: str = "same", size: int = 2) -> list:
    errors = mp.get_context("spawn").SimpleQueue()
    init = f"file://{tmp_path / f'init-{uuid.uuid4().hex}'}"  # a fresh rendezvous per run
    mp.spawn(_rank, args=(size, init, str(out), mode, errors), nprocs=size)
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


def test_two_ranks_equal_one_process(tmp_path):
    one = _collect(tmp_path / "one")
    assert _spawn(tmp_path, tmp_path / "two") == []
    two = load_stats(tmp_path / "two")
    assert two.manifest["layers"] == one.manifest["layers"]  # counts: all 6 windows
    assert not list((tmp_path / "two").glob("checkpoint*"))
    for name in one.layer_names:
        a, b = one.layer(name), two.layer(name)
        for key in ("F_O", "F_I", "g"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-4, atol=1e-7)
        assert b.count == a.count == 6 and b.sq_norm == pytest.approx(a.sq_norm, rel=1e-5)


def test_a_rank_with_other_layers_fails_fast(tmp_path):
    errors = _spawn(tmp_path, tmp_path / "bad", mode="mismatch")
    assert sorted(rank for rank, _ in errors) == [0, 1]
    assert all("rank 1's module list, settings differ from rank 0's" in e for _, e in errors)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_killed_ranks_resume_from_their_checkpoints(tmp_path):
    _spawn(tmp_path, tmp_path / "whole", mode="resume")
    errors = _spawn(tmp_path, tmp_path / "killed", mode="die")
    assert sorted(rank for rank, _ in errors) == [0, 1]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint*")) == [
        "checkpoint-rank0-of-2", "checkpoint-rank1-of-2",
    ]  # fmt: skip
    assert _spawn(tmp_path, tmp_path / "killed", mode="resume") == []
    whole, resumed = load_stats(tmp_path / "whole"), load_stats(tmp_path / "killed")
    for name in whole.layer_names:
        a, b = whole.layer(name), resumed.layer(name)
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("F_O", "F_I", "g"))


def test_owners_balance_bytes_and_agree():
    owners = distributed.assign_owners({"a": 10, "b": 7, "c": 5, "d": 3}, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert distributed.assign_owners({"a": 1}, 1) == {"a": 0}
    assert distributed.world() == (0, 1) and distributed.shard(torch.arange(5)).tolist() == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip
