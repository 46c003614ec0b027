"""Why block-shared codebooks lose: each layer's output error under four codebook scopes.

    python benchmarks/codebook_scope.py --stats DIR  # -> benchmarks/results/codebook-scope.json

For the linears of a few decoder blocks of SmolLM2-135M (FP-model input Hessians `X^T X` from C4
calibration windows; with `--stats`, a Fisher statistics directory of the model, the default's
EDSG and Fisher channel order, else neither), 2-bit OBS assignment with row scales, no refit,
and codebooks:
- `own`: the default's, fitted per block of columns when the OBS pass reaches it (on columns
  that already absorbed the earlier errors);
- `own, fitted first`: one per layer, fitted before the OBS pass on the layer's weights (as the
  shared ones are): the cost of fitting before error feedback;
- `shared`: one for the decoder block's 7 linears, fitted before the OBS pass (what
  `--codebook-scope block` does): the cost of sharing on top;
- `shared, int8, v6`: the same with 4,096-entry int8 codebooks on 6-weight vectors.
Output error: `tr((W - Q) H (W - Q)^T) / tr(W H W^T)`, per layer.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from rsavq.algorithms.rsavq import fit_shared_codebooks, output_error, quantize_layer
from rsavq.config import preset
from rsavq.data import calibration_windows, load_corpus
from rsavq.io import atomic_write_json
from rsavq.models import load_model
from rsavq.modules import find_linears, weight_matrix
from rsavq.stats import load_stats
from rsavq.stats.hessian import input_hessians


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """`tr((W - Q) H (W - Q)^T) / tr(W H W^T)`."""
    return output_error(W, Q, H) / output_error(W, torch.zeros_like(W), H)


def variants(bits: int, fisher: bool) -> dict:
    base = {"refit": False} if fisher else {"lam": 0.0, "refit": False}
    block = {**base, "codebook_scope": "block"}
    return {
        "own": (preset("default", bits, **base), False),
        "own, fitted first": (preset("default", bits, **block), False),
        "shared": (preset("default", bits, **block), True),
        "shared, int8, v6": (
            preset("default", bits, **block, codebook_dtype="int8", vector_length=12 // bits),
            True,
        ),
    }


def block_rows(layers: dict, hessians: dict, bits: int, stats) -> list[dict]:
    weights = {n: weight_matrix(m).detach().float() for n, m in layers.items()}
    fisher = {n: stats.layer(n) if stats is not None else None for n in layers}
    rows = {n: {"layer": n} for n in layers}
    for label, (config, shared) in variants(bits, stats is not None).items():
        books = None
        if shared:
            items = [(weights[n], fisher[n], config, hessians[n]) for n in layers]
            books = fit_shared_codebooks(items, "block", config)
        for n in layers:
            own = books
            if label == "own, fitted first":
                item = (weights[n], fisher[n], config, hessians[n])
                own = fit_shared_codebooks([item], "one", config)
            layer, _ = quantize_layer(weights[n], fisher[n], config, None, hessians[n], own)
            rows[n][label] = relative_output_error(weights[n], layer.dequantize(), hessians[n])
            rows[n][f"{label} bits"] = layer.stored_bits() / weights[n].numel()
    return list(rows.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--blocks", default="0,1,20")
    p.add_argument("--stats", default=None, help="Fisher statistics directory of the model")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default="benchmarks/results/codebook-scope.json")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    stats = load_stats(args.stats) if args.stats else None
    corpus = load_corpus("c4", args.data_dir)
    windows = calibration_windows(tokenizer, corpus, args.nsamples, args.seqlen, 0)
    blocks = {
        b: {f"model.layers.{b}.{n}": m for n, m in find_linears(model.model.layers[b]).items()}
        for b in (int(x) for x in args.blocks.split(","))
    }
    hessians = input_hessians(
        model, {n: m for ls in blocks.values() for n, m in ls.items()}, windows
    )
    rows = []
    for layers in blocks.values():
        rows += block_rows(layers, hessians, args.bits, stats)
        for row in rows[-len(layers) :]:
            print(json.dumps(row))
    labels = list(variants(args.bits, stats is not None))
    summary = {
        label: {
            "mean_output_error": statistics.mean(r[label] for r in rows),
            "mean_bits": statistics.mean(r[f"{label} bits"] for r in rows),
        }
        for label in labels
    }
    print(json.dumps(summary, indent=1))
    calibration = f"c4 {args.nsamples}x{args.seqlen} seed 0"
    result = {"model": args.model, "bits": args.bits, "calibration": calibration, "rows": rows,
              "summary": summary, "fisher": args.stats is not None}  # fmt: skip
    atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
