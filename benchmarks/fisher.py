"""Fisher collection on the real model: wall time, peak RSS, stats size, overhead ratio.

    python benchmarks/fisher.py --nsamples 128 --seqlen 512 --label "machine F"
    python benchmarks/fisher.py --table A.json B.json   # BENCHMARKS.md's table of these JSONs

Runs, in one process on the same calibration windows, interleaved window by window so that any
background load falls on both equally: (1) `rsavq` Fisher collection (hooks, accumulators),
(2) bare forward+backward passes with ordinary weight gradients, both with bfloat16 autocast as
`rsavq quantize` collects (or both in float32 with `--fp32`). The ratio (1)/(2) is the
collection overhead (target <= 1.25). The statistics are then written to a temporary directory
to measure their size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rsavq.clock import cpu_name
from rsavq.data import calibration_windows, load_corpus
from rsavq.io import atomic_write_json, rewrite_block
from rsavq.models import load_model
from rsavq.modules import find_linears
from rsavq.stats.artifact import build_manifest, save_stats
from rsavq.stats.collect import (
    CollectOptions,
    collect_fisher,
    make_accumulators,
    time_forward_backward,
)
from streaming import commit

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data-dir", default=os.environ.get("RSAVQ_DATA_DIR") or str(DEFAULT_DATA))
    parser.add_argument(
        "--fp32", action="store_true", help="float32 passes (default: bfloat16 autocast, both)"
    )
    parser.add_argument("--json", default="benchmarks/results/fisher.json")
    parser.add_argument("--label", default="", help="the machine, named in the table")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only rewrite the table")
    parser.add_argument("--markdown", default="BENCHMARKS.md")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(Path(path).read_text()) for path in args.table]
        rewrite_block(args.markdown, "fisher", table(rows))
        return

    model, tokenizer = load_model(args.model)
    corpus = load_corpus("c4", args.data_dir)
    windows = calibration_windows(tokenizer, corpus, args.nsamples, args.seqlen, seed=0)
    layers = find_linears(model)
    accumulators = make_accumulators(layers, False, "cpu")
    options = CollectOptions(progress=False, bf16=not args.fp32)
    collect_s = bare_s = 0.0
    for i in tqdm(range(args.nsamples), desc="collect vs bare", unit="seq"):
        start = time.perf_counter()
        collect_fisher(model, windows[: i + 1], layers, accumulators, options)  # window i only
        collect_s += time.perf_counter() - start
        bare_s += time_forward_backward(model, windows[i : i + 1], bf16=options.bf16)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(tempfile.mkdtemp(prefix="rsavq-fisher-bench-"))
    try:
        run = {"calibration": {"source": corpus.name}, "dtype": "torch.float32"}
        save_stats(out, build_manifest(model, args.model, run, accumulators), accumulators)
        size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    record = {
        "model": args.model,
        "source": corpus.name,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "layers": len(layers),
        "threads": torch.get_num_threads(),
        "passes": "float32" if args.fp32 else "bfloat16 autocast",
        "label": args.label,
        "cpu": cpu_name(),
        "commit": commit(),
        "collect_s": collect_s,
        "bare_fwd_bwd_s": bare_s,
        "ratio": collect_s / bare_s,
        "peak_rss_gib": peak_rss / 2**30,
        "stats_gib": size / 2**30,
    }
    atomic_write_json(args.json, record)
    print(json.dumps(record, indent=2))


def table(rows: list[dict]) -> str:
    lines = [
        "| passes | machine, commit | windows | collection | bare fwd+bwd | ratio (target <= 1.25)"
        " | peak RSS | stats on disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = r["collect_s"] / r["nsamples"]
        lines.append(
            f"| {r['passes']} | {r['label']}, {r['commit']} | {r['nsamples']} "
            f"| {r['collect_s']:.1f} s ({per:.2f} s/window) | {r['bare_fwd_bwd_s']:.1f} s "
            f"| **{r['ratio']:.2f}** | {r['peak_rss_gib']:.2f} GiB | {r['stats_gib']:.2f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
