"""The quality table of EVALUATION.md on SmolLM2-135M, resumable, and its BENCHMARKS.md tables.

    python benchmarks/quality.py                       # every row, full WikiText-2, full tasks
    python benchmarks/quality.py --sections main --bits 2,3 --windows 16 --tasks-limit 200
    python benchmarks/quality.py --table-only          # rewrite BENCHMARKS.md from the JSON

Rows (one process, same FP model, same C4 calibration windows and seeds):
- main, per width: FP | RTN g128 | GPTQ g128 act-order | k-means (product VQ, one group, uniform
  bits, lambda 0, Euclidean) | +EDSG (k-means + the default lambda) | +WCSG (= RSAVQ, defaults)
  | RSAVQ + Hessian compensation | +EDSG + Hessian compensation (one group; the compensation is an
  extension, not the paper's method);
- ablations at 2 bits: lambda (relative and raw), groups, allocation, metric, EDSG sign.
Each finished row is stored in the JSON under a key made of its configuration and the evaluation
settings, so an interrupted run resumes at the next row, and a layer-level resume inside a row
comes from the pipeline's `.partial` directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rsavq.config import (
    Allocation,
    Compensation,
    EdsgSign,
    LambdaMode,
    Metric,
    RSAVQConfig,
    ScalarConfig,
)
from rsavq.data import calibration_windows, evaluation_windows, load_corpus
from rsavq.eval import perplexity
from rsavq.io import atomic_write, atomic_write_json, rewrite_block
from rsavq.modules import find_linears
from rsavq.pipeline import quantize_model, summarize
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import CalibrationSpec, collect_model_stats, default_stats_dir

logger = logging.getLogger("quality")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande")


@dataclass(frozen=True)
class Row:
    section: str  # "main" or an ablation name
    label: str
    bits: int | None  # None: FP
    config: RSAVQConfig | ScalarConfig | None

    @property
    def config_dict(self) -> dict | None:
        return None if self.config is None else self.config.to_dict()


def paper_config(bits: int) -> RSAVQConfig:
    """The paper's RSAVQ: 4 groups, lambda 0.01 (relative), every stored bit within the budget."""
    return RSAVQConfig(bits=bits, groups=4, lam=0.01, budget_includes_overhead=True)


def main_rows(bits: int) -> list[Row]:
    default = paper_config(bits)
    kmeans = replace(default, groups=1, uniform_bits=True, lam=0.0)
    return [
        Row("main", "RTN g128", bits, ScalarConfig("rtn", bits)),
        Row("main", "GPTQ g128 act-order", bits, ScalarConfig("gptq", bits)),
        Row("main", "k-means VQ", bits, kmeans),
        Row("main", "+EDSG", bits, replace(kmeans, lam=default.lam)),
        Row("main", "+WCSG (RSAVQ)", bits, default),
        Row(
            "main",
            "RSAVQ + Hessian compensation",
            bits,
            replace(default, compensation=Compensation.HESSIAN),
        ),
        Row(
            "main",
            "+EDSG + Hessian compensation",
            bits,
            replace(kmeans, lam=default.lam, compensation=Compensation.HESSIAN),
        ),
    ]


def ablation_rows(bits: int = 2) -> list[Row]:
    d = paper_config(bits)
    rows = [
        Row("lambda", f"relative {lam}", bits, replace(d, lam=lam))
        for lam in (0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
    ]
    rows += [
        Row("lambda", f"raw {lam}", bits, replace(d, lam=lam, lambda_mode=LambdaMode.RAW))
        for lam in (0.01, 0.05, 0.1)
    ]
    rows += [Row("groups", f"{g} groups", bits, replace(d, groups=g)) for g in (1, 2, 4, 8)]
    rows += [Row("allocation", a.value, bits, replace(d, allocation=a)) for a in Allocation]
    rows += [Row("metric", m.value, bits, replace(d, metric=m)) for m in Metric]
    rows += [Row("sign", s.value, bits, replace(d, edsg_sign=s)) for s in EdsgSign]
    return rows


def all_rows(widths: list[int], sections: set[str]) -> list[Row]:
    rows = [Row("main", "FP", None, None)] if "main" in sections else []
    if "main" in sections:
        for b in widths:
            rows += main_rows(b)
    rows += [r for r in ablation_rows() if r.section in sections]
    return rows


def row_key(row: Row, settings: dict) -> str:
    blob = json.dumps({"config": row.config_dict, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Runner:
    """Loads the FP model per row, quantizes, evaluates; holds the shared calibration data."""

    def __init__(self, args: argparse.Namespace):
        from rsavq.models import load_model

        self.args = args
        self._load = lambda: load_model(args.model)
        _, self.tokenizer = self._load()
        self.calib_spec = CalibrationSpec("c4", args.nsamples, args.seqlen, 0)
        self.calib = load_corpus("c4", args.data_dir)
        wiki = load_corpus("wikitext2", args.data_dir)
        self.windows = evaluation_windows(self.tokenizer, wiki, 2048, args.windows)
        self._stats = self._hessians = None

    def stats(self, model):
        if self._stats is None:
            root = default_stats_dir(model, self.calib_spec)
            options = CollectOptions(checkpoint_every=16)
            self._stats = collect_model_stats(
                model, self.tokenizer, self.args.model, self.calib, self.calib_spec, root, options
            )
        return self._stats

    def hessians(self, model):
        if self._hessians is None:
            from rsavq.stats.hessian import input_hessians

            path = Path(self.args.work) / f"hessians-{self.args.nsamples}x{self.args.seqlen}.pt"
            if path.exists():
                self._hessians = torch.load(path)
            else:
                c = self.calib_spec
                windows = calibration_windows(
                    self.tokenizer, self.calib, c.nsamples, c.seqlen, c.seed
                )
                self._hessians = input_hessians(model, find_linears(model), windows)
                atomic_write(path, lambda tmp: torch.save(self._hessians, tmp))
        return self._hessians

    def run(self, row: Row, key: str) -> dict:
        model, _ = self._load()
        result: dict = {
            "section": row.section,
            "label": row.label,
            "bits": row.bits,
            "config": row.config_dict,
        }
        if row.config is not None:
            result.update(self._quantize(model, row.config, Path(self.args.work) / key))
        ppl = perplexity(model, self.windows, "wikitext2")
        result["wikitext2"] = ppl.to_dict()
        if self.args.tasks:
            from rsavq.eval.zeroshot import zero_shot

            shots = zero_shot(
                model,
                self.tokenizer,
                self.args.tasks,
                self.args.tasks_limit,
                16,
                self.args.data_dir,
            )
            result["zero_shot"] = shots.to_dict()
        return result

    def _quantize(self, model, config, out: Path) -> dict:
        stats = self.stats(model) if config.needs_stats else None
        hessians = self.hessians(model) if config.needs_hessian else None
        start = time.perf_counter()
        records = quantize_model(
            model,
            config,
            stats,
            out,
            self.tokenizer,
            hessians=hessians,
            calibration=dataclasses.asdict(self.calib_spec),
        )
        wall = time.perf_counter() - start
        summary = summarize(records)
        errors = sorted(r.metrics["relative_error"] for r in records)
        if not self.args.keep_checkpoints:  # the row keeps the numbers, not the checkpoint
            shutil.rmtree(out, ignore_errors=True)
        return {
            "bits_per_weight": summary["bits_per_weight"],
            "layer_seconds": summary["seconds"],
            "wall_seconds": wall,
            "median_relative_error": errors[len(errors) // 2],
        }


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def run_all(args: argparse.Namespace) -> dict:
    path = Path(args.json)
    results = load_results(path)
    settings = {
        "model": args.model,
        "calibration": f"c4 {args.nsamples}x{args.seqlen} seed 0",
        "windows": args.windows,
        "tasks": args.tasks,
        "tasks_limit": args.tasks_limit,
    }
    rows = all_rows([int(b) for b in args.bits.split(",")], set(args.sections.split(",")))
    if args.only:
        rows = [r for r in rows if r.label in args.only.split(",")]
    runner = None
    for row in rows:
        key = row_key(row, settings)
        if key in results["rows"]:
            continue
        runner = runner or Runner(args)
        logger.info("row %s / %s / %s bits", row.section, row.label, row.bits)
        result = runner.run(row, key)
        result["settings"] = settings
        results["rows"][key] = result
        atomic_write_json(path, results)
    return results


# ---- tables -----------------------------------------------------------------------------------


def _fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def _zs(row: dict, task: str) -> str:
    """acc_norm in percent (acc where a task has none); "average" is the mean of those."""
    shots = row.get("zero_shot")
    if not shots:
        return "-"
    values = {t: v.get("acc_norm", v["acc"]) for t, v in shots["tasks"].items()}
    if task == "average":
        return f"{100 * sum(values.values()) / len(values):.1f}"
    return "-" if task not in values else f"{100 * values[task]:.1f}"


def _settings_line(rows: list[dict]) -> str:
    s = rows[0]["settings"]
    windows = rows[0]["wikitext2"]["windows"]
    limit = f"first {s['tasks_limit']} examples per task" if s["tasks_limit"] else "all examples"
    tasks = f"zero-shot acc_norm (acc for WinoGrande) on {limit}" if s["tasks"] else "no zero-shot"
    return (
        f"{s['model']}, calibration {s['calibration']}; WikiText-2 PPL over {windows} "
        f"windows x 2048 (fp32); {tasks}."
    )


def main_table(rows: list[dict]) -> str:
    order = ["FP"] + [r.label for r in main_rows(2)]
    main = sorted(
        (r for r in rows if r["section"] == "main"),
        key=lambda r: (r["bits"] or 0, order.index(r["label"]) if r["label"] in order else 99),
    )
    if not main:
        return ""
    head = (
        "| bits | method | bits/weight | WikiText-2 PPL | "
        + " | ".join(TASKS)
        + " | avg | quantize time |"
    )
    lines = [_settings_line(main), "", head, "|" + "---|" * (len(TASKS) + 6)]
    for r in main:
        bpw = "32 (fp32)" if r["bits"] is None else f"{r['bits_per_weight']:.3f}"
        secs = "-" if r["bits"] is None else f"{r['wall_seconds']:.0f} s"
        zs = " | ".join(_zs(r, t) for t in TASKS)
        ppl = _fmt_ppl(r["wikitext2"]["ppl"])
        lines.append(
            f"| {r['bits'] or 'FP'} | {r['label']} | {bpw} | {ppl} | {zs} | "
            f"{_zs(r, 'average')} | {secs} |"
        )
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    abl = [r for r in rows if r["section"] != "main"]
    if not abl:
        return (
            "(no ablation rows measured yet: `python benchmarks/quality.py --sections lambda,...`)"
        )
    lines = [
        _settings_line(abl),
        "",
        "| ablation (2 bits) | setting | bits/weight | WikiText-2 PPL | median layer rel. error |",
        "|---|---|---|---|---|",
    ]
    for r in abl:
        lines.append(
            f"| {r['section']} | {r['label']} | {r['bits_per_weight']:.3f} | "
            f"{_fmt_ppl(r['wikitext2']['ppl'])} | {r['median_relative_error']:.3f} |"
        )
    return "\n".join(lines)


def render(results: dict) -> str:
    rows = list(results["rows"].values())
    parts = [
        "### Quality table",
        "",
        main_table(rows),
        "",
        "### Ablations",
        "",
        ablation_table(rows),
    ]
    return "\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--sections", default="main,lambda,groups,allocation,metric,sign")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument(
        "--windows", type=int, default=None, help="WikiText-2 windows (default: all 148)"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="'' for no zero-shot")
    p.add_argument("--tasks-limit", type=int, default=None)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--work", default="runs/quality", help="checkpoints in progress, Hessians")
    p.add_argument("--json", default="benchmarks/results/quality.json")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--only", default="", help="comma-separated row labels to run (default all)")
    p.add_argument("--merge", default="", help="comma-separated result JSONs added to the tables")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep WORK/<row key>/")
    p.add_argument("--table-only", action="store_true", help="only rewrite the tables")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = load_results(Path(args.json)) if args.table_only else run_all(args)
    for extra in filter(None, args.merge.split(",")):
        results["rows"].update(load_results(Path(extra))["rows"])
    rewrite_block(args.markdown, "quality", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
