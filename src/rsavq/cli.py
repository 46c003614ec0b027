"""The `rsavq` command line. Only this module prints."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rsavq import __version__
from rsavq.errors import RsavqError, UsageError
from rsavq.runtime import resolve_device, resolve_dtype

logger = logging.getLogger("rsavq")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="HF directory, .gguf file, hub id, or alias smollm2-135m"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="local data directory (default: $RSAVQ_DATA_DIR, else the hub)",
    )


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model's perplexity",
        description="Perplexity over non-overlapping windows (EVALUATION.md).",
    )
    _add_model_args(p)
    p.add_argument(
        "--ppl",
        default="wikitext2",
        help="comma-separated sources: wikitext2, c4, ptb, name:split, or file paths",
    )
    p.add_argument("--seqlen", type=_positive_int, default=2048)
    p.add_argument("--limit", type=_positive_int, default=None, help="first N windows only")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--text-field", default="text", help="field/column of .jsonl/.parquet files")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rsavq.data import evaluation_windows, load_corpus
    from rsavq.eval import perplexity
    from rsavq.io import atomic_write_json
    from rsavq.models import load_model, resolve_model

    resolve_model(args.model)  # cheap: a bad --model fails before any data is read
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    corpora = [load_corpus(s, args.data_dir, args.text_field) for s in args.ppl.split(",") if s]
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    results = []
    for corpus in corpora:
        windows = evaluation_windows(tokenizer, corpus, args.seqlen, args.limit)
        result = perplexity(model, windows, corpus.name, args.batch_size)
        results.append(result)
        print(
            f"{corpus.name}: PPL {result.ppl:.4f} over {result.windows} windows x "
            f"{result.seqlen} tokens ({result.tokens_per_second:.0f} tokens/s, "
            f"{result.seconds:.1f} s, {args.dtype} on {device})"
        )
    if args.json:
        record = {
            "model": args.model,
            "dtype": args.dtype,
            "device": str(device),
            "version": __version__,
            "perplexity": [r.to_dict() for r in results],
        }
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _add_fisher_parser(sub) -> None:
    p = sub.add_parser(
        "fisher",
        help="collect Fisher statistics for quantization",
        description="Kronecker-factored empirical Fisher and mean gradient per "
        "decoder linear layer, from per-sequence backward passes (resumable).",
    )
    _add_model_args(p)
    p.add_argument("--calib", default="c4", help="calibration source (default c4)")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="stats directory to write (or resume)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
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
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--include-lm-head", action="store_true")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_fisher)


def _cmd_fisher(args: argparse.Namespace) -> int:
    from rsavq.data import calibration_windows, load_corpus
    from rsavq.models import load_model, resolve_model
    from rsavq.modules import DEFAULT_SKIP, find_linears
    from rsavq.stats.collect import CollectOptions
    from rsavq.stats.run import CalibrationSpec, fisher_stats

    resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    corpus = load_corpus(args.calib, args.data_dir, args.text_field)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    windows = calibration_windows(tokenizer, corpus, args.nsamples, args.seqlen, args.seed)
    skip = tuple(p for p in DEFAULT_SKIP if not (args.include_lm_head and p == "lm_head"))
    layers = find_linears(model, skip)
    spec = CalibrationSpec(corpus.name, args.nsamples, args.seqlen, args.seed)
    options = CollectOptions(
        args.batch_size, args.diag_output, args.gradient_checkpointing, args.checkpoint_every
    )
    start = time.perf_counter()
    stats = fisher_stats(model, args.model, windows, layers, args.out, spec, options)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
    print(
        f"Fisher statistics of {len(stats.layer_names)} layers from {args.nsamples} x "
        f"{args.seqlen} tokens of {corpus.name} in {args.out} ({size / 2**20:.0f} MiB, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsavq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rsavq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_eval_parser(sub)
    _add_fisher_parser(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"rsavq: error: {exc}", file=sys.stderr)
        return 2
    except RsavqError as exc:
        print(f"rsavq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rsavq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
