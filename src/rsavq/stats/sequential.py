"""Block-sequential calibration (as the GPTQ reference implementation does it).

The calibration windows run once up to the first decoder block, whose inputs (positional and
keyword arguments: attention mask, position embeddings, ...) are captured. Then, block by block,
the block's linears see those inputs (their input Hessians `X^T X` are accumulated), the caller
quantizes them, and the block, now quantized, is run again to make the next block's inputs. Only
one block's activations are held at a time, and every later block is calibrated on what the
quantized prefix really produces. Generic over HF decoders: the block list is found by
`modules.decoder_blocks`, and a block's output is its first element when it returns a tuple.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from rsavq.clock import timed
from rsavq.modules import decoder_blocks
from rsavq.nn import dequantized
from rsavq.stats.hessian import hessian_hooks, input_hessians
from rsavq.streaming import materialize

BATCH = 8  # calibration sequences per block call (block fine-tuning: its micro-batch)

Inputs = list[tuple[tuple, dict]]  # per batch: the block's positional and keyword arguments
Pairs = tuple[Inputs, list[torch.Tensor]]  # a block's inputs and the FP block's outputs on them


class _Captured(Exception):
    """Raised by a hook to cut a forward pass short (at the first block, or after a stage)."""


@torch.no_grad()
def capture_inputs(
    model: nn.Module, block: nn.Module, windows: torch.Tensor, batch: int = BATCH
) -> Inputs:
    """What `block` is called with on `windows` `[N, T]`, `batch` sequences at a time."""
    captured: Inputs = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in windows.split(batch):
            with contextlib.suppress(_Captured):
                model(ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states among a block's arguments."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(out) -> torch.Tensor:
    """A block's output hidden states (the first element when it returns a tuple)."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: Inputs) -> Inputs:
    """The next block's inputs: each batch's hidden states replaced by this block's output
    (quantized layers dequantized once for the pass: `rsavq.nn.dequantized`)."""
    with dequantized(block):
        return [_with_hidden(args, kwargs, block_output(block(*args, **kwargs)))
                for args, kwargs in inputs]  # fmt: skip


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def _stop_after(layer: nn.Module | None) -> Iterator[None]:
    """Cut each block call short once `layer` has run (its hooks registered before this one
    have seen its input); nothing when `layer` is None."""
    if layer is None:
        yield
        return

    def stop(_module, _args, _output):
        raise _Captured

    handle = layer.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def block_hessians(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: Inputs,
    until: nn.Module | None = None,
) -> dict:
    """`{name: H}` for `layers` (inside `block`) on the block's inputs; with `until`, each call
    of the block stops once that layer has run (the rest of the block is not needed)."""
    with hessian_hooks(layers) as finish:
        with _stop_after(until):
            for args, kwargs in inputs:
                with contextlib.suppress(_Captured):
                    block(*args, **kwargs)
        return finish()


@torch.no_grad()
def block_stages(block: nn.Module, layers: dict[str, nn.Module], inputs: Inputs) -> list[list[str]]:
    """`layers` in the order the block calls them, cut where the input changes: layers that read
    the same activations (q/k/v, gate/up) form one stage, each later stage reads what the earlier
    ones produce (GPTQ's `true-sequential`). Found generically from one call on the first batch;
    layers the call never reaches form a last stage."""
    calls: dict[str, torch.Tensor] = {}  # each layer's first input, in call order

    def hook(name):
        def fn(_module, args):
            calls.setdefault(name, args[0])

        return fn

    with contextlib.ExitStack() as stack:
        for name, layer in layers.items():
            stack.callback(layer.register_forward_pre_hook(hook(name)).remove)
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    stages: list[list[str]] = []
    previous = None
    for name, x in calls.items():
        if (
            previous is not None
            and x.data_ptr() == previous.data_ptr()
            and x.shape == previous.shape
        ):
            stages[-1].append(name)
        else:
            stages.append([name])
        previous = x
    missed = [n for n in layers if n not in calls]
    return stages + ([missed] if missed else [])


def _stage_hessians(
    block: nn.Module,
    mine: dict,
    done: Callable[[str], bool],
    inputs: Inputs,
    staged: bool,
    index: int,
) -> Iterator[dict[str, torch.Tensor | None]]:
    """A block's `{name: H}`: all at once, or (`staged`) stage by stage, each stage's Hessians
    taken after the caller has quantized the stages before it."""
    todo = {n: m for n, m in mine.items() if not done(n)}
    stages = block_stages(block, mine, inputs) if staged and todo else [list(mine)]
    for stage in stages:
        layers = {n: todo[n] for n in stage if n in todo}
        last = mine[stage[-1]] if staged else None
        with timed("hessians", index):
            hessians = block_hessians(block, layers, inputs, until=last) if layers else {}
        yield {n: hessians.get(n) for n in stage}


def _fp_outputs(
    block: nn.Module, streams: list[Inputs], layers: dict[str, nn.Module], index: int
) -> tuple[list[Inputs], dict[str, torch.Tensor]]:
    """The (FP) block's outputs on each of `streams`, and the input Hessians of `layers` from
    the first stream only (the calibration's: the held-out windows never enter a Hessian)."""
    with timed("hessians", index):
        with hessian_hooks(layers) as finish:
            first = run_block(block, streams[0])
            hessians = finish()
        return [first, *(run_block(block, x) for x in streams[1:])], hessians


def sequential_hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    windows: torch.Tensor,
    done: Callable[[str], bool] = lambda name: False,
    tune: Callable[[int, nn.Module, list[Pairs]], list[Inputs] | None] | None = None,
    heldout: torch.Tensor | None = None,
    true_sequential: bool = False,
    batch: int = BATCH,
) -> Iterator[dict[str, torch.Tensor | None]]:
    """Yield `{name: H}` block by block, in model order; the caller quantizes (and swaps in) those
    layers before asking for the next block. With `true_sequential` a block comes in stages
    (`block_stages`), each calibrated on what the block's already-quantized stages produce.
    Layers for which `done(name)` holds get `None` (the
    caller has them already); a block whose layers are all done is not calibrated. With `tune`,
    the FP block's outputs on its inputs are kept before the yield, and `tune(index, block,
    [(inputs, fp_outputs), ...])` runs on the quantized block before it makes the next block's
    inputs (or returns them, one list per stream); the list holds the calibration windows,
    then the `heldout` windows (which never enter a Hessian) when given.
    The block is called on `batch` sequences at a time, each batch with the arguments captured
    for it (an attention bias flattened with the heads, as ALiBi's, included), so fine-tuning
    takes each captured batch as one optimizer step.
    Layers outside the decoder blocks come last, from a pass over the whole (by then quantized)
    model."""
    blocks_name, blocks = decoder_blocks(model, layers)
    inside = {name for name in layers if blocks_name and name.startswith(blocks_name + ".")}
    if blocks:
        sets = [windows] + ([heldout] if tune is not None and heldout is not None else [])
        with timed("hessians", 0):
            streams = [capture_inputs(model, blocks[0], w, batch) for w in sets]
        for i, block in enumerate(blocks):
            materialize(block)  # a streamed block is read into memory now (rsavq.streaming)
            prefix = f"{blocks_name}.{i}."
            mine = {n: m for n, m in layers.items() if n.startswith(prefix)}
            # one FP pass gives the tuning's targets and, on the same inputs, the Hessians
            fused = tune is not None and not true_sequential
            if tune is not None:
                todo = {n: m for n, m in mine.items() if not done(n)} if fused else {}
                fp_next, hessians = _fp_outputs(block, streams, todo, i)
                targets = [[hidden_of(*b) for b in x] for x in fp_next]
            if fused:
                yield {n: hessians.get(n) for n in mine}
            else:
                yield from _stage_hessians(block, mine, done, streams[0], true_sequential, i)
            outputs = tune(i, block, list(zip(streams, targets, strict=True))) if tune else None
            if outputs is not None:
                streams = outputs
            elif i + 1 < len(blocks):
                with timed("hessians", i):  # the next block's inputs
                    streams = [run_block(block, x) for x in streams]
    rest = {n: m for n, m in layers.items() if n not in inside}
    if rest:
        todo = {n: m for n, m in rest.items() if not done(n)}
        with timed("hessians", len(blocks)):
            hessians = input_hessians(model, todo, windows, progress=False) if todo else {}
        yield {n: hessians.get(n) for n in rest}
