"""Data-parallel Fisher collection on torch.distributed (docs/architecture.md section 5).

Started by `torchrun` (gloo on CPUs, NCCL on GPUs), every rank loads the model and draws the same
calibration windows; rank r takes windows r, r + size, r + 2 size, ... and accumulates its own
running means. At the end each layer's statistics are summed, count-weighted, onto one owner
rank (`dist.reduce`), owners chosen so that the bytes each rank holds and writes are balanced,
and each owner writes its layers; rank 0 writes the manifest last. Before any work the ranks
compare what they are about to do (layers, run settings, windows): a rank that differs fails
fast with one line.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist

from rsavq.errors import UsageError
from rsavq.stats.accumulator import FisherAccumulator


def world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group `torchrun` describes in the environment (gloo on the CPU, NCCL on
    CUDA); False when not started by a launcher with more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """`cuda` becomes this rank's GPU (`LOCAL_RANK`); other devices are returned as they are."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def fingerprint(value) -> str:
    """A short hash of a JSON-able value or a tensor (what ranks compare)."""
    if torch.is_tensor(value):
        data = value.detach().cpu().contiguous().numpy().tobytes()
    else:
        data = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def check_same(what: dict[str, object]) -> None:
    """Fail fast, on every rank, when any rank's `what` (name -> value) differs from rank 0's."""
    rank, size = world()
    if size == 1:
        return
    mine = {k: fingerprint(v) for k, v in what.items()}
    every: list[dict] = [{}] * size
    dist.all_gather_object(every, mine)
    for other, theirs in enumerate(every):
        differ = [k for k in mine if theirs.get(k) != every[0].get(k)]
        if differ:
            raise UsageError(
                f"rank {other}'s {', '.join(differ)} differ from rank 0's: every rank must run "
                "the same command on the same model and data"
            )


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every `size`-th, starting at its rank."""
    rank, size = world()
    return windows[rank::size]


def accumulator_bytes(acc: FisherAccumulator) -> int:
    s = acc.stats
    return sum(t.numel() * t.element_size() for t in (s.F_O, s.F_I, s.g))


def assign_owners(costs: dict[str, int], size: int) -> dict[str, int]:
    """Layer -> rank, largest first onto the least loaded rank (ties: lowest rank): balanced
    bytes per rank, and the same on every rank (the costs are)."""
    load = [0] * size
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def reduce_to_owners(accumulators: dict[str, FisherAccumulator]) -> dict[str, int]:
    """Sum every layer's statistics, count-weighted, onto its owner; returns the owners. On the
    owner the accumulator then holds the statistics of every rank's windows; the other ranks'
    copies are left undefined (and should be dropped)."""
    _, size = world()
    owners = assign_owners({n: accumulator_bytes(a) for n, a in accumulators.items()}, size)
    for name, acc in accumulators.items():
        s = acc.stats
        count = torch.tensor([float(s.count)], dtype=torch.float64)
        dist.all_reduce(count)
        total = int(count.item())
        weight = s.count / total if total else 0.0
        extra = torch.tensor([s.sq_norm * s.count], dtype=torch.float64)
        for t in (s.F_O, s.F_I, s.g):
            t.mul_(weight)
            dist.reduce(t, dst=owners[name])
        dist.reduce(extra, dst=owners[name])
        s.sq_norm = float(extra.item()) / total if total else 0.0
        s.count = total
    return owners
