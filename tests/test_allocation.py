import pytest
import torch

from rsavq.allocation import channel_bits, plan_groups, repair, split_sizes
from rsavq.config import Allocation


def code_cost(sizes, bits):
    return sum(s * b for s, b in zip(sizes, bits, strict=True))


def fixed(sizes):
    return lambda bits: code_cost(sizes, bits)


@pytest.mark.parametrize("rule", list(Allocation))
@pytest.mark.parametrize("avg", [1.5, 2.0, 3.0, 4.0])
def test_plan_respects_budget_and_monotonicity(rule, avg):
    gen = torch.Generator().manual_seed(0)
    sens = torch.rand(120, generator=gen, dtype=torch.float64) ** 4 * 100
    sizes = split_sizes(120, 4)
    plan = plan_groups(sens, avg, sizes, rule, code_cost, avg * 120, (1, 5))
    bits = plan.group_bits
    assert code_cost(plan.group_sizes, bits) <= avg * 120 and sum(plan.group_sizes) == 120
    assert list(bits) == sorted(bits, reverse=True)  # more sensitive never fewer bits
    assert torch.equal(sens[plan.perm], sens.sort(descending=True).values)


def test_budget_is_used_when_it_fits():
    sizes = split_sizes(100, 4)
    plan = plan_groups(torch.ones(100), 2.0, sizes, Allocation.PAPER, code_cost, 200, (1, 5))
    assert plan.group_bits == (2, 2, 2, 2)


def test_repair_terminates_when_nothing_fits():
    bits = repair([3, 3], lambda b: 1e9, budget=10, bit_range=(1, 5))
    assert bits == [1, 1]  # stops at the minimum (the layer then reports its real bits)


def test_repair_gives_spare_bits_to_most_sensitive_first():
    assert repair([1, 1, 1], fixed((10, 10, 10)), budget=40, bit_range=(1, 5)) == [2, 1, 1]


def test_rate_distortion_bits_average_to_budget():
    sens = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    bits = channel_bits(sens, 3.0, Allocation.RATE_DISTORTION)
    assert bits.mean().item() == pytest.approx(3.0)
    assert bits[3] - bits[2] == pytest.approx(1.0)  # 4x the sensitivity -> +1 bit


def test_uniform_bits():
    plan = plan_groups(torch.rand(10), 3, (10,), Allocation.PAPER, lambda s, b: 0, 0, (1, 5), True)
    assert plan.group_bits == (3,) and plan.group_sizes == (10,)


@pytest.mark.parametrize(
    ("total", "groups", "quantum", "sizes"),
    [
        (576, 4, 32, (160, 160, 128, 128)),  # 18 words' worth of columns, not 4 x 144
        (600, 4, 32, (160, 160, 128, 152)),  # the last group takes the columns past a quantum
        (100, 4, 32, (25, 25, 25, 25)),  # fewer quanta than groups: plain near-equal split
        (120, 4, 1, (30, 30, 30, 30)),
        (3, 4, 1, (1, 1, 1)),
    ],
)
def test_split_sizes_in_whole_quanta(total, groups, quantum, sizes):
    assert split_sizes(total, groups, quantum) == sizes


def test_plan_refuses_sizes_that_miss_channels():
    with pytest.raises(ValueError, match="do not cover"):
        plan_groups(torch.rand(10), 3, (4, 4), Allocation.PAPER, lambda s, b: 0, 0, (1, 5))


def test_boundaries_move_in_quanta_to_meet_the_budget():
    # 576 columns in quanta of 32 cut 160/160/128/128; the rule's 4/3/3/2 bits cost 3.06 bits per
    # column there, and taking a bit away would leave 2.83: moving one quantum from the 3-bit
    # group to the 2-bit one fits the budget exactly
    sens = torch.cat([torch.full((160,), 15.0), torch.full((288,), 7.0), torch.full((128,), 3.0)])
    sens = sens.double() + torch.linspace(0, 1e-3, 576, dtype=torch.float64)
    sizes = split_sizes(576, 4, 32)
    plan = plan_groups(sens, 3.0, sizes, Allocation.PAPER, code_cost, 3 * 576, (1, 5), quantum=32)
    assert plan.group_bits == (4, 3, 3, 2)
    assert code_cost(plan.group_sizes, plan.group_bits) == 3 * 576
    assert all(s % 32 == 0 and s >= 64 for s in plan.group_sizes)


def test_boundaries_fill_the_budget_after_a_repair():
    # equal sensitivities: 2 bits everywhere; the spare budget of 2.25 bits per column goes to
    # the first groups a quantum at a time once they are wider than the rest
    sizes = (32, 32, 32, 32)
    plan = plan_groups(torch.ones(128), 2.0, sizes, Allocation.PAPER, code_cost, 2 * 128, (1, 5))
    assert plan.group_sizes == sizes  # equal widths: no boundary to move
    budget = 2.25 * 128
    uneven = plan_groups(torch.ones(128), 2.25, sizes, Allocation.PAPER, code_cost, budget, (1, 5))
    assert code_cost(uneven.group_sizes, uneven.group_bits) <= budget
    assert sum(uneven.group_sizes) == 128
