"""Cost of the full default: `rsavq quantize` from a cold cache, stage by stage, per width.

    python benchmarks/cost.py --bits 3,2,4 --json benchmarks/results/cost.json
    python benchmarks/cost.py --table benchmarks/results/cost.json   # the BENCHMARKS.md table
    python benchmarks/cost.py --summary benchmarks/results/cost.json # README's results table

Each width runs `rsavq quantize --model smollm2-135m --bits B` with nothing but its defaults
(Fisher statistics into a fresh directory, so they are collected, not reused; embeddings and
norms saved in bfloat16 as `make demo` does), in a process of its own with the threads given
(default: all cores; time on a quiet machine). The stage clock comes from the checkpoint's
report.json. Then `rsavq eval` gives the fast-protocol quality (WikiText-2, first 16 windows of
2048 tokens, bfloat16; float32 on CPUs whose bfloat16 products are slow). Resumable: a width
already in the JSON is skipped; `--extra` passes more options to `rsavq quantize` and `--label`
names the row (both join its key). The code
measured is the one `python -m rsavq.cli` imports: `PYTHONPATH=<an older checkout>/src` times
that commit's code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsavq.config import default_windows
from rsavq.io import rewrite_block
from rsavq.runtime import fast_bf16

STAGES = (
    "load", "fisher", "teacher", "hessians", "quantize", "refit", "finetune", "distill", "save",
)  # fmt: skip


def run_width(bits: int, threads: int, extra: list[str], windows: int, keep: Path | None) -> dict:
    """One cold-cache run of the full default at `bits`: its stage clock and quality."""
    with tempfile.TemporaryDirectory(prefix="rsavq-cost-") as tmp:
        out = (keep or Path(tmp)) / f"q{bits}"
        command = [
            sys.executable, "-m", "rsavq.cli", "quantize", "--model", "smollm2-135m",
            "--bits", str(bits), "--stats", str(Path(tmp) / "stats"), "--out", str(out),
            "--save-dtype", "bfloat16", "--threads", str(threads), *extra,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        result = Path(tmp) / "eval.json"
        dtype = "bfloat16" if fast_bf16(torch.device("cpu")) else "float32"  # (AVX2: float32)
        subprocess.run(
            [
                sys.executable, "-m", "rsavq.cli", "eval", "--model", str(out), "--ppl",
                "wikitext2", "--limit", str(windows), "--dtype", dtype, "--json",
                str(result),
            ],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )  # fmt: skip
        [ppl] = json.loads(result.read_text())["perplexity"]
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "bits": bits,
        "command": shlex.join(["rsavq", *command[3:]]),
        "wall_seconds": wall,
        "clock": report["clock"],
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "layers": len(report["layers"]),
        "windows": {
            "fisher": report.get("calibration", {}).get("fisher_windows"),
            "calibration": report.get("calibration", {}).get("windows")
            or _option(extra, "--nsamples", default_windows(bits).calibration),
            "distill": (report.get("distill") or {}).get("windows"),
            "block_epochs": _option(extra, "--finetune-epochs", default_windows(bits).block_epochs),
        },
        "checkpoint_mib": size / 2**20,
        "ppl": {
            "source": "wikitext2",
            "windows": ppl["windows"],
            "dtype": dtype,
            "value": ppl["ppl"],
        },  # fmt: skip
    }


def _ppl(ppl: dict | None) -> str:
    """The fast protocol's figure; marked when it ran in float32 (CPUs without fast bfloat16)."""
    if not ppl:
        return "-"
    return f"{ppl['value']:.2f}" + ("" if ppl.get("dtype", "bfloat16") == "bfloat16" else " (fp32)")


def table(results: dict) -> str:
    """One row per run: minutes per stage, the total, peak RSS, and the fast-protocol PPL."""
    head = ["bits", "run", *STAGES, "total min", "peak RSS GiB", "PPL (16 win. bf16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["runs"].values():
        stages = row["clock"]["stages"]
        cells = [str(row["bits"]), row.get("label") or row.get("extra") or "(default)"]
        cells += [f"{stages[s]['seconds'] / 60:.1f}" if s in stages else "-" for s in STAGES]
        cells += [
            f"**{row['clock']['total_seconds'] / 60:.1f}**",
            f"{row['clock']['peak_rss_gib']:.2f}",
            _ppl(row.get("ppl")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged(paths: list[str], by_bits: bool = False) -> dict:
    """The runs of several result JSONs as one (keys prefixed by their file), in file order or,
    with `by_bits`, by width (file order within one)."""
    runs = {}
    for path in paths:
        runs |= {f"{path}:{k}": v for k, v in json.loads(Path(path).read_text())["runs"].items()}
    if by_bits:
        runs = dict(sorted(runs.items(), key=lambda kv: kv[1]["bits"]))
    return {"runs": runs}


def summary(results: dict) -> str:
    """README's results table: one row per run, what a user gets and what it costs."""
    head = ["bits", "calibration / distillation windows", "bits/weight", "PPL, 16 windows bf16",
            "quantize wall time", "peak RSS", "checkpoint"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(results["runs"].values(), key=lambda r: r["bits"]):
        windows = row.get("windows", {})
        distill = windows.get("distill") or ("none" if windows else "-")
        budget = f"{windows.get('calibration') or '-'} / {distill}"
        cells = [
            str(row["bits"]), budget, f"{row['bits_per_weight']:.3f}",
            f"{row['ppl']['value']:.2f}", f"{row['clock']['total_seconds'] / 60:.1f} min",
            f"{row['clock']['peak_rss_gib']:.1f} GiB", f"{row['checkpoint_mib']:.1f} MiB",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def work(row: dict) -> dict[str, float]:
    """The units each stage's time grows with: Fisher windows, calibration windows (calibration
    passes), calibration windows times block fine-tuning epochs, teacher windows (the
    distillation's and 4 held-out), distillation windows, and layers (quantize, refit). Rows
    record their window counts and epochs (Fisher the calibration's when not recorded); older
    rows ran 128 and 256 windows and 2 epochs unless their options said otherwise."""
    options = row.get("extra", "").split()
    counted = row.get("windows", {})
    calib = counted.get("calibration") or _option(options, "--nsamples", 128)
    distill = counted.get("distill") or _option(options, "--distill-windows", 256)
    fisher, layers = counted.get("fisher") or calib, row.get("layers", 210)
    epochs = counted.get("block_epochs") or _option(options, "--finetune-epochs", 2)
    return {"fisher": fisher, "teacher": distill + 4, "hessians": calib, "quantize": layers,
            "refit": layers, "finetune": calib * epochs, "distill": distill}  # fmt: skip


def _option(options: list[str], name: str, default: int) -> int:
    return int(options[options.index(name) + 1]) if name in options else default


UNITS = {"fisher": "s / window", "teacher": "s / window", "hessians": "s / window",
         "quantize": "s / layer", "refit": "s / layer", "finetune": "s / window and epoch",
         "distill": "s / window (1 step)"}  # fmt: skip


def rates(results: dict) -> str:
    """Each stage's seconds per unit of work (`work`), one column per run: runs of different
    sizes compare stage by stage."""
    runs = list(results["runs"].values())
    head = ["stage", "unit", *(r.get("label") or f"{r['bits']} bits, this code" for r in runs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, unit in UNITS.items():
        cells = []
        for r in runs:
            seconds = r["clock"]["stages"].get(stage, {}).get("seconds")
            cells.append("-" if seconds is None else f"{seconds / work(r)[stage]:.2f}")
        lines.append(f"| {stage} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="3,2,4")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--extra", default="", help="more rsavq quantize options")
    parser.add_argument(
        "--label", default="", help="the row's name (default: the options), e.g. the code's commit"
    )
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows evaluated")
    parser.add_argument("--keep", default=None, help="keep the checkpoints under this directory")
    parser.add_argument("--json", default="benchmarks/results/cost.json")
    parser.add_argument(
        "--table", nargs="+", default=None,
        help="print the table of these JSONs' runs (by width) and exit",
    )  # fmt: skip
    parser.add_argument(
        "--summary", default=None, help="README's defaults table of this JSON (written there)"
    )
    parser.add_argument(
        "--rates", nargs="+", default=None, help="print the stage rates of these JSONs and exit"
    )
    args = parser.parse_args()
    if args.rates:
        print(rates(merged(args.rates)))
        return
    if args.table:
        print(table(merged(args.table, by_bits=True)))
        return
    if args.summary:
        text = summary(json.loads(Path(args.summary).read_text()))
        rewrite_block(Path(__file__).resolve().parents[1] / "README.md", "defaults", text)
        print(text)
        return
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or
                          platform.machine(), "threads": args.threads}  # fmt: skip
    for bits in (int(b) for b in args.bits.split(",")):
        key = f"{bits} {args.label or args.extra}".strip()
        if key in results["runs"]:
            continue
        keep = Path(args.keep) if args.keep else None
        row = run_width(bits, args.threads, shlex.split(args.extra), args.windows, keep)
        results["runs"][key] = {**row, "extra": args.extra, "label": args.label}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)
    print(table(results))


if __name__ == "__main__":
    main()
