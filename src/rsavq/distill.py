"""End-to-end distillation (docs/method.md section 9): once every layer is quantized (and its
block fine-tuned), the continuous parameters of the whole quantized model are trained, codes
frozen, to match the FP model's next-token distributions on calibration text (by default 128
windows drawn like the calibration's, 256 below 2.5 bits: `rsavq.config.default_windows`).

The teacher is the FP model itself, run once before quantization: for every calibration token
its `top_k` most likely next tokens, their log-probabilities and the log of the remaining mass
are kept (`teacher_targets`; 1 MB per 1000 tokens at k = 128, whatever the vocabulary). The
loss is the KL divergence from that (k + 1)-way distribution to the student's, which is the full
KL with the tail lumped into one outcome (`sparse_kl`). Trained: the same parameters as block
fine-tuning (`rsavq.finetune.trainable`: fp32 codebooks, row-scale corrections, norms, biases),
with Adam; the snapshot every `save_every` steps (parameters, optimizer state, losses) makes a
killed run resume at its last snapshot with the same result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rsavq.config import DISTILL_WINDOWS, default_windows
from rsavq.errors import UsageError
from rsavq.finetune import trainable, trained_state

logger = logging.getLogger(__name__)

Snapshot = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, metadata


def is_default_count(count: int | None) -> bool:
    """Whether `count` is one of the default's distillation window counts (which give way to
    the calibration's own windows when those are as many, or the text is too short)."""
    return count in (default_windows(2)[1], default_windows(3)[1])


@dataclass(frozen=True)
class Distillation:
    """Options of end-to-end distillation."""

    epochs: int = 1
    lr: float = 1e-3  # SmolLM2-135M 3-bit: see BENCHMARKS.md (1e-4, 1e-3, 3e-3)
    tokens: int | None = None  # token budget: stop after this many (default: `epochs` epochs)
    micro_batch: int = 1  # sequences per optimizer step
    top_k: int = 128  # teacher probabilities kept per token (the rest lumped into one)
    seed: int = 0
    heldout: int = 4  # calibration-length windows from unseen documents, to watch over-fitting
    # bfloat16 autocast for the teacher's pass and the training steps: the same perplexity as
    # float32 at 1.8x the speed per step (BENCHMARKS.md, Quality II part 2)
    bf16: bool = True
    save_every: int = 16  # optimizer steps between resumable snapshots
    # calibration windows to distill on: this many drawn like the calibration's (more text: 256
    # beat 64 at 3 bits, BENCHMARKS.md Quality II; 128 by default: Cost), or None for those
    # the quantizer calibrates on; the default falls back to those when the corpus is too small
    windows: int | None = DISTILL_WINDOWS

    def __post_init__(self) -> None:
        ok = self.epochs >= 1 and self.lr > 0 and self.micro_batch >= 1 and self.top_k >= 1
        budget = self.tokens is None or self.tokens >= 1
        budget = budget and (self.windows is None or self.windows >= 1)
        if not ok or not budget or self.heldout < 0 or self.save_every < 1:
            raise UsageError(
                "distillation needs epochs >= 1, lr > 0, micro_batch >= 1, top_k >= 1, "
                "heldout >= 0, save_every >= 1, a positive token budget and window count; got "
                f"{self.epochs}, {self.lr}, {self.micro_batch}, {self.top_k}, {self.heldout}, "
                f"{self.save_every}, {self.tokens}, {self.windows}"
            )

    def to_dict(self) -> dict:
        """What the result depends on (not the held-out windows nor how often it snapshots;
        options left at their off value are omitted, so older results keep their identity)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("heldout", "save_every")}
        if not self.bf16:
            del data["bf16"]
        if self.tokens is None:
            del data["tokens"]
        if self.windows is None:
            del data["windows"]
        return data

    def schedule(self, windows: int, seqlen: int) -> list[list[int]]:
        """The windows of each optimizer step: seeded permutations, one per epoch, cut into
        micro-batches; truncated (or extended with more epochs) to the token budget."""
        per_step = self.micro_batch * seqlen
        steps = (
            math.ceil(self.tokens / per_step)
            if self.tokens
            else self.epochs * math.ceil(windows / self.micro_batch)
        )
        generator = torch.Generator().manual_seed(self.seed)
        out: list[list[int]] = []
        while len(out) < steps:
            order = torch.randperm(windows, generator=generator).tolist()
            out += [order[s : s + self.micro_batch] for s in range(0, windows, self.micro_batch)]
        return out[:steps]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits.float()


@torch.no_grad()
def teacher_targets(
    model: nn.Module, windows: torch.Tensor, top_k: int, batch: int = 2, bf16: bool = False
) -> dict[str, torch.Tensor]:
    """The FP model's next-token distributions on `windows` `[N, T]`, kept compact: `logp`
    `[N, T, k]` (the k largest log-probabilities), `index` (their token ids, int32) and `rest`
    `[N, T]` (log of the remaining mass); with `bf16`, from a bfloat16-autocast pass (the
    log-softmax in float32)."""
    parts = []
    device_type = next(model.parameters()).device.type
    for ids in windows.split(batch):
        with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
            logits = _logits(model, ids)
        logp = logits.log_softmax(-1)
        k = min(top_k, logp.shape[-1])
        top = logp.topk(k, dim=-1)
        rest = _log1mexp(top.values.logsumexp(-1))
        parts.append((top.values.cpu(), top.indices.int().cpu(), rest.cpu()))
    logp, index, rest = (torch.cat(p) for p in zip(*parts, strict=True))
    return {"logp": logp, "index": index, "rest": rest}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, with the lumped mass kept >= 1e-6 (a tail rounded to 0 by
    float arithmetic would make the loss 0 * -inf)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def sparse_kl(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) over the teacher's top k tokens plus the rest
    lumped into one outcome; `logits` `[B, T, V]`, `teacher` the matching slice of
    `teacher_targets`. Equals the full KL when k is the vocabulary size."""
    logq = logits.float().log_softmax(-1)
    logp = teacher["logp"].to(logq.device).float()
    q_top = logq.gather(-1, teacher["index"].to(logq.device).long())
    p_rest = teacher["rest"].to(logq.device).float()
    q_rest = _log1mexp(q_top.logsumexp(-1))
    kl = (logp.exp() * (logp - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.mean()


def _slice(teacher: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in teacher.items()}


@torch.no_grad()
def mean_kl(model: nn.Module, windows: torch.Tensor, teacher: dict[str, torch.Tensor]) -> float:
    """`sparse_kl` of `model` on all `windows`, one window at a time."""
    losses = []
    for i in range(len(windows)):
        losses.append(sparse_kl(_logits(model, windows[i : i + 1]), _slice(teacher, [i])))
    return float(torch.stack(losses).mean())


def distill(
    model: nn.Module,
    windows: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    options: Distillation,
    resume: Snapshot | None = None,
    save: Callable[[Snapshot], None] | None = None,
    heldout: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict:
    """Train the quantized `model` towards `teacher` (from `teacher_targets` on `windows`).

    `resume` is a snapshot from an earlier, interrupted call with the same arguments: training
    continues from it, ending exactly where an uninterrupted run would. `save` receives a
    snapshot every `options.save_every` steps and at the end. `heldout` (windows and their
    teacher targets, never trained on) is scored before and after; when training did not lower
    it, the model is put back as it was (`kept` False in the report). Returns the losses (mean
    training KL over the first and the last tenth of the steps, held-out KL before and after),
    steps, windows trained on, tokens, seconds and whether the result was kept."""
    schedule = options.schedule(len(windows), windows.shape[1])
    report: dict = {}
    start = trained_state(model)
    if heldout is not None:
        report["heldout_before"] = mean_kl(model, *heldout)
    start_time = time.perf_counter()
    with trainable(model) as params, torch.enable_grad():
        optimizer = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.95))
        losses = _restore(resume, params, optimizer) if resume is not None else []
        bar = tqdm(total=len(schedule), initial=len(losses), desc="distill", unit="step",
                   disable=not progress)  # fmt: skip
        device_type = next(model.parameters()).device.type
        for step in range(len(losses), len(schedule)):
            rows = schedule[step]
            with torch.autocast(device_type, torch.bfloat16, enabled=options.bf16):
                logits = _logits(model, windows[rows])
                loss = sparse_kl(logits, _slice(teacher, rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            due = len(losses) % options.save_every == 0 or len(losses) == len(schedule)
            if save is not None and due:
                save(_snapshot(params, optimizer, losses))
        bar.close()
    tenth = max(1, len(schedule) // 10)
    report.update(
        loss_first=sum(losses[:tenth]) / tenth,
        loss_last=sum(losses[-tenth:]) / tenth,
        steps=len(schedule),
        windows=len(windows),
        tokens=sum(len(r) for r in schedule) * windows.shape[1],
        seconds=time.perf_counter() - start_time,
    )
    report["kept"] = True
    if heldout is not None:
        report["heldout_after"] = mean_kl(model, *heldout)
        if not report["heldout_after"] < report["heldout_before"]:
            model.load_state_dict(start, strict=False)
            report["kept"] = False
            logger.warning("distillation raised the held-out KL: the model is kept as it was")
    logger.info("distilled: %s", report)
    return report


def _snapshot(params, optimizer: torch.optim.Optimizer, losses) -> Snapshot:
    tensors = {f"param.{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, state in optimizer.state_dict()["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    return tensors, {"params": str(len(params))}


def _restore(snapshot: Snapshot, params, optimizer) -> list[float]:
    """Parameters and optimizer state from a snapshot; returns the losses so far."""
    tensors, meta = snapshot
    if int(meta["params"]) != len(params):
        raise UsageError("the distillation snapshot does not match this model; start over")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, i, name = key.split(".")
            state.setdefault(int(i), {})[name] = value
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return tensors["losses"].tolist()
