"""The headline results: FP, RTN g128, GPTQ g128, the paper's configuration and rsavq's default at
2, 3 and 4 bits on SmolLM2-135M, all evaluated the same way, and the tables README.md and
BENCHMARKS.md show.

    make results                  # python benchmarks/results.py            (headline protocol)
    make results FAST=1           # python benchmarks/results.py --fast     (development protocol)
    python benchmarks/results.py --only 'rsavq (default)' --bits 3 --threads 1   # one row
    python benchmarks/results.py --fast --bits 3 --seeds 1 --threads 1  # one seed's row
    python benchmarks/results.py --table-only [--fast]  # rewrite the tables from the JSON

Headline protocol: WikiText-2 test, all 148 windows of 2048 tokens, and C4, 64 windows of 2048
tokens from documents no default calibration reads, both in float32; zero-shot ARC-Easy,
ARC-Challenge, PIQA and WinoGrande through lm-eval, the first 500 examples of each. Fast protocol
(`--fast`): WikiText-2 and C4, 16 windows each in bfloat16, no zero-shot, and the 3-bit default
over calibration seeds 0, 1 and 2 (the spread a difference has to beat).

Each row runs `rsavq quantize --bits B` with the method's options (nothing else: the shipped
defaults; embeddings and norms saved in bfloat16 as `make demo` does; Fisher statistics
collected into the row's own directory, so the time is a cold cache's) and then `rsavq eval` once
per evaluation, each a process of its own. Every finished step (the quantization, each
evaluation) is written to the JSON at once, so an interrupted run resumes at the next step (an
interrupted quantization resumes from its checkpoint's partial directory). Rows may run as
parallel processes (`--only`, `--bits`, `--threads 1`): the JSON is updated under a lock. Times
are only comparable between rows that ran alone on a quiet machine; `threads`, `parallel` and
the CPU (`cpu`: the same command can give another checkpoint on another CPU) are recorded with
each row.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rsavq.clock import cpu_name
from rsavq.data import load_corpus, unread_documents
from rsavq.io import atomic_write_json, rewrite_block

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande")
METHODS: dict[str, list[str] | None] = {
    "FP": None,
    "RTN g128": ["--method", "rtn", "--group-size", "128"],
    "GPTQ g128": ["--method", "gptq", "--group-size", "128"],
    "the paper's configuration (`--preset paper`)": ["--preset", "paper"],
    "rsavq (default)": [],
}
DEFAULT = "rsavq (default)"
SEEDS = (0, 1, 2)  # the fast protocol's spread of the 3-bit default
C4_SKIP_TOKENS = 512 * 512  # twice the most any default calibration reads (256 x 512 at 2 bits)


@dataclass(frozen=True)
class Protocol:
    """How every row is evaluated."""

    name: str
    wikitext_windows: int | None  # None: all
    c4_windows: int
    dtype: str
    tasks: tuple[str, ...]
    tasks_limit: int | None
    seqlen: int = 2048


HEADLINE = Protocol("headline", None, 64, "float32", TASKS, 500)
FAST = Protocol("fast", 16, 16, "bfloat16", (), None)


@dataclass(frozen=True)
class Row:
    method: str
    bits: int | None  # None: the FP model
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.method} | {self.bits or '-'} bits | seed {self.seed}"

    @property
    def slug(self) -> str:
        name = "fp" if self.bits is None else self.method.split()[0].strip("(`'").lower()
        return f"{name}-{self.bits or 16}-s{self.seed}"


def rows(
    protocol: Protocol, widths: list[int], only: str | None, seeds: list[int] | None = None
) -> list[Row]:
    """FP, then every method per width; the fast protocol adds the default's other seeds."""
    chosen = [Row("FP", None)] + [Row(m, b) for b in widths for m in METHODS if m != "FP"]
    if protocol is FAST and 3 in widths:
        chosen += [Row(DEFAULT, 3, seed) for seed in SEEDS[1:]]
    return [
        r
        for r in chosen
        if (only is None or r.method == only) and (seeds is None or r.seed in seeds)
    ]


class Results:
    """The JSON of one protocol, read and written under a lock (rows may run in parallel)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"rows": {}}

    def row(self, row: Row) -> dict:
        with self._locked():
            return self.read()["rows"].get(row.key, {})

    @contextlib.contextmanager
    def _editing(self):
        """The JSON's data to change in place, written back atomically, all under the lock."""
        with self._locked():
            data = self.read()
            yield data
            atomic_write_json(self.path, data)

    def update_machine(self, threads: int) -> None:
        with self._editing() as data:
            data["machine"] = {"cpus": os.cpu_count(), "threads": threads,
                               "processor": cpu_name()}  # fmt: skip

    def drop(self, row: Row) -> None:
        """Forget every step of `row`."""
        with self._editing() as data:
            data["rows"].pop(row.key, None)

    def update(self, row: Row, **fields) -> None:
        with self._editing() as data:
            entry = data["rows"].setdefault(row.key, {**asdict(row), "steps": {}})
            entry["steps"].update(fields)


def quantize_step(row: Row, model: str, out: Path, args: argparse.Namespace) -> dict:
    """`rsavq quantize` for one row (resumes a partial checkpoint): what it cost and made."""
    command = [
        sys.executable, "-m", "rsavq.cli", "quantize", "--model", model, "--bits", str(row.bits),
        "--seed", str(row.seed), "--out", str(out), "--stats", f"{out}.stats",
        "--save-dtype", "bfloat16",
        "--threads", str(args.threads), *METHODS[row.method], *shlex.split(args.quantize_args),
    ]  # fmt: skip
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if not (out / "report.json").exists():
        subprocess.run(command, check=True)
    report = json.loads((out / "report.json").read_text())
    return {
        "command": shlex.join(["rsavq", *command[3:]]),
        "wall_seconds": report["clock"]["total_seconds"],
        "peak_rss_gib": report["clock"]["peak_rss_gib"],
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "checkpoint_mib": checkpoint_mib(out),
        "threads": args.threads,
        "parallel": args.parallel,
        "cpu": report["clock"].get("cpu") or cpu_name(),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The commit of the code measured (the checkout this script runs from), when known."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def checkpoint_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def evaluations(protocol: Protocol, c4_file: Path) -> dict[str, list[str]]:
    """The `rsavq eval` options of each evaluation step."""
    common = ["--dtype", protocol.dtype, "--seqlen", str(protocol.seqlen)]
    wikitext = ["--ppl", "wikitext2"]
    if protocol.wikitext_windows:
        wikitext += ["--limit", str(protocol.wikitext_windows)]
    steps = {
        "wikitext2": common + wikitext,
        "c4": common + ["--ppl", str(c4_file), "--limit", str(protocol.c4_windows)],
    }
    if protocol.tasks:
        steps["zero_shot"] = common + ["--ppl", "", "--tasks", ",".join(protocol.tasks)]
        steps["zero_shot"] += ["--batch-size", "16"]
        if protocol.tasks_limit:
            steps["zero_shot"] += ["--tasks-limit", str(protocol.tasks_limit)]
    return steps


def eval_step(model: str, options: list[str], args: argparse.Namespace) -> dict:
    """One `rsavq eval` process: its perplexity (one source) or zero-shot record."""
    with tempfile.TemporaryDirectory(prefix="rsavq-results-") as tmp:
        out = Path(tmp) / "eval.json"
        command = [sys.executable, "-m", "rsavq.cli", "eval", "--model", model, *options]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run([*command, "--json", str(out)], check=True, env=env)
        record = json.loads(out.read_text())
    if record.get("perplexity"):
        [ppl] = record["perplexity"]
        return {"ppl": ppl["ppl"], "windows": ppl["windows"], "options": shlex.join(options)}
    return {**record["zero_shot"], "options": shlex.join(options)}


def c4_heldout(tokenizer_model: str, data_dir: str | None, path: Path) -> Path:
    """C4 documents that no default calibration reads (seed 0, the first C4_SKIP_TOKENS tokens
    of its seeded document order skipped), written once as JSONL for `rsavq eval`."""
    if path.exists():
        return path
    from transformers import AutoTokenizer

    from rsavq.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_model))
    documents = unread_documents(tokenizer, load_corpus("c4", data_dir), C4_SKIP_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    tmp.replace(path)
    return path


def run_row(row: Row, protocol: Protocol, results: Results, args: argparse.Namespace) -> None:
    """Every step of `row` the JSON does not hold yet."""
    done = results.row(row).get("steps", {})
    model = args.model
    c4_file = c4_heldout(args.model, args.data_dir, Path(args.runs) / "c4-heldout.jsonl")
    steps = evaluations(protocol, c4_file)
    if row.bits is not None:
        out = Path(args.runs) / protocol.name / row.slug
        if "quantize" in done and set(steps) - set(done) and not (out / "report.json").exists():
            # (a fresh clone: the JSON has the row, this machine not its checkpoint) the steps
            # left would evaluate another checkpoint than the recorded ones: start the row over
            print(f"{row.key}: its checkpoint {out} is gone; quantizing and evaluating it again")
            results.drop(row)
            done = {}
        if "quantize" not in done:
            results.update(row, quantize=quantize_step(row, args.model, out, args))
        model = str(out)
    elif "quantize" not in done:
        from rsavq.models import resolve_model

        results.update(row, quantize={"checkpoint_mib": checkpoint_mib(resolve_model(model))})
    for name, options in steps.items():
        if name not in done:
            results.update(row, **{name: eval_step(model, options, args)})


def _ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def zero_shot_cells(steps: dict) -> list[str]:
    """acc_norm in percent per task (acc where a task has none, WinoGrande) and their mean."""
    shots = steps.get("zero_shot")
    if not shots:
        return ["-"] * (len(TASKS) + 1)
    values = {t: v.get("acc_norm", v["acc"]) for t, v in shots["tasks"].items()}
    cells = [f"{100 * values[t]:.1f}" if t in values else "-" for t in TASKS]
    return cells + [f"{100 * sum(values.values()) / len(values):.1f}"]


def table(data: dict) -> str:
    """The results table: FP, then each width's methods in METHODS order (seed 0 only)."""
    head = ["bits", "method", "bits/weight", "WikiText-2 PPL", "C4 PPL", "ARC-e", "ARC-c",
            "PIQA", "WinoGrande", "avg", "quantize time", "checkpoint"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {m: i for i, m in enumerate(METHODS)}
    chosen = [r for r in data["rows"].values() if r["seed"] == 0 and r["method"] in order]
    for r in sorted(chosen, key=lambda r: (r["bits"] or 0, order[r["method"]])):
        steps, q = r["steps"], r["steps"].get("quantize", {})
        cells = [str(r["bits"] or "-"), r["method"]]
        cells.append(f"{q['bits_per_weight']:.3f}" if "bits_per_weight" in q else "-")
        cells += [_ppl(steps.get(s, {}).get("ppl")) for s in ("wikitext2", "c4")]
        cells += zero_shot_cells(steps)
        mark = "*" if q.get("parallel") else ""
        cells.append(f"{q['wall_seconds'] / 60:.1f} min{mark}" if "wall_seconds" in q else "-")
        cells.append(f"{q['checkpoint_mib']:.1f} MiB" if "checkpoint_mib" in q else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(data: dict, bits: int = 3) -> str | None:
    """The default's WikiText-2 and C4 perplexity over calibration seeds, when more than one ran."""
    runs = [r for r in data["rows"].values() if r["method"] == DEFAULT and r["bits"] == bits]
    runs = sorted((r for r in runs if "c4" in r["steps"]), key=lambda r: r["seed"])
    if len(runs) < 2:
        return None
    parts = []
    for source in ("wikitext2", "c4"):
        values = [r["steps"][source]["ppl"] for r in runs]
        mean = sum(values) / len(values)
        parts.append(
            f"{source} {' / '.join(f'{v:.2f}' for v in values)} (mean {mean:.2f}, "
            f"max - min {100 * (max(values) - min(values)) / mean:.1f}% of the mean)"
        )
    seeds = ", ".join(str(r["seed"]) for r in runs)
    return f"The {bits}-bit default over calibration seeds {seeds}: " + "; ".join(parts) + "."


CONTENDED = (
    "\\* quantized while other work shared the two cores (other rows, or benchmarks paused it): "
    "not a quiet time; the quiet cost of the default at each width is under Cost."
)


def render(data: dict) -> str:
    lines = [table(data)]
    if any(r["steps"].get("quantize", {}).get("parallel") for r in data["rows"].values()):
        lines.append(CONTENDED)
    if line := spread(data):
        lines.append(line)
    return "\n\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fast", action="store_true", help="the 16-window development protocol")
    p.add_argument("--bits", default="2,3,4", help="widths, comma-separated")
    p.add_argument("--only", default=None, choices=list(METHODS), help="one method's rows only")
    p.add_argument("--seeds", default=None, help="these seeds' rows only, comma-separated")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=os.environ.get("RSAVQ_DATA_DIR"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--parallel", action="store_true", help="record that other rows ran beside")
    p.add_argument("--quantize-args", default="", help="more options for every `rsavq quantize`")
    p.add_argument("--runs", default="runs/results", help="checkpoints and the C4 held-out text")
    p.add_argument("--json", default=None, help="default: benchmarks/results/results[-fast].json")
    p.add_argument("--table-only", action="store_true", help="rewrite the tables and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    protocol = FAST if args.fast else HEADLINE
    name = "results-fast" if args.fast else "results"
    results = Results(Path(args.json or ROOT / "benchmarks" / "results" / f"{name}.json"))
    if not args.table_only:
        results.update_machine(args.threads)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        for row in rows(protocol, [int(b) for b in args.bits.split(",")], args.only, seeds):
            print(f"== {row.key}", flush=True)
            run_row(row, protocol, results, args)
    data = results.read()
    if not data["rows"]:
        print(f"{results.path} holds no rows yet: run without --table-only first")
        return
    text = render(data)
    for doc in ("README.md", "BENCHMARKS.md") if protocol is HEADLINE else ("BENCHMARKS.md",):
        rewrite_block(ROOT / doc, name, text)
    print(text)


if __name__ == "__main__":
    main()
