"""`rsavq fisher`: collect Fisher statistics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rsavq.cli.common import add_model_args, add_stream_arg, positive_int
from rsavq.config import CALIBRATION_WINDOWS
from rsavq.runtime import resolve_device, resolve_dtype


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fisher",
        help="collect Fisher statistics for quantization",
        description="Kronecker-factored empirical Fisher and mean gradient per "
        "decoder linear layer, from per-sequence backward passes (resumable). Data-parallel "
        "under torchrun: `torchrun --nproc-per-node N -m rsavq.cli fisher ...`.",
    )
    add_model_args(p)
    add_stream_arg(p)
    p.add_argument("--calib", default="c4", help="calibration source (default c4)")
    p.add_argument("--nsamples", type=positive_int, default=CALIBRATION_WINDOWS)
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="stats directory to write (or resume)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="sequences per backward pass (per-sequence gradients stay exact)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=16,
        help="samples between on-disk checkpoints; 0 disables (default 16)",
    )
    p.add_argument(
        "--diag-output",
        action="store_true",
        help="memory mode: keep only diag(F_O) (for very wide layers)",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        help="accumulator memory per rank (e.g. 24GiB): layers are collected in as many passes "
        "over the calibration windows as keep each pass within it (default: one pass)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="float32 passes and per-sequence gradients (default: bfloat16, 1.3x faster on "
        "CPUs with AMX and on GPUs, and float32 where bfloat16 products are slow: AVX2-only "
        "CPUs; their Gram products and sums are float32 either way)",
    )
    p.add_argument("--include-lm-head", action="store_true")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_fisher)


def _cmd_fisher(args: argparse.Namespace) -> int:

    from rsavq.data import load_corpus
    from rsavq.models import load_model, resolve_model
    from rsavq.modules import DEFAULT_SKIP, require_linears, weight_shape
    from rsavq.stats import distributed
    from rsavq.stats.collect import CollectOptions
    from rsavq.stats.memory import parse_bytes, plan_passes, plan_text
    from rsavq.stats.run import CalibrationSpec, collect_model_stats

    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    resolve_model(args.model)
    device = distributed.local_device(resolve_device(args.device))
    distributed.init_from_env(device)
    rank, size = distributed.world()
    dtype = resolve_dtype(args.dtype, device)
    corpus = load_corpus(args.calib, args.data_dir, args.text_field)
    model, tokenizer = load_model(
        args.model, dtype=dtype, device=device, stream=args.stream_weights
    )
    skip = tuple(p for p in DEFAULT_SKIP if not (args.include_lm_head and p == "lm_head"))
    spec = CalibrationSpec(corpus.name, args.nsamples, args.seqlen, args.seed)
    options = CollectOptions(
        args.batch_size,
        args.diag_output,
        args.gradient_checkpointing,
        args.checkpoint_every,
        bf16=not args.fp32,
        memory_budget=budget,
    )
    shapes = {n: weight_shape(m) for n, m in require_linears(model, skip).items()}
    passes = plan_passes(shapes, args.diag_output, budget)  # refused here, before any work
    if rank == 0:
        peak = _expected_peak(model, shapes, passes, args, dtype)
        print(f"plan: {plan_text(passes, shapes, args.diag_output, size, peak)}")
    start = time.perf_counter()
    stats = collect_model_stats(model, tokenizer, args.model, corpus, spec, args.out, options, skip)
    if rank == 0:
        nbytes = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
        ranks = f" on {size} ranks" if size > 1 else ""
        print(
            f"Fisher statistics of {len(stats.layer_names)} layers from {args.nsamples} x "
            f"{args.seqlen} tokens of {corpus.name} in {args.out} ({nbytes / 2**20:.0f} MiB, "
            f"{time.perf_counter() - start:.0f} s{ranks})"
        )
    return 0


def _expected_peak(model, shapes: dict, passes, args: argparse.Namespace, dtype) -> int:
    """`collection_peak` for this process: what it holds now (the runtime and the loaded
    weights), the plan's accumulators, and for streamed weights the largest decoder block."""
    import torch

    from rsavq.modules import decoder_blocks
    from rsavq.stats.memory import collection_peak, fisher_memory, held_bytes, resident_bytes

    size = torch.empty(0, dtype=dtype).element_size()
    memory = fisher_memory(
        list(shapes.values()), args.diag_output, args.seqlen, args.batch_size, size
    )
    block = read = 0
    if args.stream_weights:
        prefix, _ = decoder_blocks(model, shapes)
        blocks: dict[str, int] = {}
        for name, (m, n) in shapes.items():
            if prefix and name.startswith(prefix + "."):
                index = name[len(prefix) + 1 :].split(".")[0]
                blocks[index] = blocks.get(index, 0) + m * n * size
                read = max(read, m * n * size)
        block = max(blocks.values(), default=0)
    held = held_bytes(passes, shapes, args.diag_output)
    return collection_peak(resident_bytes(), held, memory, block, read)
