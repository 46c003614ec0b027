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
    p.add_argument(
        "--fast-gram",
        action="store_true",
        help="bf16 Gram products with fp32 accumulation (faster; ~0.3%% per-sample rounding)",
    )
    p.add_argument("--include-lm-head", action="store_true")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_fisher)


def _cmd_fisher(args: argparse.Namespace) -> int:
    import torch

    from rsavq.data import load_corpus
    from rsavq.models import load_model, resolve_model
    from rsavq.modules import DEFAULT_SKIP
    from rsavq.stats.collect import CollectOptions
    from rsavq.stats.run import CalibrationSpec, collect_model_stats

    resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    corpus = load_corpus(args.calib, args.data_dir, args.text_field)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    skip = tuple(p for p in DEFAULT_SKIP if not (args.include_lm_head and p == "lm_head"))
    spec = CalibrationSpec(corpus.name, args.nsamples, args.seqlen, args.seed)
    options = CollectOptions(
        args.batch_size,
        args.diag_output,
        args.gradient_checkpointing,
        args.checkpoint_every,
        gram_dtype=torch.bfloat16 if args.fast_gram else torch.float32,
    )
    start = time.perf_counter()
    stats = collect_model_stats(model, tokenizer, args.model, corpus, spec, args.out, options, skip)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
    print(
        f"Fisher statistics of {len(stats.layer_names)} layers from {args.nsamples} x "
        f"{args.seqlen} tokens of {corpus.name} in {args.out} ({size / 2**20:.0f} MiB, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 0


def _add_quantize_parser(sub) -> None:
    from rsavq.config import Allocation, ChannelAxis, EdsgSign, LambdaMode, Metric, RSAVQConfig

    d = RSAVQConfig()
    p = sub.add_parser(
        "quantize",
        help="quantize a model with RSAVQ",
        description="Fisher statistics (computed or reused), then WCSG + EDSG + "
        "product VQ layer by layer (resumable); writes a checkpoint and a report.",
    )
    _add_model_args(p)
    p.add_argument("--bits", type=float, required=True, help="average bits per weight (2, 3, 4)")
    p.add_argument("--out", required=True, help="checkpoint directory (new, or to resume)")
    p.add_argument(
        "--stats",
        default=None,
        help="Fisher stats directory to reuse or fill (default: a cache entry "
        "keyed by model and calibration settings)",
    )
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam)
    p.add_argument(
        "--lambda-mode", choices=[e.value for e in LambdaMode], default=d.lambda_mode.value
    )
    p.add_argument(
        "--edsg-sign",
        choices=[e.value for e in EdsgSign],
        default=d.edsg_sign.value,
        help=argparse.SUPPRESS,
    )
    p.add_argument("--groups", type=_positive_int, default=d.groups)
    p.add_argument("--uniform-bits", action="store_true", help="every group at --bits (no WCSG)")
    p.add_argument("--vector-length", type=_positive_int, default=d.vector_length)
    p.add_argument("--sub-vectors", type=_positive_int, default=d.sub_vectors)
    p.add_argument("--metric", choices=[e.value for e in Metric], default=d.metric.value)
    p.add_argument(
        "--allocation", choices=[e.value for e in Allocation], default=d.allocation.value
    )
    p.add_argument(
        "--channel-axis", choices=[e.value for e in ChannelAxis], default=d.channel_axis.value
    )
    p.add_argument("--kmeans-iters", type=_positive_int, default=d.kmeans_iters)
    p.add_argument("--kmeans-tol", type=float, default=d.kmeans_tol)
    p.add_argument("--damping", type=float, default=d.damping)
    p.add_argument(
        "--skip",
        default=",".join(d.skip),
        help=f"comma-separated fnmatch patterns of layers left unquantized ({','.join(d.skip)})",
    )
    p.add_argument(
        "--codes-only-budget",
        action="store_true",
        help="count only code bits against --bits (codebooks/perm reported on top)",
    )
    p.add_argument(
        "--eval",
        default=None,
        help="after quantizing, compare FP and quantized "
        "perplexity on this source (e.g. wikitext2)",
    )
    p.add_argument("--eval-limit", type=_positive_int, default=8)
    p.add_argument("--eval-seqlen", type=_positive_int, default=2048)
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_quantize)


def _config_from_args(args: argparse.Namespace):
    from rsavq.config import RSAVQConfig

    return RSAVQConfig.from_dict(
        {
            "bits": args.bits,
            "vector_length": args.vector_length,
            "sub_vectors": args.sub_vectors,
            "groups": args.groups,
            "lam": args.lam,
            "lambda_mode": args.lambda_mode,
            "edsg_sign": args.edsg_sign,
            "metric": args.metric,
            "allocation": args.allocation,
            "channel_axis": args.channel_axis,
            "uniform_bits": args.uniform_bits,
            "budget_includes_overhead": not args.codes_only_budget,
            "kmeans_iters": args.kmeans_iters,
            "kmeans_tol": args.kmeans_tol,
            "damping": args.damping,
            "seed": args.seed,
            "skip": [p for p in args.skip.split(",") if p],
        }
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rsavq.data import load_corpus
    from rsavq.models import load_model, resolve_model
    from rsavq.pipeline import check_output_dir, quantize_model, summarize

    config = _config_from_args(args)
    check_output_dir(Path(args.out))
    resolve_model(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    calib = load_corpus(args.calib, args.data_dir, args.text_field)
    evaluation = load_corpus(args.eval, args.data_dir, args.text_field) if args.eval else None
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    before = _quick_ppl(model, tokenizer, evaluation, args) if evaluation else None
    stats = _stats_for(model, tokenizer, calib, args, config.skip) if config.needs_stats else None
    start = time.perf_counter()
    records = quantize_model(model, config, stats, args.out, tokenizer)
    summary = summarize(records)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(
        f"quantized {summary['layers']} layers to {summary['bits_per_weight']:.4f} bits/weight "
        f"(stored, codebooks and permutations included) in {time.perf_counter() - start:.0f} s;"
        f" checkpoint {args.out}: {size / 2**20:.1f} MiB"
    )
    if evaluation is not None:
        after = _quick_ppl(model, tokenizer, evaluation, args)
        print(
            f"{evaluation.name} PPL over {after.windows} windows x {after.seqlen}: "
            f"FP {before.ppl:.3f} -> RSAVQ {after.ppl:.3f}"
        )
    return 0


def _quick_ppl(model, tokenizer, corpus, args):
    from rsavq.data import evaluation_windows
    from rsavq.eval import perplexity

    windows = evaluation_windows(tokenizer, corpus, args.eval_seqlen, args.eval_limit)
    return perplexity(model, windows, corpus.name)


def _stats_for(model, tokenizer, calib, args, skip):
    from rsavq.stats import load_stats
    from rsavq.stats.artifact import MANIFEST, config_hash
    from rsavq.stats.collect import CollectOptions
    from rsavq.stats.run import CalibrationSpec, collect_model_stats

    spec = CalibrationSpec(calib.name, args.nsamples, args.seqlen, args.seed)
    root = Path(args.stats) if args.stats else _stats_cache(config_hash(model.config), spec)
    if (root / MANIFEST).exists():
        print(f"reusing Fisher statistics in {root}")
        return load_stats(root)
    print(
        f"collecting Fisher statistics into {root} ({args.nsamples} x {args.seqlen} tokens "
        f"of {calib.name})"
    )
    options = CollectOptions(checkpoint_every=16)
    return collect_model_stats(model, tokenizer, args.model, calib, spec, root, options, skip)


def _stats_cache(model_hash: str, spec) -> Path:
    import hashlib
    import json

    from rsavq.models import cache_dir

    key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "fisher" / f"{model_hash}-{key}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsavq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rsavq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_eval_parser(sub)
    _add_fisher_parser(sub)
    _add_quantize_parser(sub)
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
