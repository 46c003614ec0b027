"""Perplexity over non-overlapping windows, as GPTQ/VPTQ/QuIP# measure it.

PPL = exp(mean next-token NLL over every predicted token of every window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    dataset: str
    seqlen: int
    windows: int
    tokens: int  # tokens fed to the model (windows x seqlen)
    nll: float  # mean NLL per predicted token, nats
    ppl: float
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@torch.no_grad()
def window_nll_sum(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLLs of a batch of windows `[B, L]`, in float64."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, vocab]
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return nll.double()


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    dataset: str = "",
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `windows` `[N, seqlen]` (token ids)."""
    device = next(model.parameters()).device
    count, seqlen = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    bar = tqdm(total=count, desc=f"ppl {dataset}".strip(), unit="win", disable=not progress)
    for first in range(0, count, batch_size):
        batch = windows[first : first + batch_size].to(device)
        total += window_nll_sum(model, batch).cpu()
        bar.update(batch.shape[0])
        seen = first + batch.shape[0]
        bar.set_postfix(ppl=f"{math.exp(total.item() / (seen * (seqlen - 1))):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    nll = total.item() / (count * (seqlen - 1))
    return PerplexityResult(dataset, seqlen, count, count * seqlen, nll, math.exp(nll), seconds)
