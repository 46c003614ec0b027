"""Block-wise fine-tuning (docs/method.md section 8): once a decoder block's linears are
quantized, its continuous parameters are trained, codes frozen, so that the block's outputs match
the FP block's on the same calibration inputs (as AQLM does, with Adam, betas 0.9 / 0.95).

Trained: every `VQLinear`'s codebooks (fp32 copies of the fp16 ones) and a multiplicative
correction of its row scales, and the block's own floating parameters (norms, biases). The loss
is the mean squared error relative to the targets' mean square. The trained codebooks and scales
are rounded back to fp16 (what the checkpoint stores); the next block then sees this block's
tuned outputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rsavq.errors import UsageError
from rsavq.kernels.reference import take, unpack_block, weight_index
from rsavq.nn import VQLinear
from rsavq.runtime import bf16_autocast
from rsavq.stats.sequential import Inputs, Pairs, block_output, hidden_of, run_block

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockTuning:
    """Options of block-wise fine-tuning."""

    # SmolLM2-135M 2-bit block 3, 2 epochs: relative MSE 0.0095 -> 0.0090 (lr 1e-4), 0.0083
    # (1e-3), 0.0081 (3e-3 and 1e-2): `benchmarks/finetune_lr.py`
    epochs: int = 2
    lr: float = 3e-3
    # sequences per optimizer step: the block-sequential pass captures each block's inputs
    # in batches of this size, and each captured batch is one step
    micro_batch: int = 2
    seed: int = 0
    heldout: int = 4  # calibration-length windows from unseen documents, to watch over-fitting
    # bfloat16 autocast for the training steps (losses measured as the model): faster steps on
    # CPUs with AMX or AVX-512 BF16 and on GPUs (BENCHMARKS.md, Cost); float32 where bfloat16
    # products are slow (`runtime.fast_bf16`: AVX2-only CPUs)
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.micro_batch < 1 or self.heldout < 0:
            raise UsageError(
                "block fine-tuning needs epochs >= 1, lr > 0, micro_batch >= 1 and heldout >= 0;"
                f" got {self.epochs}, {self.lr}, {self.micro_batch}, {self.heldout}"
            )

    def to_dict(self) -> dict:
        """What the result depends on (the held-out windows only measure it; `bf16` appears
        only when off, so runs from before it existed keep their identity)."""
        data = {k: v for k, v in asdict(self).items() if k != "heldout"}
        if not self.bf16:
            del data["bf16"]
        return data


@contextlib.contextmanager
def trainable(block: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Make `block` differentiable in its continuous parameters for the duration: each
    `VQLinear` computes `x (s * r * decode(codes, C))^T + b` with fp32 codebooks `C` and scale
    correction `r` as parameters (the codes frozen: each weight's position in `C` is computed
    once, `weight_index`); the block's norms and biases (1-D parameters; a layer left
    unquantized keeps its weight) train as they are. On exit the codebooks and scales are
    written back in fp16, and the block is restored."""
    params: list[nn.Parameter] = []
    layers = [m for m in block.modules() if isinstance(m, VQLinear)]
    finishers = [_make_trainable(layer, params) for layer in layers]
    own = [p for p in block.parameters() if p.is_floating_point() and p.dim() == 1]  # norms, biases
    flags = [p.requires_grad for p in own]
    for p in own:
        p.requires_grad_(True)
    params += own
    try:
        yield params
    finally:
        for finish in finishers:
            finish()
        for p, flag in zip(own, flags, strict=True):
            p.requires_grad_(flag)


def _make_trainable(layer: VQLinear, params: list[nn.Parameter]):
    spec = layer.spec
    idx = [unpack_block(c, spec, g) for g, c in enumerate(layer.codes)]
    index = weight_index(idx, layer.perm, spec)
    books = [nn.Parameter(cb.detach().float().clone()) for cb in layer.codebooks]
    params += books
    base = layer.scales.detach().float() if layer.scales is not None else None
    correction = nn.Parameter(torch.ones_like(base)) if base is not None else None
    params += [correction] if correction is not None else []

    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)  # the weight decoded straight into it: no cast of a copy
        W = take(torch.cat([b.reshape(-1) for b in books]), index, dtype)
        if base is not None:
            W = W * (base * correction).to(dtype)[:, None]
        return F.linear(x, W, layer.bias)

    layer.forward = forward

    def finish() -> None:
        del layer.forward  # the class's kernel dispatch again
        with torch.no_grad():
            for g, book in enumerate(books):
                layer.set_codebook(g, book)
            if base is not None:
                layer.scales.copy_((base * correction).half())

    return finish


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer's product runs in: autocast's when it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out, target = out.float(), target.float()
    return F.mse_loss(out, target) / target.square().mean().clamp_min(1e-30)


SCORED_EVERY = 8  # the loss before training is measured on every 8th batch (and after on them)


def tune_block(
    block: nn.Module,
    inputs: Inputs,
    targets: list[torch.Tensor],
    options: BlockTuning,
    index: int,
    heldout: Pairs | None = None,
    outputs: list[Inputs] | None = None,
) -> dict[str, float]:
    """Train `block` (quantized) towards `targets` (the FP block's outputs on `inputs`), one
    optimizer step per batch of `inputs` (captured in batches of `options.micro_batch`); returns
    the relative MSE before and after on every `SCORED_EVERY`-th batch (and on the `heldout`
    inputs and targets, never trained on, when given) and the seconds it took. Deterministic
    for `options.seed` and `index`. The block keeps the trained state only when it lowered
    that loss. A list `outputs` receives the block's outputs on `inputs` (then on the held-out
    inputs) as the next block's inputs: the pass that scores the result makes them."""
    start = time.perf_counter()
    sample = slice(None, None, SCORED_EVERY)
    pairs = [(inputs, targets)] + ([heldout] if heldout is not None else [])
    before = [_score(block, inputs[sample], targets[sample])[1]]
    before += [_score(block, *heldout)[1]] if heldout is not None else []
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    _train(block, inputs, targets, options, index)
    scored = [_score(block, *pair) for pair in pairs]
    if not _mean(scored[0][1][sample]) < _mean(before[0]):
        block.load_state_dict(saved)
        scored = [_score(block, *pair) for pair in pairs]
    if outputs is not None:
        outputs[:] = [out for out, _ in scored]
    losses = {"before": _mean(before[0]), "after": _mean(scored[0][1][sample])}
    if heldout is not None:
        losses |= {"heldout_before": _mean(before[1]), "heldout_after": _mean(scored[1][1])}
    logger.info(
        "block %d fine-tuned: relative MSE %.4g -> %.4g", index, losses["before"], losses["after"]
    )
    return {**losses, "seconds": time.perf_counter() - start}


def _score(block: nn.Module, inputs: Inputs, targets: list[torch.Tensor]):
    """The block's outputs on `inputs` (as the next block's inputs) and each batch's relative
    squared error to its target."""
    out = run_block(block, inputs)
    return out, [_relative_mse(hidden_of(*b), t).item() for b, t in zip(out, targets, strict=True)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _train(block, inputs: Inputs, targets: list[torch.Tensor], options: BlockTuning, index: int):
    """`options.epochs` seeded passes of Adam over the batches, in random order."""
    generator = torch.Generator().manual_seed(options.seed * 100003 + index)
    with trainable(block) as params, torch.enable_grad():
        optimizer = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.95))
        for _ in range(options.epochs):
            for j in torch.randperm(len(inputs), generator=generator).tolist():
                (args, kwargs), target = inputs[j], targets[j]
                with bf16_autocast(target.device, options.bf16):
                    loss = _relative_mse(block_output(block(*args, **kwargs)), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def _is_codebook(name: str) -> bool:
    """Codebooks and their int8 scales (`codebooks_{g}`, `codebook_scales_{g}`)."""
    return name.rsplit(".", 1)[-1].startswith("codebook")


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what `trainable(module)` changes: codebooks, and every 1-D floating tensor
    (row scales, norms, biases)."""
    return {
        k: t.detach().clone()
        for k, t in module.state_dict().items()
        if _is_codebook(k) or t.is_floating_point() and t.dim() == 1
    }


def tuned_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """What tuning changes in `block`: its floating tensors (codebooks, scales, norms, biases)."""
    return {
        k: t.detach().clone()
        for k, t in block.state_dict().items()
        if t.is_floating_point() or _is_codebook(k)
    }
