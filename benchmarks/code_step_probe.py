"""One discrete step on the codes (`Distillation.code_every`), predicted against measured: why
code training raised the KL of SmolLM2-135M at 3 bits (BENCHMARKS.md, Quality II).

    python benchmarks/code_step_probe.py runs/quality/9b0c38811d1f9af2 [windows=16]

From a kept 3-bit checkpoint (runs/quality/ of benchmarks/quality.py; BENCHMARKS.md says which
model the published run started from), the gradient of the KL to the FP model and
the sampled-label Fisher are summed over the first N calibration windows (C4, 512 tokens, seed
0, as `distill` accumulates them between code steps; codebooks not stepped), then one code step
is taken per variant (fraction of the codes moved, or codes per group, `code_lr`, the Fisher
rank-one smoothed or raw) and undone. For each: the change of the loss the quadratic model
predicts (the curvature the step used, and the Fisher itself), and the measured change of the
KL on the same N windows and on 4 held-out windows. Teacher targets are cached in
/tmp/e2e/teacher.pt (shared with benchmarks/distill_probe.py). Writes
benchmarks/results/code-step-probe.json.
"""

import json
import sys
from pathlib import Path

import torch

from rsavq.algorithms.codes import code_step
from rsavq.data import calibration_windows, heldout_windows, load_corpus
from rsavq.distill import (
    _factored,
    _fisher_pass,
    _logits,
    _slice,
    mean_kl,
    sparse_kl,
    teacher_targets,
)
from rsavq.finetune import trainable
from rsavq.kernels.reference import decode_vectors
from rsavq.models import load_model

VARIANTS = [  # (fraction, code_lr, smoothed); a fraction >= 1 is that many codes per group
    (1, 0.1, True),
    (3, 0.1, True),
    (1e-4, 0.1, True),
    (1e-3, 0.1, True),
    (1e-2, 0.1, True),  # the default
    (1e-3, 0.1, False),
    (1e-3, 1.0, True),
]


def teacher(tok, c4):
    cache = Path("/tmp/e2e/teacher.pt")
    win = calibration_windows(tok, c4, 64, 512, 0)
    held = heldout_windows(tok, c4, 64, 512, 0, 4)
    if cache.exists():
        return win, held, *torch.load(cache)
    fp, _ = load_model("smollm2-135m")
    t, th = teacher_targets(fp, win, 128), teacher_targets(fp, held, 128)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((t, th), cache)
    return win, held, t, th


def accumulate(model, groups, win, t) -> None:
    for i in range(len(win)):
        with torch.autocast("cpu", torch.bfloat16):
            logits = _logits(model, win[i : i + 1])
            loss = sparse_kl(logits, _slice(t, [i]))
        _fisher_pass(groups, logits, i)
        loss.backward()


def step(groups, fraction, code_lr, smoothed, tokens) -> dict:
    predicted = predicted_fisher = linear_total = 0.0
    moved = 0
    for group in groups:
        mean = group.grad_sum / group.count
        raw = group.fisher_sum / group.fisher_count * tokens
        fisher = _factored(raw) if smoothed else raw
        books = group.books.detach()
        before = decode_vectors(group.idx, books)
        share = fraction / group.idx.numel() if fraction >= 1 else fraction
        moved += code_step(group.idx, books, mean, fisher / code_lr, share)
        D = decode_vectors(group.idx, books) - before
        linear = (mean * D).sum().item()
        linear_total += linear
        predicted += linear + 0.5 * (fisher / code_lr * D.square()).sum().item()
        predicted_fisher += linear + 0.5 * (raw * D.square()).sum().item()
    return {
        "moved": moved,
        "predicted": predicted,
        "predicted_raw_fisher": predicted_fisher,
        "predicted_linear": linear_total,
    }


def main() -> None:
    ckpt = sys.argv[1]
    named = dict(a.split("=") for a in sys.argv[2:])
    n = int(named.get("windows", 16))
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    _, tok = load_model("smollm2-135m")
    win, held, t, th = teacher(tok, load_corpus("c4", data))
    win, t = win[:n], _slice(t, list(range(n)))
    q, _ = load_model(ckpt)
    groups = []
    rows = []
    with trainable(q, groups), torch.enable_grad():
        accumulate(q, groups, win, t)
        base = {"train": mean_kl(q, win, t), "heldout": mean_kl(q, held, th)}
        print("before", base, flush=True)
        for fraction, code_lr, smoothed in VARIANTS:
            saved = [g.idx.clone() for g in groups]
            row = step(groups, fraction, code_lr, smoothed, win.shape[1])
            row |= {"fraction": fraction, "code_lr": code_lr, "smoothed": smoothed}
            row["train_change"] = mean_kl(q, win, t) - base["train"]
            row["heldout_change"] = mean_kl(q, held, th) - base["heldout"]
            print(row, flush=True)
            rows.append(row)
            for g, idx in zip(groups, saved, strict=True):
                g.idx.copy_(idx)
        codes = sum(g.idx.numel() for g in groups)
    out = Path("benchmarks/results/code-step-probe.json")
    result = {"windows": n, "codes": codes, "before": base, "rows": rows}
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
