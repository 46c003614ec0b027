"""Memory needed to collect Fisher statistics, computed from layer shapes."""

from __future__ import annotations

from dataclasses import dataclass

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
    acc = sum((m if diag_output else m * m) + n * n + m * n for m, n in shapes) * FP32
    inputs = sum(batch * seqlen * n for _, n in shapes) * activation_bytes
    largest = max(batch * m * n for m, n in shapes) * FP32
    return FisherMemory(acc, inputs, largest)


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
