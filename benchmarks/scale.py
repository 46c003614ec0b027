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

from rsavq.io import atomic_write_json
from rsavq.stats.memory import fisher_memory, layer_bytes, llama_shapes, parse_bytes, plan_passes

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
    peak = int(done.stderr.rsplit("PEAK", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_gib": peak / 2**20, "stdout": done.stdout}


def planner_figure(args) -> dict:
    shapes = dict(enumerate(llama_shapes(args.hidden, args.intermediate, args.blocks)))
    passes = plan_passes(shapes, False, parse_bytes(args.memory_budget))
    held = max(sum(layer_bytes(*shapes[n], False) for n in p) for p in passes)
    memory = fisher_memory(list(shapes.values()), False, args.seqlen, activation_bytes=4)
    weights = (sum(m * n for m, n in shapes.values()) + 2 * 49152 * args.hidden) * 4
    total = weights + held + memory.largest_G + memory.captured_inputs
    return {"passes": len(passes), "accumulators_gib": held / GIB, "weights_gib": weights / GIB,
            "planned_gib": total / GIB}  # fmt: skip


def projection(per_weight_fisher: float, per_weight_quantize: float) -> list[dict]:
    """Seconds per GPU from this CPU's measured seconds per weight, scaled by an assumed
    speed-up (see ASSUMPTIONS), and accumulator memory per rank."""
    rows = []
    for name, (hidden, inter, blocks) in MODELS.items():
        kv = 1024 if name == "70B" else hidden
        shapes = llama_shapes(hidden, inter, blocks, kv)
        weights = sum(m * n for m, n in shapes)
        acc = sum(layer_bytes(m, n, False) for m, n in shapes)
        for gpus in (1, 8, 64):
            seconds = weights * (per_weight_fisher + per_weight_quantize) / SPEEDUP / gpus
            rows.append({"model": name, "gpus": gpus, "hours": seconds / 3600,
                         "accumulators_per_rank_gib": acc / gpus / GIB})  # fmt: skip
    return rows


SPEEDUP = 200.0  # one H100 against one core of this CPU (fp32 GEMMs ~50 TFLOP/s vs ~0.25)
ASSUMPTIONS = (
    "time scales with the number of weights (per-weight cost measured here on the 7B-shaped "
    "block, with these calibration tokens), one GPU = 200 of these CPU cores, ranks split "
    "the work perfectly (measured 1 -> 2 rank ratio beside it); accumulators: the whole "
    "model's F_O, F_I, g in fp32 split evenly over the ranks (reduced to owners)"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--hidden", type=int, default=4096, help="4096: LLaMA-7B; less: a smoke test")
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--memory-budget", default="1.5GiB")
    p.add_argument("--bits", default="2")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--json", default="benchmarks/results/scale.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rsavq-scale-"))
    model = work / "model"
    build_model(model, args.blocks, args.hidden, args.intermediate)
    common = ["--model", str(model), "--calib", "c4", "--data-dir", args.data_dir, "--nsamples",
              str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu"]  # fmt: skip
    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        stats, out = work / f"stats-{ranks}", work / f"q-{ranks}"
        fisher = run_ranks(ranks, ["fisher", *common, "--memory-budget", args.memory_budget,
                                   "--checkpoint-every", "0", "--out", str(stats)])  # fmt: skip
        first = work / f"stats-{rows[0]['ranks']}" if rows else stats  # the same input for all
        quant = run_ranks(ranks, ["quantize", *common, "--stats", str(first), "--bits", args.bits,
                                  "--finetune", "none", "--out", str(out)])  # fmt: skip
        rows.append({"ranks": ranks, "fisher": fisher, "quantize": quant})
        peak = fisher["peak_rss_gib"]
        print(f"{ranks} rank(s): fisher {fisher['seconds']:.0f} s (peak {peak:.2f} GiB), "
              f"quantize {quant['seconds']:.0f} s", flush=True)  # fmt: skip
    from safetensors.torch import load_file

    tensors = [load_file(work / f"q-{r['ranks']}" / "model.safetensors") for r in rows]
    identical = all(torch.equal(tensors[0][k], t[k]) for t in tensors[1:] for k in tensors[0])
    plan = planner_figure(args)
    weights = sum(m * n for m, n in llama_shapes(args.hidden, args.intermediate, args.blocks))
    first = rows[0]
    table = projection(first["fisher"]["seconds"] / weights, first["quantize"]["seconds"] / weights)
    result = {"settings": vars(args), "rows": rows, "plan": plan, "identical": identical,
              "projection": table, "assumptions": ASSUMPTIONS}  # fmt: skip
    for r in rows:
        for stage in ("fisher", "quantize"):
            r[stage].pop("stdout")
    atomic_write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "projection"}, indent=1))


if __name__ == "__main__":
    main()
