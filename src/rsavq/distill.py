"""End-to-end distillation (docs/method.md section 9): once every layer is quantized (and its
block fine-tuned), the continuous parameters of the whole quantized model are trained, codes
frozen, to match the FP model's next-token distributions on calibration text (by default 128
windows drawn like the calibration's at 3 bits, 256 at 2, none at 4:
`rsavq.config.default_windows`).

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
from rsavq.finetune import trainable
from rsavq.runtime import bf16_autocast

logger = logging.getLogger(__name__)

Snapshot = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, metadata


def is_default_count(count: int | None) -> bool:
    """Whether `count` is one of the default's distillation window counts (which give way to
    the calibration's own windows when those are as many, or the text is too short)."""
    return count in {default_windows(b).distillation for b in (2, 3)}


@dataclass(frozen=True)
class Distillation:
    """Options of end-to-end distillation."""

    epochs: int = 1
    lr: float = 1e-3  # SmolLM2-135M 3-bit: see BENCHMARKS.md (1e-4, 1e-3, 3e-3)
    micro_batch: int = 1  # sequences per optimizer step
    top_k: int = 128  # teacher probabilities kept per token (the rest lumped into one)
    seed: int = 0
    heldout: int = 4  # calibration-length windows from unseen documents, to watch over-fitting
    # bfloat16 autocast for the teacher's pass and the training steps: the same perplexity as
    # float32 at 1.8x the speed per step (BENCHMARKS.md, "Fine-tuning and distillation
    # settings"); float32 where bfloat16 products are slow (`runtime.fast_bf16`)
    bf16: bool = True
    save_every: int = 16  # optimizer steps between resumable snapshots
    # the held-out windows' KL is measured before training and this many times during it
    # (evenly spaced, the last at the end), for the report and the guard: the trained state is
    # kept when its held-out KL is below the one before training, else the model goes back.
    # No early stop: stopping after two scores without a 1% gain cost 3-bit SmolLM2-135M
    # perplexity (BENCHMARKS.md, Cost: the KL falls in steps)
    checks: int = 8
    # calibration windows to distill on: this many drawn like the calibration's (more text: 256
    # beat 64 at 3 bits, BENCHMARKS.md, Ablations; 128 by default: Cost), or None for those
    # the quantizer calibrates on; the default falls back to those when the corpus is too small
    windows: int | None = DISTILL_WINDOWS

    def __post_init__(self) -> None:
        ok = self.epochs >= 1 and self.lr > 0 and self.micro_batch >= 1 and self.top_k >= 1
        budget = self.windows is None or self.windows >= 1
        counts = min(self.heldout + 1, self.save_every, self.checks) >= 1
        if not ok or not budget or not counts:
            raise UsageError(
                "distillation needs epochs >= 1, lr > 0, micro_batch >= 1, top_k >= 1, "
                "heldout >= 0, save_every and checks >= 1, a "
                f"positive window count; got {self.epochs}, {self.lr}, "
                f"{self.micro_batch}, {self.top_k}, {self.heldout}, {self.save_every}, "
                f"{self.checks}, {self.windows}"
            )

    def to_dict(self) -> dict:
        """What the result depends on (not the held-out windows, how often they are scored nor
        how often it snapshots; options left at their off value are omitted, so older results
        keep their identity)."""
        skip = ("heldout", "save_every", "checks")
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        if not self.bf16:
            del data["bf16"]
        if self.windows is None:
            del data["windows"]
        return data

    def schedule(self, windows: int) -> list[list[int]]:
        """The windows of each optimizer step: seeded permutations, one per epoch, cut into
        micro-batches."""
        steps = self.epochs * math.ceil(windows / self.micro_batch)
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
    device = next(model.parameters()).device
    for ids in windows.split(batch):
        with bf16_autocast(device, bf16):
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
    teacher targets, never trained on) is scored before training and `options.checks` times
    during it; the trained state is kept when its last score is below the first, else the model
    goes back to the state before training (`kept` False). Returns the losses (mean training KL
    over the first and the last tenth of the steps), the held-out scores, steps, windows trained
    on, tokens, seconds and whether training changed the model."""
    schedule = options.schedule(len(windows))
    every = math.ceil(len(schedule) / options.checks)
    start_time = time.perf_counter()
    with trainable(model) as params, torch.enable_grad():
        optimizer = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.95))
        watch = _Watch(model, heldout, options, params, score_start=resume is None)
        losses = _restore(resume, params, optimizer, watch) if resume is not None else []
        bar = tqdm(total=len(schedule), initial=len(losses), desc="distill", unit="step",
                   disable=not progress)  # fmt: skip
        device = next(model.parameters()).device
        for step in range(len(losses), len(schedule)):
            rows = schedule[step]
            with bf16_autocast(device, options.bf16):
                logits = _logits(model, windows[rows])
                loss = sparse_kl(logits, _slice(teacher, rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if len(losses) % every == 0 or len(losses) == len(schedule):
                watch.score(len(losses))
            if save is not None and (
                len(losses) % options.save_every == 0 or len(losses) == len(schedule)
            ):
                save(_snapshot(params, optimizer, losses, watch))
        bar.close()
        kept = watch.finish()
    run = len(losses)
    tenth = max(1, run // 10)
    report = dict(
        loss_first=sum(losses[:tenth]) / tenth,
        loss_last=sum(losses[-tenth:]) / tenth,
        steps=run,
        windows=len(windows),
        tokens=sum(len(r) for r in schedule[:run]) * windows.shape[1],
        seconds=time.perf_counter() - start_time,
        kept=kept,
        **watch.report(kept),
    )
    if not kept:
        logger.warning("distillation did not lower the held-out KL: the model is kept as it was")
    logger.info("distilled: %s", report)
    return report


class _Watch:
    """The held-out scores of a distillation run and the state before it."""

    def __init__(self, model, heldout, options: Distillation, params, score_start: bool) -> None:
        self.model, self.heldout, self.options, self.params = model, heldout, options, params
        self.scores: list[tuple[int, float]] = []  # (step, held-out KL), step 0 first
        self.start: list[torch.Tensor] | None = None  # the parameters before training
        if heldout is not None and score_start:  # (a resumed run reads its scores instead)
            self.start = [p.detach().clone() for p in params]
            self.score(0)

    def score(self, step: int) -> None:
        if self.heldout is None:
            return
        device = next(self.model.parameters()).device
        with bf16_autocast(device, self.options.bf16):
            self.scores.append((step, mean_kl(self.model, *self.heldout)))

    def finish(self) -> bool:
        """Whether the trained state stays: its held-out KL is below the one before training
        (or nothing was scored); else the parameters go back to the state before training."""
        if not self.scores or self.scores[-1][1] < self.scores[0][1]:
            return True
        with torch.no_grad():
            for p, b in zip(self.params, self.start, strict=True):
                p.copy_(b)
        return False

    def report(self, kept: bool) -> dict:
        if not self.scores:
            return {}
        return {
            "heldout_before": self.scores[0][1],
            "heldout_after": self.scores[-1 if kept else 0][1],
            "heldout_scores": [list(s) for s in self.scores],
        }


def _snapshot(params, optimizer: torch.optim.Optimizer, losses, watch: _Watch) -> Snapshot:
    tensors = {f"param.{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, state in optimizer.state_dict()["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    if watch.scores:
        tensors["scores"] = torch.tensor(watch.scores, dtype=torch.float64)
        tensors |= {f"start.{i}": b for i, b in enumerate(watch.start)}
    return tensors, {"params": str(len(params))}


def _restore(snapshot: Snapshot, params, optimizer, watch: _Watch) -> list[float]:
    """Parameters, optimizer state and held-out scores from a snapshot; returns the losses so
    far."""
    tensors, meta = snapshot
    if int(meta["params"]) != len(params) or ("scores" in tensors) != (watch.heldout is not None):
        raise UsageError("the distillation snapshot does not match this run; start over")
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
    if "scores" in tensors:
        watch.scores = [(int(step), kl) for step, kl in tensors["scores"].tolist()]
        watch.start = [tensors[f"start.{i}"] for i in range(len(params))]
    return tensors["losses"].tolist()
