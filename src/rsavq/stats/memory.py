"""Memory needed to collect Fisher statistics, computed from layer shapes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rsavq.errors import UsageError

FP32 = 4


@dataclass(frozen=True)
class FisherMemory:
    accumulators: int  # bytes of F_O, F_I, g for every layer (fp32), held during collection
    captured_inputs: int  # bytes of the layer inputs kept per batch until their backward
    largest_G: int  # bytes of the biggest per-sequence gradient block [B, m, n] (fp32)


def fisher_memory(
    shapes: list[tuple[int, int]],
    diag_output: bool,
    seqlen: int,
    batch: int = 1,
    activation_bytes: int = 2,
) -> FisherMemory:
    """Collection memory for linear layers of `shapes` ([m, n] each) in one mode."""
    acc = sum(layer_bytes(m, n, diag_output) for m, n in shapes)
    inputs = sum(batch * seqlen * n for _, n in shapes) * activation_bytes
    largest = max(batch * m * n for m, n in shapes) * FP32
    return FisherMemory(acc, inputs, largest)


def layer_bytes(m: int, n: int, diag_output: bool) -> int:
    """Bytes of one layer's accumulators (F_O, F_I, g in fp32)."""
    return ((m if diag_output else m * m) + n * n + m * n) * FP32


def plan_passes(
    shapes: dict[str, tuple[int, int]], diag_output: bool, budget: int | None
) -> list[list[str]]:
    """Layers (in model order) cut into passes whose accumulators fit in `budget` bytes; one
    pass when there is no budget. A layer that alone exceeds it is refused, naming the minimum
    budget (and the one `diag_output` would need)."""
    if budget is None:
        return [list(shapes)]
    costs = {name: layer_bytes(*shape, diag_output) for name, shape in shapes.items()}
    largest = max(costs, key=costs.get)
    if costs[largest] > budget:
        hint = (
            ""
            if diag_output
            else (f", or {_gib(layer_bytes(*shapes[largest], True))} with --diag-output")
        )
        raise UsageError(
            f"memory budget {_gib(budget)} is too small for layer {largest}'s Fisher "
            f"accumulators: the minimum is {_gib(costs[largest])}{hint}"
        )
    passes: list[list[str]] = [[]]
    held = 0
    for name, cost in costs.items():
        if held + cost > budget:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += cost
    return passes


def held_bytes(passes: list[list[str]], shapes: dict, diag_output: bool) -> int:
    """The most accumulator bytes one pass holds."""
    return max(sum(layer_bytes(*shapes[n], diag_output) for n in p) for p in passes)


def collection_peak(
    resident: int, held: int, memory: FisherMemory, block: int = 0, read: int = 0
) -> int:
    """Expected peak bytes of a Fisher collection process: what it holds before collecting
    (`resident`: interpreter, libraries, the weights kept in memory), one pass's accumulators
    `held`, the largest per-sequence gradient and the captured layer inputs; a streamed model
    adds one decoder block of weights (`block`) and the file pages of the largest tensor being
    read (`read`). Within 2% of the measured peak for a LLaMA-7B-shaped model (BENCHMARKS.md,
    "Weight streaming")."""
    return resident + block + read + held + memory.largest_G + memory.captured_inputs


def plan_text(
    passes: list[list[str]], shapes: dict, diag_output: bool, ranks: int, peak: int | None = None
) -> str:
    """One line describing a plan: layers, passes, the most accumulator memory a rank holds
    and, when given, the expected peak memory of a rank (`collection_peak`)."""
    held = held_bytes(passes, shapes, diag_output)
    text = (
        f"{len(shapes)} layers in {len(passes)} pass(es) over the calibration windows, at most "
        f"{_gib(held)} of Fisher accumulators per rank ({ranks} rank(s))"
    )
    return text if peak is None else f"{text}; expected peak about {_gib(peak)} per rank"


def resident_bytes() -> int:
    """This process's resident memory now (Linux `/proc`), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes there, KiB on Linux


def _gib(nbytes: int) -> str:
    """A size in the largest binary unit that keeps it >= 1 (for messages)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def parse_bytes(text: str) -> int:
    """`"12GiB"`, `"500MiB"`, `"2.5G"`, `"1000000"` -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(value[-1:], 1)
    try:
        number = float(value[:-1] if value[-1:] in units else value)
    except ValueError:
        number = -1
    if number <= 0:
        raise UsageError(f"memory budget {text!r}: use a size such as 24GiB or 500MiB")
    return int(number * scale)


def llama_shapes(hidden: int, intermediate: int, layers: int, kv_hidden: int | None = None):
    """[m, n] of every decoder linear of a LLaMA-shaped model."""
    kv = kv_hidden or hidden
    block = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (intermediate, hidden),
        (intermediate, hidden),
        (hidden, intermediate),
    ]
    return block * layers
