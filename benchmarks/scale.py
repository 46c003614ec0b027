"""Scale: a LLaMA-7B-shaped model (random weights, a few decoder blocks) collected under a memory
budget and quantized with 1 and 2 ranks through torchrun, on this machine.

    python benchmarks/scale.py --blocks 1 --nsamples 4 --seqlen 128 --memory-budget 1.5GiB \
        --ranks 1,2 --json benchmarks/results/scale.json

For each rank count: `rsavq fisher` (data-parallel, in as many passes as the budget asks) then
`rsavq quantize --stats` (layer-parallel), each under `torchrun --nproc-per-node R`, timed, with
the peak RSS of the largest rank (`getrusage(RUSAGE_CHILDREN)` of the launcher's process tree).
The planner's figure beside it: the model's fp32 weights, the largest pass's accumulators, the
largest per-sequence gradient and the captured layer inputs (`rsavq.stats.memory`). Then the
projection table for 7B / 13B / 70B on 1, 8 and 64 GPUs, from the measured per-layer costs
scaled by weights (assumptions printed with it). Every rank count quantizes from the first
one's statistics, and the checkpoints are checked bit-identical (the statistics of different
rank counts agree to float rounding only: sums in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsavq.io import atomic_write_json, rewrite_block
from rsavq.stats.memory import (
    collection_peak,
    fisher_memory,
    held_bytes,
    layer_bytes,
    llama_shapes,
    parse_bytes,
    plan_passes,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GIB = 2**30
MODELS = {  # hidden, intermediate, blocks
    "7B": (4096, 11008, 32),
    "13B": (5120, 13824, 40),
    "70B": (8192, 28672, 80),  # grouped-query attention: k/v are 1024 wide
}


def build_model(path: Path, blocks: int, hidden: int, intermediate: int) -> None:
    """A LLaMA-7B-shaped model with random weights and SmolLM2's tokenizer (its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsavq.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=blocks, num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# runs a command and prints the peak RSS (KiB) of its largest descendant, on a fresh account
PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_ranks(ranks: int, command: list[str]) -> dict:
    """One `torchrun` run; seconds and the peak RSS of its largest process."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *launcher, "-m", "rsavq.cli", *command],
                          env=env, text=True, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[0]} with {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    peak = peak_kib(done.stderr) / 2**20
    return {"seconds": seconds, "peak_rss_gib": peak, "stdout": done.stdout}


def peak_kib(stderr: str) -> int:
    """The peak RSS (KiB) that `PEAK` printed."""
    return int(stderr.rsplit("PEAK", 1)[1].split()[0])


def planner_figure(args) -> dict:
    shapes = dict(enumerate(llama_shapes(args.hidden, args.intermediate, args.blocks)))
    passes = plan_passes(shapes, False, parse_bytes(args.memory_budget))
    held = held_bytes(passes, shapes, False)
    memory = fisher_memory(list(shapes.values()), False, args.seqlen, activation_bytes=4)
    weights = (sum(m * n for m, n in shapes.values()) + 2 * 49152 * args.hidden) * 4
    total = collection_peak(weights, held, memory)
    return {"passes": len(passes), "accumulators_gib": held / GIB, "weights_gib": weights / GIB,
            "planned_gib": total / GIB}  # fmt: skip


def gram_work(shapes) -> int:
    """Per calibration sequence, the Fisher Gram products' size: sum of m^2 n + n^2 m."""
    return sum(m * m * n + n * n * m for m, n in shapes)


def projection(result: dict, nsamples: int = 128) -> list[dict]:
    """Work for 7B / 13B / 70B from this run's first row: Fisher seconds per unit of Gram work
    and sequence (times `nsamples` sequences), quantization seconds per weight; then per GPU
    (see ASSUMPTIONS), and accumulator memory per rank."""
    settings, first = result["settings"], result["rows"][0]
    measured = llama_shapes(settings["hidden"], settings["intermediate"], settings["blocks"])
    fisher_rate = first["fisher"]["seconds"] / (gram_work(measured) * settings["nsamples"])
    quant_rate = first["quantize"]["seconds"] / sum(m * n for m, n in measured)
    rows = []
    for name, (hidden, inter, blocks) in MODELS.items():
        kv = 1024 if name == "70B" else hidden
        shapes = llama_shapes(hidden, inter, blocks, kv)
        core_hours = (gram_work(shapes) * nsamples * fisher_rate
                      + sum(m * n for m, n in shapes) * quant_rate) / 3600  # fmt: skip
        acc = sum(layer_bytes(m, n, False) for m, n in shapes)
        for gpus in (1, 8, 64):
            rows.append({"model": name, "gpus": gpus, "cpu_core_hours": core_hours,
                         "gpu_hours_per_rank": core_hours / SPEEDUP / gpus,
                         "accumulators_per_rank_gib": acc / gpus / GIB})  # fmt: skip
    return rows


SPEEDUP = 200.0  # one GPU against one core of this CPU (an assumption, see ASSUMPTIONS)
ASSUMPTIONS = (
    "Fisher time scales with sequences x sum(m^2 n + n^2 m) (its Gram products), quantization "
    "time with the number of weights, both at the rates measured here on the 7B-shaped block "
    "(1 rank, a loaded core); 128 calibration sequences; one GPU does the work of 200 of these "
    "cores (fp32 GEMMs: ~50 TFLOP/s against ~0.25); ranks split the work perfectly (the "
    "measured 1 -> 2 rank ratios are beside it); accumulators: the whole model's F_O, F_I, g in "
    "fp32, split evenly over the ranks (each layer reduced to one owner)"
)


def render(result: dict) -> str:
    """The BENCHMARKS.md tables of a run."""
    settings, plan = result["settings"], result["plan"]
    lines = [
        f"LLaMA-7B-shaped model (hidden 4096, intermediate 11008, random weights), "
        f"{settings['blocks']} decoder block(s); calibration {settings['nsamples']} x "
        f"{settings['seqlen']} tokens of C4; memory budget {settings['memory_budget']} "
        f"({plan['passes']} passes); {settings['bits']}-bit default, no fine-tuning; checkpoints "
        f"for every rank count bit-identical: {result['identical']}.",
        "",
        "| ranks | Fisher s | Fisher peak RSS (largest rank) | planner's figure | quantize s | "
        "quantize peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f, q = r["fisher"], r["quantize"]
        lines.append(
            f"| {r['ranks']} | {f['seconds']:.0f} | {f['peak_rss_gib']:.2f} GiB | "
            f"{plan['planned_gib']:.2f} GiB | {q['seconds']:.0f} | {q['peak_rss_gib']:.2f} GiB |"
        )
    lines += ["", "| model | GPUs | CPU core-hours (measured rates) | GPU-hours per rank | "
              "Fisher accumulators per rank |", "|---|---|---|---|---|"]  # fmt: skip
    for r in projection(result):
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['cpu_core_hours']:.0f} | "
            f"{r['gpu_hours_per_rank']:.3f} | {r['accumulators_per_rank_gib']:.1f} GiB |"
        )
    return "\n".join(lines + ["", f"Assumptions: {ASSUMPTIONS}."])


def measure(args: argparse.Namespace, work: Path) -> dict:
    model = work / "model"
    build_model(model, args.blocks, args.hidden, args.intermediate)
    common = cli_common(args, model)
    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        stats, out = work / f"stats-{ranks}", work / f"q-{ranks}"
        fisher = run_ranks(ranks, ["fisher", *common, "--memory-budget", args.memory_budget,
                                   "--checkpoint-every", "0", "--out", str(stats)])  # fmt: skip
        first = work / f"stats-{rows[0]['ranks']}" if rows else stats  # the same input for all
        quant = run_ranks(ranks, ["quantize", *common, "--stats", str(first), "--bits", args.bits,
                                  "--finetune", "none", "--out", str(out)])  # fmt: skip
        for stage in (fisher, quant):
            stage.pop("stdout")
        rows.append({"ranks": ranks, "fisher": fisher, "quantize": quant})
        peak = fisher["peak_rss_gib"]
        print(f"{ranks} rank(s): fisher {fisher['seconds']:.0f} s (peak {peak:.2f} GiB), "
              f"quantize {quant['seconds']:.0f} s", flush=True)  # fmt: skip
    from safetensors.torch import load_file

    tensors = [load_file(work / f"q-{r['ranks']}" / "model.safetensors") for r in rows]
    identical = all(torch.equal(tensors[0][k], t[k]) for t in tensors[1:] for k in tensors[0])
    return {"settings": settings_of(args), "rows": rows, "plan": planner_figure(args),
            "identical": identical}  # fmt: skip


def cli_common(args: argparse.Namespace, model: Path) -> list[str]:
    """The `rsavq` arguments every command of a run shares: model, calibration, CPU."""
    return ["--model", str(model), "--calib", "c4", "--data-dir", args.data_dir, "--nsamples",
            str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu"]  # fmt: skip


def settings_of(args: argparse.Namespace) -> dict:
    """A run's settings as recorded in its JSON (not where the results go)."""
    return {k: v for k, v in vars(args).items() if k not in ("json", "table_only", "markdown")}


def parser(doc: str, name: str, blocks: int) -> argparse.ArgumentParser:
    """The options this benchmark and `streaming.py` share (`name`: the JSON's and the
    BENCHMARKS.md block's name)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--blocks", type=int, default=blocks)
    p.add_argument("--hidden", type=int, default=4096, help="4096: LLaMA-7B; less: a smoke test")
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--memory-budget", default="1.5GiB")
    p.add_argument("--bits", default="2")
    p.add_argument("--data-dir", default=os.environ.get("RSAVQ_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument("--json", default=f"benchmarks/results/{name}.json")
    p.add_argument("--table-only", action="store_true", help="rewrite the tables from --json")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    return p


def run_and_render(args: argparse.Namespace, name: str, measure, render) -> None:
    """Measure (unless --table-only) into --json, then write its tables into the `name` block
    of --markdown and print them."""
    if not args.table_only:
        with tempfile.TemporaryDirectory(prefix=f"rsavq-{name}-") as work:
            atomic_write_json(args.json, measure(args, Path(work)))
    table = render(json.loads(Path(args.json).read_text()))
    rewrite_block(args.markdown, name, table)
    print(table)


def main() -> None:
    p = parser(__doc__, "scale", blocks=1)
    p.add_argument("--ranks", default="1,2")
    run_and_render(p.parse_args(), "scale", measure, render)


if __name__ == "__main__":
    main()
