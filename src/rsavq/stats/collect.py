"""Collect Fisher statistics from per-sequence backward passes, with hooks.

One backward pass serves every hooked layer: a forward hook keeps the layer's input `x` `[B, T, n]`
and registers a hook on its output; when the output gradient `gy` `[B, T, m]` arrives, the
per-sequence weight gradients `G_s = gy_s^T x_s` `[B, m, n]` are formed, added to the layer's
accumulator and freed. Weights never get `.grad`; only activations require gradients.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from rsavq.modules import decoder_blocks, weight_shape
from rsavq.runtime import bf16_autocast
from rsavq.stats.accumulator import FisherAccumulator
from rsavq.streaming import is_streamed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectOptions:
    batch_size: int = 1  # sequences per backward pass (per-sample gradients stay exact)
    diag_output: bool = False  # keep only diag(F_O): memory mode for very wide layers
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # samples between on-disk checkpoints (0: never)
    progress: bool = True
    # bfloat16 autocast for the forward and backward passes and the per-sequence gradients
    # `G_s`: 1.3x faster on CPUs with AMX, and on GPUs (BENCHMARKS.md, Cost); float32 where
    # bfloat16 products are slow (`runtime.fast_bf16`: AVX2-only CPUs). Their Gram products
    # run on bfloat16 units with float32 sums and outputs (exact for these inputs);
    # products rounded to bfloat16 lose the factors' positive definiteness on few samples
    bf16: bool = True
    memory_budget: int | None = None  # bytes of accumulators per rank: more passes if needed


def make_accumulators(layers: dict[str, nn.Linear], diag_output: bool, device):
    return {
        name: FisherAccumulator(*weight_shape(layer), diag_output, device)
        for name, layer in layers.items()
    }


def collect_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    layers: dict[str, nn.Linear],
    accumulators: dict[str, FisherAccumulator],
    options: CollectOptions = CollectOptions(),
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, FisherAccumulator]:
    """Add the statistics of `windows` `[N, T]` (from the accumulators' count on) to them.

    Sequences already counted are skipped, so a run restored from a checkpoint resumes.
    """
    done = next(iter(accumulators.values())).count if accumulators else 0
    device = next(model.parameters()).device
    bar = tqdm(
        total=len(windows), initial=done, desc="fisher", unit="seq", disable=not options.progress
    )
    batch_size = [options.batch_size]  # what 2-D activations `[B * T, n]` are cut back into
    hooks = _hooks(layers, accumulators, batch_size)
    checkpointing = options.gradient_checkpointing or is_streamed(model)
    if checkpointing and not options.gradient_checkpointing:
        logger.info("streamed weights: activation checkpointing on (one block's weights held)")
    blocks = decoder_blocks(model, layers)[1] if checkpointing else None
    with _collection_mode(model, blocks), hooks:
        for first in range(done, len(windows), options.batch_size):
            batch = windows[first : first + options.batch_size].to(device)
            batch_size[0] = len(batch)
            with bf16_autocast(device, options.bf16):
                loss = sequence_loss(model, batch)
            loss.backward()
            bar.update(len(batch))
            seen = first + len(batch)
            every = options.checkpoint_every
            if on_checkpoint and every and seen < len(windows) and seen // every > first // every:
                on_checkpoint(seen)
    bar.close()
    return accumulators


def sequence_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each sequence's mean next-token NLL (so gradients are per sequence)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # [B, T-1, vocab]
    nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll.mean(dim=1).sum()


@contextlib.contextmanager
def _collection_mode(model: nn.Module, blocks: nn.ModuleList | None) -> Iterator[None]:
    """Freeze weights, make the embedding output require grad, checkpoint `blocks` if given."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    try:
        with _checkpointed(blocks) if blocks is not None else contextlib.nullcontext():
            yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _checkpointed(blocks: nn.ModuleList) -> Iterator[None]:
    """Run each block under activation checkpointing (non-reentrant: recomputed in the backward
    pass), the model's mode unchanged: transformers' own switch needs training mode, which turns
    on the dropout of models that have it (GPT-2, OPT) and would change the statistics."""
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate's hooks live here
    for block in blocks:
        block.forward = functools.partial(_checkpoint, block.forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _checkpoint(forward, *args, **kwargs):
    # no early stop: a recomputation cut short after the last saved tensor skips the forward
    # hooks after it, and a streamed layer's hook then never drops the weights it read
    return checkpoint(forward, *args, use_reentrant=False, early_stop=False, **kwargs)


@contextlib.contextmanager
def _hooks(layers: dict[str, nn.Module], accumulators: dict, batch_size: list[int]):
    handles = [
        layer.register_forward_hook(_capture(accumulators[name], batch_size))
        for name, layer in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _capture(accumulator: FisherAccumulator, batch_size: list[int]):
    def forward_hook(module, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = _per_sequence(inputs[0].detach(), batch_size[0])  # [B, T, n]

        def on_grad(gy: torch.Tensor) -> None:  # gy: [B, T, m] (or [B * T, m])
            gy = _per_sequence(gy, batch_size[0])
            # [B, m, n]: in bfloat16 when the pass ran in it (fp32 sums inside the product);
            # the accumulator sums it in float32, so the factors stay PSD
            dtype = torch.bfloat16 if gy.dtype == torch.bfloat16 else torch.float32
            accumulator.add(torch.bmm(gy.transpose(1, 2).to(dtype), x.to(dtype)))

        output.register_hook(on_grad)

    return forward_hook


def _per_sequence(t: torch.Tensor, batch: int) -> torch.Tensor:
    """`[B, T, n]` as is; `[B * T, n]` (MLPs that run on flattened tokens) back to `[B, T, n]`."""
    return t if t.dim() == 3 else t.reshape(batch, -1, t.shape[-1])


def time_forward_backward(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, bf16: bool = False
) -> float:
    """Seconds for plain forward+backward passes (weight gradients on; bfloat16 autocast with
    `bf16`) over `windows`: the baseline that collection overhead is measured against."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    for first in range(0, len(windows), batch_size):
        with bf16_autocast(device, bf16):
            loss = sequence_loss(model, windows[first : first + batch_size].to(device))
        loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start
