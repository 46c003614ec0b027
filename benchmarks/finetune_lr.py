"""Block fine-tuning learning rates on one real block (how `BlockTuning`'s defaults were chosen).

    python benchmarks/finetune_lr.py --bits 2 --block 3 --lrs 1e-4,1e-3,3e-3,1e-2 --epochs 2

Quantizes decoder block `--block` of SmolLM2-135M with the default preset (lambda 0: no Fisher
statistics needed) on inputs from the FP prefix (C4, 64 x 512, seed 0), then fine-tunes it
from the same start with each learning rate; prints and writes the relative MSE to the FP
block's outputs before and after, and the seconds each took.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from rsavq.config import preset
from rsavq.data import calibration_windows, load_corpus
from rsavq.finetune import BlockTuning, tune_block
from rsavq.io import atomic_write_json
from rsavq.methods import method_for
from rsavq.models import load_model
from rsavq.modules import find_linears
from rsavq.stats.sequential import block_hessians, capture_inputs, hidden_of, run_block

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--lrs", default="1e-4,1e-3,3e-3,1e-2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast while training")
    p.add_argument("--data-dir", default=os.environ.get("RSAVQ_DATA_DIR") or str(DEFAULT_DATA))
    p.add_argument("--json", default="benchmarks/results/finetune-lr.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    windows = calibration_windows(tokenizer, load_corpus("c4", args.data_dir), 64, 512, 0)
    blocks = model.model.layers
    inputs = capture_inputs(model, blocks[0], windows, BlockTuning.micro_batch)  # a step each
    for block in blocks[: args.block]:
        inputs = run_block(block, inputs)
    block = blocks[args.block]
    targets = [hidden_of(*batch) for batch in run_block(block, inputs)]
    layers = find_linears(block)
    hessians = block_hessians(block, layers, inputs)
    config = preset("default", args.bits, lam=0.0)
    method = method_for(config)
    for name, layer in layers.items():
        method.quantize(config, layer, None, hessians[name])[0].install(block, name, layer)
    start = copy.deepcopy(block.state_dict())
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        block.load_state_dict(start)
        tuning = BlockTuning(args.epochs, lr, bf16=args.bf16)
        rows.append({"lr": lr, **tune_block(block, inputs, targets, tuning, args.block)})
        r = rows[-1]
        print(
            f"lr {lr:g}: relative MSE {r['before']:.4f} -> {r['after']:.4f} ({r['seconds']:.0f} s)"
        )
    atomic_write_json(args.json, {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
