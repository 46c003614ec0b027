"""WCSG: sort channels by sensitivity, cut them into groups, give each group a bit width.

The budget is exact: after the rule's rounding, bits are repaired greedily (taken from the least
sensitive group, given to the most sensitive) until the layer's stored bits fit the budget, and
more sensitive groups never get fewer bits than less sensitive ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rsavq.config import Allocation


@dataclass(frozen=True)
class GroupPlan:
    perm: torch.Tensor  # [n] channel order, most sensitive first
    group_sizes: tuple[int, ...]
    group_bits: tuple[int, ...]


def channel_bits(sensitivity: torch.Tensor, avg_bits: float, rule: Allocation) -> torch.Tensor:
    """Fractional per-channel bits `[C]` from sensitivities `I_c` (docs/method.md section 2)."""
    I = sensitivity.double().clamp_min(0)
    if rule == Allocation.PAPER:
        logs = torch.log2(I + 1)
        total = logs.sum()
        if total <= 0:
            return torch.full_like(I, avg_bits)
        return avg_bits * len(I) * logs / total
    floor = I[I > 0].min() if (I > 0).any() else torch.tensor(1.0, dtype=I.dtype)
    logs = torch.log2(I.clamp_min(floor))
    return avg_bits + 0.5 * (logs - logs.mean())


def split_sizes(total: int, groups: int, quantum: int = 1) -> tuple[int, ...]:
    """`groups` nearly equal consecutive sizes summing to `total` (larger ones first), in whole
    `quantum`s where there are at least `groups` of them (the last group also takes the rest).

    Packed codes fill whole 32-bit words per row of each group, so a group that ends mid-word
    pads every row; whole quanta of columns keep the padding to the last group at most."""
    units = total // quantum
    if units < groups:
        quantum, units = 1, total
    groups = max(1, min(groups, units))
    base, extra = divmod(units, groups)
    sizes = [(base + (g < extra)) * quantum for g in range(groups)]
    sizes[-1] += total - sum(sizes)
    return tuple(sizes)


def plan_groups(
    sensitivity: torch.Tensor,
    avg_bits: float,
    sizes: tuple[int, ...],
    rule: Allocation,
    cost: Callable[[tuple[int, ...], tuple[int, ...]], float],
    budget: float,
    bit_range: tuple[int, int],
    uniform: bool = False,
    quantum: int = 1,
) -> GroupPlan:
    """Sort, cut into groups of `sizes` (most sensitive first), allocate; `cost(sizes, bits)`
    are the layer's stored bits. Where neighbouring groups differ in width, their boundary may
    move by whole `quantum`s of columns to meet the budget: first down to it from the rule's
    rounding (before any bit is taken away), then, after the bits are repaired, up to it."""
    if sum(sizes) != len(sensitivity):
        raise ValueError(f"group sizes {sizes} do not cover {len(sensitivity)} channels")
    perm = torch.argsort(sensitivity.double(), descending=True, stable=True)
    if uniform:
        return GroupPlan(perm, sizes, (int(avg_bits),) * len(sizes))
    per_channel = channel_bits(sensitivity, avg_bits, rule)[perm]
    lo, hi = bit_range
    bits, start = [], 0
    for size in sizes:
        bits.append(int(min(hi, max(lo, round(per_channel[start : start + size].mean().item())))))
        start += size
    bits = _monotone(bits)
    floors = tuple(max(quantum, s // 2) for s in sizes)
    sizes = _shift(sizes, floors, bits, cost, budget, quantum, down=True)
    bits = repair(bits, lambda b: cost(sizes, b), budget, bit_range)
    sizes = _shift(sizes, floors, tuple(bits), cost, budget, quantum, down=False)
    return GroupPlan(perm, sizes, tuple(bits))


def _shift(sizes, floors, bits, cost, budget: float, quantum: int, down: bool):
    """Move boundaries between neighbours of different widths a `quantum` of columns at a
    time: `down`, to the narrower group (least sensitive boundary first) until the cost fits
    the budget; otherwise to the wider group, the smallest rise that still fits first, until
    none fits. No group shrinks below its floor (half its size as cut)."""
    sizes = tuple(sizes)
    while not (down and cost(sizes, bits) <= budget):
        moves = []
        for g in range(len(sizes) - 1):
            src, dst = (g, g + 1) if down else (g + 1, g)
            if bits[g] != bits[g + 1] and sizes[src] - quantum >= floors[src]:
                trial = list(sizes)
                trial[src], trial[dst] = trial[src] - quantum, trial[dst] + quantum
                moves.append(tuple(trial))
        if not down:
            fits = [m for m in moves if cost(m, bits) <= budget]
            moves = sorted(fits, key=lambda m: cost(m, bits))
        if not moves:
            break
        sizes = moves[-1] if down else moves[0]
    return sizes


def _monotone(bits: list[int]) -> list[int]:
    """Non-increasing from the most sensitive group (rounding can break ties the wrong way)."""
    for g in range(1, len(bits)):
        bits[g] = min(bits[g], bits[g - 1])
    return bits


def repair(
    bits: list[int],
    cost: Callable[[tuple[int, ...]], float],
    budget: float,
    bit_range: tuple[int, int],
) -> list[int]:
    """Greedy exact-budget repair of non-increasing `bits`; stays non-increasing; terminates."""
    lo, hi = bit_range
    bits = list(bits)
    while cost(tuple(bits)) > budget:
        over = [g for g in range(len(bits)) if bits[g] > lo]
        if not over:
            break  # even the minimum does not fit: reported, never silently exceeded below lo
        bits[over[-1]] -= 1  # least sensitive group that can give a bit
    grown = True
    while grown:
        grown = False
        for g in range(len(bits)):  # most sensitive group first
            if bits[g] < hi and (g == 0 or bits[g] + 1 <= bits[g - 1]):
                trial = bits[:g] + [bits[g] + 1] + bits[g + 1 :]
                if cost(tuple(trial)) <= budget:
                    bits, grown = trial, True
                    break
    return bits
