"""Weight streaming: peak memory of `rsavq fisher` and `rsavq quantize` with the model loaded whole
and with `--stream-weights` (decoder blocks read from the safetensors files when they run), on a
LLaMA-7B-shaped model with random weights and a few decoder blocks, on this machine.

    python benchmarks/streaming.py --blocks 3 --json benchmarks/results/streaming.json

Each command runs in its own process, one thread (`benchmarks/scale.py`'s `run_ranks` with one
rank), timed, with its peak RSS. Fisher runs under a memory budget (several passes); the
planner's figure beside it counts the weights that are resident (the whole model, or the
embeddings and head plus one block when streamed), the largest pass's accumulators, the largest
per-sequence gradient and the captured layer inputs, plus the runtime (the peak RSS of a
process that only imports what `rsavq` imports, measured) and, when streamed, the largest
tensor of a block (its file pages are mapped while it is copied). Quantization runs the
`--quantizer` method (default `kmeans`: plain product VQ, layer by layer, so that a
7B-shaped block takes minutes, not the half hour of the default block-sequential pass) from
the first run's statistics; both checkpoints are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from rsavq.stats.memory import (
    collection_peak,
    fisher_memory,
    held_bytes,
    llama_shapes,
    parse_bytes,
    plan_passes,
)
from scale import (
    GIB,
    PEAK,
    build_model,
    cli_common,
    parser,
    peak_kib,
    run_and_render,
    run_ranks,
    settings_of,
)

VOCAB = 49152  # SmolLM2's tokenizer, which build_model gives the model
STAGES = ("fisher", "quantize")


# what every rsavq process holds before it loads a model: the interpreter and the libraries
RUNTIME = "import accelerate, torch, transformers, rsavq.cli; from transformers import LlamaModel"


def runtime_bytes() -> int:
    """Peak RSS of a process that only imports what `rsavq fisher` imports (measured)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-c", RUNTIME],
                          env=env, text=True, capture_output=True, check=True)  # fmt: skip
    return peak_kib(done.stderr) * 1024


def planner(args, streamed: bool, runtime: int = 0) -> dict:
    """Resident weights and the Fisher planner's figure for one way of loading the model, with
    `runtime` bytes for the interpreter and libraries; a streamed model adds the largest
    tensor of a block (its file pages are mapped while it is copied)."""
    block = llama_shapes(args.hidden, args.intermediate, 1)
    shapes = dict(enumerate(block * args.blocks))
    passes = plan_passes(shapes, False, parse_bytes(args.memory_budget))
    held = held_bytes(passes, shapes, False)
    memory = fisher_memory(list(shapes.values()), False, args.seqlen, activation_bytes=4)
    block_bytes = sum(m * n for m, n in block) * 4
    weights = 2 * VOCAB * args.hidden * 4 + block_bytes * (1 if streamed else args.blocks)
    read = max(m * n for m, n in block) * 4 if streamed else 0
    total = collection_peak(runtime + weights, held, memory, read=read)
    return {"passes": len(passes), "weights_gib": weights / GIB, "runtime_gib": runtime / GIB,
            "read_gib": read / GIB, "fisher_planned_gib": total / GIB}  # fmt: skip


def commit() -> str:
    """The repository's commit (the code a stage was measured with)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Both ways of loading, the `--stages` asked for; a stage not asked for keeps its results
    (and the commit they were measured at) from the `--json` of an earlier run."""
    from safetensors.torch import load_file

    stages = set(args.stages.split(","))
    before = json.loads(Path(args.json).read_text()) if stages != set(STAGES) else None
    model = work / "model"
    build_model(model, args.blocks, args.hidden, args.intermediate)
    common = cli_common(args, model)
    rows, runtime, at = [], runtime_bytes(), commit()
    for i, streamed in enumerate((False, True)):
        flag = ["--stream-weights"] if streamed else []
        stats, out = work / f"stats-{streamed}", work / f"q-{streamed}"
        row = {"streamed": streamed, "plan": planner(args, streamed, runtime)}
        if "fisher" in stages:
            row["fisher"] = run_ranks(1, ["fisher", *common, *flag, "--memory-budget",
                                          args.memory_budget, "--checkpoint-every", "0",
                                          "--out", str(stats)])  # fmt: skip
        if "quantize" in stages:
            row["quantize"] = run_ranks(1, ["quantize", *common, *flag, "--stats",
                                            str(work / "stats-False"), "--method", args.quantizer,
                                            "--bits", args.bits, "--out", str(out)])  # fmt: skip
        for stage in STAGES:
            if stage in stages:
                row[stage].pop("stdout")
                row[stage]["commit"] = at
            else:
                row[stage] = before["rows"][i][stage]
        rows.append(row)
        f, q = row["fisher"], row["quantize"]
        print(
            f"streamed={streamed}: fisher {f['seconds']:.0f} s peak {f['peak_rss_gib']:.2f} GiB;"
            f" quantize {q['seconds']:.0f} s peak {q['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    if "quantize" in stages:
        a, b = (load_file(work / f"q-{s}" / "model.safetensors") for s in (False, True))
        identical = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    else:
        identical = before["identical"]
    return {"settings": settings_of(args), "rows": rows, "identical": identical}


def _counted(rows: list[dict]) -> str:
    """What the planner's figure counts besides weights and Fisher memory (newer runs)."""
    plan = rows[-1]["plan"]
    if "runtime_gib" not in plan:
        return " The planner's figure counts neither the runtime nor the read."
    return (
        f" The planner's figure counts the runtime ({plan['runtime_gib']:.2f} GiB, measured) and, "
        f"streamed, the read of the largest tensor ({plan['read_gib']:.2f} GiB)."
    )


def render(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"LLaMA-7B-shaped model (hidden {s['hidden']}, intermediate {s['intermediate']}, random "
        f"weights, vocabulary {VOCAB}), {s['blocks']} decoder blocks; Fisher from {s['nsamples']}"
        f" x {s['seqlen']} tokens of C4 under a {s['memory_budget']} budget "
        f"({result['rows'][0]['plan']['passes']} passes); quantization: `--method "
        f"{s['quantizer']} --bits {s['bits']}`; one process, one thread. Checkpoints of the two "
        f"ways bit-identical: {result['identical']}.{_counted(result['rows'])}",
        "",
        "| weights | resident weights (planned) | Fisher s | Fisher peak RSS | planner's figure | "
        "quantize s | quantize peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f, q, p = r["fisher"], r["quantize"], r["plan"]
        how = "streamed (`--stream-weights`)" if r["streamed"] else "loaded whole"
        lines.append(
            f"| {how} | {p['weights_gib']:.2f} GiB | {f['seconds']:.0f} | "
            f"{f['peak_rss_gib']:.2f} GiB | {p['fisher_planned_gib']:.2f} GiB | "
            f"{q['seconds']:.0f} | {q['peak_rss_gib']:.2f} GiB |"
        )
    commits = {st: {r[st].get("commit") for r in result["rows"]} - {None} for st in STAGES}
    if any(commits.values()):
        at = "; ".join(f"{st} at commit {', '.join(sorted(c))}" for st, c in commits.items() if c)
        lines += ["", f"Measured with the code of: {at} (other stages: before commits were noted)."]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__, "streaming", blocks=3)
    p.add_argument("--quantizer", default="kmeans")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="stages to measure; the others keep their results from --json (e.g. after a "
        "change that touches only Fisher collection)",
    )
    run_and_render(p.parse_args(), "streaming", measure, render)


if __name__ == "__main__":
    main()
