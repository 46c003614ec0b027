"""End-to-end distillation on a kept block fine-tuned checkpoint (how `Distillation`'s defaults
were chosen): learning rate, epochs, bf16 autocast.

    python benchmarks/distill_probe.py runs/quality/9b0c38811d1f9af2 1e-3 1 b3_lr1e-3 [bf16]

Arguments: the checkpoint (the 3-bit `+ block fine-tuning` row of benchmarks/quality.py, kept
under runs/quality/), lr, epochs, a tag, then optionally `bf16` for autocast, `windows=N` to
distill on N calibration windows instead of the 64 the checkpoint was calibrated on. The
teacher is SmolLM2-135M on the C4 calibration windows (N x 512, seed 0; cached in
/tmp/e2e/teacher[-N].pt), held-out: 4 C4 windows from documents the N windows do not read
(other windows for each N: compare the before -> after change); evaluation: WikiText-2,
first 16 windows of 2048, bf16. Prints and writes benchmarks/results/distill-probe/<tag>.json.
"""

import json
import sys
import time
from pathlib import Path

import torch

from rsavq.data import calibration_windows, evaluation_windows, heldout_windows, load_corpus
from rsavq.distill import Distillation, distill, teacher_targets
from rsavq.eval.perplexity import perplexity
from rsavq.models import load_model

ckpt, lr, epochs, tag = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
bf16 = "bf16" in sys.argv[5:]
named = dict(a.split("=") for a in sys.argv[5:] if "=" in a)
count = int(named.pop("windows", 64))
data = Path(__file__).resolve().parents[2] / "shared" / "data"
fp, tok = load_model("smollm2-135m")
c4 = load_corpus("c4", data)
win = calibration_windows(tok, c4, count, 512, 0)
held = heldout_windows(tok, c4, count, 512, 0, 4)  # (so other windows for each count)
cache = Path("/tmp/e2e/teacher.pt" if count == 64 else f"/tmp/e2e/teacher-{count}.pt")
if cache.exists():
    t, th = torch.load(cache)
else:
    t0 = time.time()
    t, th = teacher_targets(fp, win, 128), teacher_targets(fp, held, 128)
    print("teacher", time.time() - t0, flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((t, th), cache)
print("top-k mass", t["rest"].exp().mean().item(), flush=True)  # (the lumped tail's mean mass)
del fp
q, _ = load_model(ckpt)
options = Distillation(epochs=epochs, lr=lr, bf16=bf16)
rep = distill(q, win, t, options, heldout=(held, th), progress=False)
print(rep, flush=True)
ev = evaluation_windows(tok, load_corpus("wikitext2", data), 2048, 16)
q.to(torch.bfloat16)
ppl = perplexity(q, ev, "wikitext2", progress=False)
print(tag, "ppl", ppl.to_dict(), flush=True)
out = Path("benchmarks/results/distill-probe") / f"{tag}.json"
out.parent.mkdir(parents=True, exist_ok=True)
record = {"tag": tag, "lr": lr, "epochs": epochs, "bf16": bf16, "windows": count, **rep,
          "ppl": ppl.to_dict()}  # fmt: skip
out.write_text(json.dumps(record, indent=1))
