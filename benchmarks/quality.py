"""The quality tables of BENCHMARKS.md on SmolLM2-135M, resumable, and its BENCHMARKS.md tables.

    python benchmarks/quality.py --sections main                   # headline rows, all 148 windows
    python benchmarks/quality.py --sections buildup,rsavq --bits 2,3 --windows 16 \
        --eval-dtype bfloat16 --tasks ''                           # ablations (the fast protocol)
    python benchmarks/quality.py --only 'rsavq (default)' --bits 3 # one row (rows may run as
                                                                   # separate processes)
    python benchmarks/quality.py --table-only                      # rewrite BENCHMARKS.md
    python benchmarks/quality.py --table-only --json J --block B   # J's rows into block B

Rows (same FP model, same C4 calibration windows and seeds; Hessian methods calibrate block by
block on the already-quantized prefix unless a row says otherwise):
- main, per width: FP | RTN g128 | GPTQ g128 act-order | k-means VQ | RSAVQ (paper) |
  rsavq without fine-tuning | rsavq (default: block fine-tuning, then
  end-to-end distillation; rows measured before distillation joined the default are shown as
  block fine-tuning only);
- buildup, per width: k-means VQ, then one mechanism added per row up to the default;
- rsavq, per width: the paper's parts on the default base: lambda, WCSG groups, channel order;
- vector, per width: vector length (codebook size) at the default's codebook overhead;
- finetune, per width: the default with block fine-tuning (`rsavq.finetune`) on top, then
  end-to-end distillation (`rsavq.distill`) on top of that;
- compensation (3 bits): the earlier OBS compensation (one codebook per layer, FP-model
  Hessians), then per-block codebooks, then sequential Hessians: why it hurt before.
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
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rsavq.api import Calibration, finetune_windows
from rsavq.config import CALIBRATION_WINDOWS, RSAVQConfig, ScalarConfig, default_widths, preset
from rsavq.data import calibration_windows, evaluation_windows, load_corpus
from rsavq.distill import Distillation, distill, teacher_targets
from rsavq.eval import perplexity
from rsavq.finetune import BlockTuning
from rsavq.io import atomic_write_json, rewrite_block
from rsavq.models import load_model
from rsavq.modules import DEFAULT_SKIP
from rsavq.pipeline import quantize_model, summarize
from rsavq.serialization import save_quantized
from rsavq.stats.collect import CollectOptions
from rsavq.stats.run import collect_model_stats, default_stats_dir

logger = logging.getLogger("quality")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande")
ROW_FILE = "row.json"  # beside a kept checkpoint: its bits, times and errors
SECTIONS = (
    "main",
    "buildup",
    "rsavq",
    "vector",
    "codebooks",
    "options",
    "knobs",
    "compensation",
    "finetune",
)


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    bits: int | None  # None: FP
    config: RSAVQConfig | ScalarConfig | None
    tuning: BlockTuning | None = None
    distillation: Distillation | None = None

    @property
    def config_dict(self) -> dict | None:
        return None if self.config is None else self.config.to_dict()

    @property
    def identity(self) -> dict:
        """What the row's checkpoint depends on (fine-tuning only when there is some, so rows
        without it keep the keys they had)."""
        extra = {"tuning": self.tuning.to_dict()} if self.tuning else {}
        if self.distillation:
            extra["distillation"] = self.distillation.to_dict()
        return {"config": self.config_dict, **extra}


NO_TUNING = "rsavq, no fine-tuning (Quality I default)"
DEFAULT = "rsavq (default)"
BLOCK_ONLY = "rsavq, block fine-tuning only (Quality II part 1 default)"


def shown_label(row: dict) -> str:
    """A row's label in the tables, with what it ran where that differs from today's default
    (`_earlier`)."""
    label = _label(row)
    earlier = _earlier(row)
    label = {NO_TUNING: "rsavq, no fine-tuning", BLOCK_ONLY: "rsavq, block fine-tuning only"}.get(
        label, label
    )
    return f"{label}, {' and '.join(earlier)}" if earlier else label


def _label(row: dict) -> str:
    """Rows measured as `rsavq (default)` before distillation joined the default (their JSON
    records no distillation) count as block fine-tuning only."""
    if row["label"] == DEFAULT and row.get("tuning") and not row.get("distillation"):
        return BLOCK_ONLY
    return row["label"]


def _earlier(row: dict) -> list[str]:
    """What a default's row (or a fine-tuning row, which starts from the default) ran that the
    default no longer does: k/v at the common width (no `layer_bits`), distillation on the
    calibration's windows (no `windows`)."""
    label, bits = _label(row), row.get("bits")
    widened = bits and "layer_bits" in default_widths(bits)
    on_default = label in (NO_TUNING, DEFAULT, BLOCK_ONLY) or row.get("section") == "finetune"
    earlier = []
    if on_default and widened and "layer_bits" not in (row.get("config") or {}):
        earlier.append(f"k/v at {bits} bits")
    if label == DEFAULT and "windows" not in (row.get("distillation") or {"windows": 0}):
        earlier.append("distilled on the calibration's windows")
    return earlier


def superseded(row: dict) -> bool:
    """A default's row measured before the default changed (the headline table leaves it out;
    the sections that measured it keep it, labelled by what it ran)."""
    return row["label"] in (NO_TUNING, DEFAULT) and (
        _label(row) != row["label"] or bool(_earlier(row))
    )


def main_rows(bits: int) -> list[Row]:
    return [
        Row("main", "RTN g128", bits, ScalarConfig("rtn", bits)),
        Row("main", "GPTQ g128 act-order", bits, ScalarConfig("gptq", bits)),
        Row("main", "k-means VQ", bits, preset("kmeans", bits)),
        Row("main", "RSAVQ (paper)", bits, preset("paper", bits)),
        Row("main", NO_TUNING, bits, preset("default", bits)),
        Row("main", DEFAULT, bits, preset("default", bits), BlockTuning(), Distillation()),
    ]


def buildup_rows(bits: int) -> list[Row]:
    """k-means VQ, then one mechanism at a time, ending at the default."""
    steps = [
        ("k-means VQ (one codebook per layer)", {}),
        ("+ codebooks per block of columns", {"codebook_overhead": 0.04}),
        ("+ row scales", {"row_scales": True}),
        ("+ OBS assignment (FP-model Hessians)", {"compensation": "hessian", "sequential": False}),
        ("+ block-sequential Hessians", {"sequential": True}),
        ("+ codebook and scale refit", {"refit": True}),
        ("+ Fisher channel order (WCSG sort, 1 group)", {"uniform_bits": False}),
        ("+ EDSG (lambda 0.01) = default", {"lam": 0.01}),
    ]
    if default_widths(bits):
        steps[-1] = ("+ EDSG (lambda 0.01)", {"lam": 0.01})
        wider = default_widths(bits)
        label = "+ k/v projections one bit wider"
        if "codebook_overhead" in wider:
            label += f", codebooks at {wider['codebook_overhead']:g} bits/weight"
        steps.append((f"{label} = default", wider))
    rows, overrides = [], {}
    for label, step in steps:
        overrides = {**overrides, **step}
        rows.append(Row("buildup", label, bits, preset("kmeans", bits, **overrides)))
    return rows


def rsavq_rows(bits: int) -> list[Row]:
    rows = [
        Row("rsavq", f"lambda {lam}", bits, preset("default", bits, lam=lam))
        for lam in (0.0, 0.003, 0.03, 0.1, 0.3)
    ]
    rows += [
        Row("rsavq", f"{g} WCSG groups", bits, preset("default", bits, groups=g)) for g in (2, 4)
    ]
    hessian_order = preset("default", bits, order="hessian")
    rows.append(Row("rsavq", "order by diag(X^T X)", bits, hessian_order))
    return rows


def vector_rows(bits: int) -> list[Row]:
    """Vector lengths whose codebooks stay affordable at this width (<= 4096 entries), then
    twice the default's codebook overhead (smaller blocks of columns per codebook)."""
    lengths = [v for v in (1, 2, 3, 4) if bits * v <= 12]
    rows = [
        Row("vector", f"vector length {v}", bits, preset("default", bits, vector_length=v))
        for v in lengths
    ]
    overhead = preset("default", bits, codebook_overhead=0.08)
    return [*rows, Row("vector", "codebook overhead 0.08 bits/weight", bits, overhead)]


def codebook_rows(bits: int) -> list[Row]:
    """Codebook storage (issue "Quality I", item 4): int8 codebooks (more blocks at the same
    overhead), and the default without refit."""
    settings = [
        ("int8 codebooks (more blocks at the same overhead)", {"codebook_dtype": "int8"}),
        ("default without refit", {"refit": False}),
    ]
    return [Row("codebooks", label, bits, preset("default", bits, **o)) for label, o in settings]


def option_rows(bits: int) -> list[Row]:
    """Method options beside the default they change, without fine-tuning (issue "One
    product", item 5): the metric k-means weights by, the Hessian of the OBS error feedback,
    and the bit-allocation rule with 4 WCSG groups (with the default's one group every channel
    gets the same width)."""

    def default(label: str, **o) -> Row:
        return Row("options", label, bits, preset("default", bits, **o))

    return [
        default("default, no fine-tuning"),
        default("default, F_I as the OBS Hessian", compensation="fisher"),
        default("default, Fisher-diagonal metric", metric="fisher_diag"),
        default("default, 4 WCSG groups", groups=4),
        default(
            "default, 4 WCSG groups, rate-distortion allocation",
            groups=4,
            allocation="rate-distortion",
        ),  # fmt: skip
    ]


def knob_rows(bits: int) -> list[Row]:
    """The numeric settings of `rsavq quantize` beside the default, without fine-tuning (issue
    "One product", item 5): k-means iterations and its early stop, the damping of the Fisher
    factors and Hessians, and a layer kept in full precision (`--skip`)."""

    def default(label: str, **o) -> Row:
        return Row("knobs", label, bits, preset("default", bits, **o))

    first = "model.layers.0.*"
    return [
        default("default, no fine-tuning"),
        default("k-means: 10 iterations (default 20)", kmeans_iters=10),
        default("k-means: 40 iterations", kmeans_iters=40),
        default("k-means: no early stop (tolerance 0; default 1e-4)", kmeans_tol=0.0),
        default("damping 0.001 (default 0.01)", damping=0.001),
        default("damping 0.1", damping=0.1),
        default(
            f"the first block left unquantized (--skip '{first}')", skip=(*DEFAULT_SKIP, first)
        ),
    ]


def finetune_rows(bits: int) -> list[Row]:
    """The default, then block fine-tuning on top, then end-to-end distillation on top of
    that (issue "Quality II")."""
    tuning, e2e = BlockTuning(), Distillation(windows=None)  # on the calibration's windows
    label = f"+ block fine-tuning ({tuning.epochs} epochs, lr {tuning.lr:g})"
    e2e_label = f"+ end-to-end distillation ({e2e.epochs} epoch, lr {e2e.lr:g})"
    rows = [
        Row("finetune", label, bits, preset("default", bits), tuning),
        Row("finetune", e2e_label, bits, preset("default", bits), tuning, e2e),
    ]
    for windows in (256, 512):
        more = Distillation(windows=windows, bf16=True)
        more_label = f"+ distillation on {windows} windows (bf16 autocast)"
        rows.append(Row("finetune", more_label, bits, preset("default", bits), tuning, more))
    staged = preset("default", bits, true_sequential=True)
    label = "+ block fine-tuning, stage by stage within each block (true-sequential)"
    rows.append(Row("finetune", label, bits, staged, tuning))
    hessian_order = preset("default", bits, order="hessian")
    label = "order by diag(X^T X), block fine-tuning and distillation"
    rows.append(Row("finetune", label, bits, hessian_order, tuning, e2e))
    return rows


def compensation_rows(bits: int = 3) -> list[Row]:
    old = preset("kmeans", bits, vector_length=6, sub_vectors=2, lam=0.01, uniform_bits=False)
    rows = [
        ("+EDSG + compensation as before", {"compensation": "hessian", "sequential": False}),
        ("+ codebooks per block of columns", {"codebook_overhead": 0.04}),
        ("+ block-sequential Hessians", {"sequential": True}),
    ]
    out, overrides = [], {}
    for label, step in rows:
        overrides = {**overrides, **step}
        config = RSAVQConfig.from_dict({**old.to_dict(), **overrides})
        out.append(Row("compensation", label, bits, config))
    return out


SECTION_ROWS = {
    "main": main_rows,
    "buildup": buildup_rows,
    "rsavq": rsavq_rows,
    "vector": vector_rows,
    "codebooks": codebook_rows,
    "options": option_rows,
    "knobs": knob_rows,
    "finetune": finetune_rows,
}


def all_rows(widths: list[int], sections: set[str]) -> list[Row]:
    rows = [Row("main", "FP", None, None)] if "main" in sections else []
    for name, make in SECTION_ROWS.items():
        if name in sections:
            rows += [row for b in widths for row in make(b)]
    if "compensation" in sections:
        rows += compensation_rows()
    return rows


def row_key(row: Row, settings: dict) -> str:
    blob = json.dumps({**row.identity, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Runner:
    """Loads the FP model per row, quantizes, evaluates; holds the shared calibration data."""

    def __init__(self, args: argparse.Namespace):

        self.args = args
        self._load = lambda: load_model(args.model)
        _, self.tokenizer = self._load()
        self.calib = load_corpus("c4", args.data_dir)
        self.calib_source = Calibration(self.calib, args.nsamples, args.seqlen, 0)
        self.calib_spec = self.calib_source.spec(self.calib)
        wiki = load_corpus("wikitext2", args.data_dir)
        self.windows = evaluation_windows(self.tokenizer, wiki, 2048, args.windows)
        self._stats = None

    def stats(self, model):
        if self._stats is None:
            root = default_stats_dir(model, self.calib_spec)
            options = CollectOptions(checkpoint_every=16)
            self._stats = collect_model_stats(
                model, self.tokenizer, self.args.model, self.calib, self.calib_spec, root, options
            )
        return self._stats

    def finetune_windows(self, row: Row):
        """The distillation's own windows (or None) and the held-out windows (or None), as
        `rsavq.api.quantize` draws them."""
        return finetune_windows(
            self.tokenizer, self.calib, self.calib_source, row.tuning, row.distillation
        )

    def calibration(self):
        c = self.calib_spec
        return calibration_windows(self.tokenizer, self.calib, c.nsamples, c.seqlen, c.seed)

    def run(self, row: Row) -> dict:
        result: dict = {
            "section": row.section,
            "label": row.label,
            "bits": row.bits,
            "config": row.config_dict,
            **row.identity,
        }
        if row.config is None:
            model, _ = self._load()
        else:
            model, numbers = self._quantized(row)
            result.update(numbers)
        model.to(getattr(torch, self.args.eval_dtype))
        ppl = perplexity(model, self.windows, "wikitext2", progress=False)
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

    def _out(self, row: Row) -> Path:
        """Where the row's checkpoint is kept."""
        blob = json.dumps({**row.identity, "calibration": str(self.calib_spec)})
        return Path(self.args.work) / hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _quantized(self, row: Row) -> tuple[torch.nn.Module, dict]:
        """The row's quantized model and its numbers: quantized now, or loaded from the
        checkpoint an earlier run of the same configuration (other evaluation settings) kept."""
        out = self._out(row)
        if (out / ROW_FILE).exists():
            logger.info("evaluating the checkpoint kept in %s", out)
            numbers = json.loads((out / ROW_FILE).read_text())
            return load_model(str(out))[0], numbers  # rsavq or plain checkpoint alike
        if row.distillation is not None:
            model, numbers = self._distilled(row, out)
        else:
            model, _ = self._load()
            numbers = self._quantize(model, row, out)
        atomic_write_json(out / ROW_FILE, numbers)
        return model, numbers

    def _distilled(self, row: Row, out: Path) -> tuple[torch.nn.Module, dict]:
        """A distillation row from its row without distillation (quantized now or kept): the
        same state the pipeline distills, so the same result as `quantize_model(...,
        distillation=...)` (which the tests check), without quantizing the model twice."""
        base = dataclasses.replace(row, distillation=None)
        model, numbers = self._quantized(base)
        teacher, _ = self._load()
        options, (windows, held) = row.distillation, self.finetune_windows(row)
        windows = self.calibration() if windows is None else windows
        start = time.perf_counter()
        targets = teacher_targets(teacher, windows, options.top_k, bf16=options.bf16)
        heldout = (
            None
            if held is None
            else (held, teacher_targets(teacher, held, options.top_k, bf16=options.bf16))
        )
        del teacher
        report = distill(model, windows, targets, options, heldout=heldout, progress=False)
        report["teacher_seconds"] = time.perf_counter() - start - report["seconds"]
        qconfig = json.loads((self._out(base) / "config.json").read_text())["quantization_config"]
        qconfig["finetune"]["e2e"] = options.to_dict()
        save_quantized(model, out, qconfig, self.tokenizer)
        numbers = {**numbers, "distill": report}
        numbers["wall_seconds"] += time.perf_counter() - start
        numbers["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return model, numbers

    def _quantize(self, model, row: Row, out: Path) -> dict:
        config = row.config
        stats = self.stats(model) if config.needs_stats else None
        start = time.perf_counter()
        records = quantize_model(
            model,
            config,
            stats,
            out,
            self.tokenizer,
            progress=False,
            calibration=self.calibration(),
            calibration_id={"spec": str(self.calib_spec)},
            tuning=row.tuning,
            heldout=self.finetune_windows(row)[1],
            distillation=row.distillation,
        )
        wall = time.perf_counter() - start
        summary = summarize(records)
        errors = sorted(r.metrics["relative_error"] for r in records)
        return {
            "bits_per_weight": summary["bits_per_weight"],
            "layer_seconds": summary["seconds"],
            "layers": summary["layers"],
            "wall_seconds": wall,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "median_relative_error": errors[len(errors) // 2],
            **tuning_summary(out),
        }


def tuning_summary(out: Path) -> dict:
    """Fine-tuning in a kept checkpoint's report: mean relative block error before and after
    (training windows, and held-out ones when measured) and total seconds of block fine-tuning;
    the distillation's losses, steps, tokens and seconds."""
    report = json.loads((out / "report.json").read_text())
    extra = {"distill": report["distill"]} if "distill" in report else {}
    blocks = report.get("finetune")
    if not blocks:
        return extra
    keys = [k for k in blocks[0] if k != "block"]
    return extra | {
        "finetune": {k: sum(b[k] for b in blocks) / len(blocks) for k in keys}
        | {"seconds": sum(b.get("seconds", 0.0) for b in blocks), "blocks": len(blocks)}
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
        "eval_dtype": args.eval_dtype,
        "tasks": args.tasks,
        "tasks_limit": args.tasks_limit,
    }
    rows = all_rows([int(b) for b in args.bits.split(",")], set(args.sections.split(",")))
    if args.only:
        rows = [r for r in rows if r.label in args.only.split(";")]
    runner = None
    for row in rows:
        key = row_key(row, settings)
        if key in results["rows"]:
            continue
        runner = runner or Runner(args)
        logger.info("row %s / %s / %s bits", row.section, row.label, row.bits)
        result = runner.run(row)
        result["settings"] = settings
        result["order"] = rows.index(row)
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


def _time(row: dict) -> str:
    """Wall time of the whole quantization; per layer and the process's peak RSS when known."""
    text = f"{row['wall_seconds']:.0f} s"
    if "layers" in row:
        text += f" ({row['layer_seconds'] / row['layers']:.1f} s/layer"
        text += f", peak {row['peak_rss_gib']:.1f} GiB)" if "peak_rss_gib" in row else ")"
    return text


def _settings_line(rows: list[dict]) -> str:
    s = rows[0]["settings"]
    windows = rows[0]["wikitext2"]["windows"]
    limit = f"first {s['tasks_limit']} examples per task" if s["tasks_limit"] else "all examples"
    tasks = f"zero-shot acc_norm (acc for WinoGrande) on {limit}" if s["tasks"] else "no zero-shot"
    return (
        f"{s['model']}, calibration {s['calibration']}; WikiText-2 PPL over {windows} "
        f"windows x 2048 ({s.get('eval_dtype', 'float32')} evaluation); {tasks}."
    )


def main_table(rows: list[dict]) -> str:
    """One table per evaluation protocol (windows, dtype, tasks), headline protocol first."""
    main = [r for r in rows if r["section"] == "main" and not superseded(r)]
    protocols: dict[str, list[dict]] = {}
    for r in main:
        protocols.setdefault(_settings_line([r]), []).append(r)
    tables = sorted(protocols.values(), key=lambda rs: -rs[0]["wikitext2"]["windows"])
    return "\n\n".join(_main_table(rs) for rs in tables)


def _main_table(main: list[dict]) -> str:
    order = ["FP"] + [r.label for r in main_rows(2)]
    order.insert(order.index(DEFAULT), BLOCK_ONLY)
    main = sorted(
        main,
        key=lambda r: (
            r["bits"] or 0,
            order.index(shown_label(r)) if shown_label(r) in order else 99,
        ),  # fmt: skip
    )
    head = (
        "| bits | method | bits/weight | WikiText-2 PPL | "
        + " | ".join(TASKS)
        + " | avg | quantize time |"
    )
    lines = [_settings_line(main), "", head, "|" + "---|" * (len(TASKS) + 6)]
    for r in main:
        bpw = "32 (fp32)" if r["bits"] is None else f"{r['bits_per_weight']:.3f}"
        secs = "-" if r["bits"] is None else _time(r)
        zs = " | ".join(_zs(r, t) for t in TASKS)
        ppl = _fmt_ppl(r["wikitext2"]["ppl"])
        lines.append(
            f"| {r['bits'] or 'FP'} | {shown_label(r)} | {bpw} | {ppl} | {zs} | "
            f"{_zs(r, 'average')} | {secs} |"
        )
    return "\n".join(lines)


def _protocol(row: dict) -> tuple[int, str]:
    return row["wikitext2"]["windows"], row["settings"].get("eval_dtype", "float32")


def ablation_table(rows: list[dict]) -> str:
    abl = [r for r in rows if r["section"] != "main"]
    if not abl:
        return "(no ablation rows measured yet: `python benchmarks/quality.py --sections buildup`)"
    order = {name: i for i, name in enumerate(SECTIONS)}
    abl.sort(key=lambda r: (order.get(r["section"], 99), r["bits"], r.get("order", 0)))
    lines = [
        _settings_line(abl),
        "",
        "| section | bits | setting | bits/weight | WikiText-2 PPL | median layer rel. error "
        "| quantize time |",
        "|---|---|---|---|---|---|---|",
    ]
    protocol, calibration = _protocol(abl[0]), abl[0]["settings"]["calibration"]
    for r in abl:
        other = _protocol(r) != protocol  # a row measured otherwise says how
        how = f" ({r['wikitext2']['windows']} windows, {_protocol(r)[1]})" if other else ""
        label = shown_label(r)
        if r["settings"]["calibration"] != calibration:  # and one calibrated otherwise, on what
            label += f", calibration {r['settings']['calibration']}"
        lines.append(
            f"| {r['section']} | {r['bits']} | {label} | {r['bits_per_weight']:.3f} | "
            f"{_fmt_ppl(r['wikitext2']['ppl'])}{how} | {r['median_relative_error']:.3f} | "
            f"{_time(r)} |"
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
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--nsamples", type=int, default=CALIBRATION_WINDOWS)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument(
        "--windows", type=int, default=None, help="WikiText-2 windows (default: all 148)"
    )
    p.add_argument("--tasks", default=",".join(TASKS), help="'' for no zero-shot")
    p.add_argument("--tasks-limit", type=int, default=None)
    p.add_argument("--data-dir", default=os.environ.get("RSAVQ_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument(
        "--work",
        default="runs/quality",
        help="checkpoints, one per configuration: a row evaluated again with other settings "
        "(windows, dtype, tasks) reuses it",
    )
    p.add_argument("--json", default="benchmarks/results/quality.json")
    p.add_argument(
        "--markdown",
        default=None,
        help="file whose quality block is rewritten (default: BENCHMARKS.md with --table-only; "
        "a run only prints its table, so a development row never overwrites the published one)",
    )
    p.add_argument("--only", default="", help="';'-separated row labels to run (default all)")
    p.add_argument(
        "--eval-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the perplexity and zero-shot evaluation (quantization runs in fp32)",
    )
    p.add_argument("--merge", default="", help="comma-separated result JSONs added to the tables")
    p.add_argument("--table-only", action="store_true", help="only rewrite the tables")
    p.add_argument(
        "--block",
        default="quality",
        help="the markdown block rewritten: 'quality' (every table) or another name (the rows "
        "as one ablation table)",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = load_results(Path(args.json)) if args.table_only else run_all(args)
    for extra in filter(None, args.merge.split(",")):
        results["rows"].update(load_results(Path(extra))["rows"])
    markdown = args.markdown or ("BENCHMARKS.md" if args.table_only else None)
    text = (
        render(results)
        if args.block == "quality"
        else ablation_table(list(results["rows"].values()))
    )
    if markdown:
        rewrite_block(markdown, args.block, text)
    print(text)


if __name__ == "__main__":
    main()
