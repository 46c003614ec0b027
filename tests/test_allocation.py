import pytest
import torch

from rsavq.allocation import channel_bits, plan_groups, repair, split_sizes
from rsavq.config import Allocation


def code_cost(sizes):
    return lambda bits: sum(s * b for s, b in zip(sizes, bits, strict=True))


@pytest.mark.parametrize("rule", list(Allocation))
@pytest.mark.parametrize("avg", [1.5, 2.0, 3.0, 4.0])
def test_plan_respects_budget_and_monotonicity(rule, avg):
    gen = torch.Generator().manual_seed(0)
    sens = torch.rand(120, generator=gen, dtype=torch.float64) ** 4 * 100
    sizes = split_sizes(120, 4)
    plan = plan_groups(sens, avg, 4, rule, code_cost(sizes), avg * 120, (1, 5))
    bits = plan.group_bits
    assert sum(s * b for s, b in zip(sizes, bits, strict=True)) <= avg * 120
    assert list(bits) == sorted(bits, reverse=True)  # more sensitive never fewer bits
    assert torch.equal(sens[plan.perm], sens.sort(descending=True).values)


def test_budget_is_used_when_it_fits():
    sizes = split_sizes(100, 4)
    plan = plan_groups(torch.ones(100), 2.0, 4, Allocation.PAPER, code_cost(sizes), 200, (1, 5))
    assert plan.group_bits == (2, 2, 2, 2)


def test_repair_terminates_when_nothing_fits():
    bits = repair([3, 3], lambda b: 1e9, budget=10, bit_range=(1, 5))
    assert bits == [1, 1]  # stops at the minimum (the layer then reports its real bits)


def test_repair_gives_spare_bits_to_most_sensitive_first():
    assert repair([1, 1, 1], code_cost((10, 10, 10)), budget=40, bit_range=(1, 5)) == [2, 1, 1]


def test_rate_distortion_bits_average_to_budget():
    sens = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    bits = channel_bits(sens, 3.0, Allocation.RATE_DISTORTION)
    assert bits.mean().item() == pytest.approx(3.0)
    assert bits[3] - bits[2] == pytest.approx(1.0)  # 4x the sensitivity -> +1 bit


def test_uniform_bits():
    plan = plan_groups(torch.rand(10), 3, 1, Allocation.PAPER, lambda b: 0, 0, (1, 5), True)
    assert plan.group_bits == (3,) and plan.group_sizes == (10,)
