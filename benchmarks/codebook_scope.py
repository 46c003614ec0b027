"""Why block-shared codebooks lose: each layer's output error under four codebook scopes.

    python benchmarks/codebook_scope.py --blocks 3,15,27  # benchmarks/results/codebook-scope.json

For the linears of a few decoder blocks of SmolLM2-135M (FP-model input Hessians `X^T X` from C4
calibration windows; no EDSG and no channel sort, so only the codebooks differ), 2-bit OBS
assignment with row scales, no refit, and codebooks:
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

from rsavq.algorithms.rsavq import fit_shared_codebooks, quantize_layer
from rsavq.config import preset
from rsavq.data import calibration_windows, load_corpus
from rsavq.io import atomic_write_json
from rsavq.models import load_model
from rsavq.modules import find_linears, weight_matrix
from rsavq.stats.hessian import input_hessians


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - Q).double()
    return (
        torch.trace(E @ H.double() @ E.T) / torch.trace(W.double() @ H.double() @ W.T.double())
    ).item()


def variants(bits: int) -> dict:
    base = {"lam": 0.0, "refit": False}
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


def block_rows(layers: dict, hessians: dict, bits: int) -> list[dict]:
    weights = {n: weight_matrix(m).detach().float() for n, m in layers.items()}
    rows = {n: {"layer": n} for n in layers}
    for label, (config, shared) in variants(bits).items():
        books = None
        if shared:
            items = [(weights[n], None, config, hessians[n]) for n in layers]
            books = fit_shared_codebooks(items, "block", config)
        for n in layers:
            own = books
            if label == "own, fitted first":
                own = fit_shared_codebooks([(weights[n], None, config, hessians[n])], "one", config)
            layer, _ = quantize_layer(weights[n], None, config, None, hessians[n], own)
            rows[n][label] = output_error(weights[n], layer.dequantize(), hessians[n])
            rows[n][f"{label} bits"] = layer.stored_bits() / weights[n].numel()
    return list(rows.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--blocks", default="3,15,27")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default="benchmarks/results/codebook-scope.json")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
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
        rows += block_rows(layers, hessians, args.bits)
        for row in rows[-len(layers) :]:
            print(json.dumps(row))
    labels = list(variants(args.bits))
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
              "summary": summary}  # fmt: skip
    atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
