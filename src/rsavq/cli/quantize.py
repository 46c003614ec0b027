"""`rsavq quantize`: RSAVQ and the baselines, end to end."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rsavq.cli.common import add_model_args, positive_int
from rsavq.errors import UsageError
from rsavq.runtime import resolve_device, resolve_dtype

METHODS = ("rsavq", "kmeans", "gptq", "rtn")


def add_parser(sub) -> None:
    from rsavq.config import (
        Allocation,
        ChannelAxis,
        Compensation,
        EdsgSign,
        LambdaMode,
        Metric,
        RSAVQConfig,
    )

    d = RSAVQConfig()
    p = sub.add_parser(
        "quantize",
        help="quantize a model with RSAVQ (or a baseline)",
        description="Fisher statistics (computed or reused), then WCSG + EDSG + "
        "product VQ layer by layer (resumable); writes a checkpoint and a report. "
        "--method picks a baseline instead: kmeans (plain product VQ: no EDSG, no WCSG), "
        "gptq or rtn (scalar, asymmetric, groups of --group-size).",
    )
    add_model_args(p)
    p.add_argument("--bits", type=float, required=True, help="average bits per weight (2, 3, 4)")
    p.add_argument("--method", choices=METHODS, default="rsavq")
    p.add_argument("--group-size", type=positive_int, default=128, help="gptq/rtn group size")
    p.add_argument("--no-act-order", action="store_true", help="gptq: natural column order")
    p.add_argument(
        "--compensation",
        choices=[e.value for e in Compensation],
        default=d.compensation.value,
        help="rsavq/kmeans: OBS error feedback across vectors, with F_I (fisher) or the "
        "input Hessian X^T X (hessian) -- an extension, not in the paper",
    )
    p.add_argument("--out", required=True, help="checkpoint directory (new, or to resume)")
    p.add_argument(
        "--stats",
        default=None,
        help="Fisher stats directory to reuse or fill (default: a cache entry "
        "keyed by model and calibration settings)",
    )
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=positive_int, default=128)
    p.add_argument("--seqlen", type=positive_int, default=512)
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
    p.add_argument("--groups", type=positive_int, default=d.groups)
    p.add_argument("--uniform-bits", action="store_true", help="every group at --bits (no WCSG)")
    p.add_argument("--vector-length", type=positive_int, default=d.vector_length)
    p.add_argument("--sub-vectors", type=positive_int, default=d.sub_vectors)
    p.add_argument("--metric", choices=[e.value for e in Metric], default=d.metric.value)
    p.add_argument(
        "--allocation", choices=[e.value for e in Allocation], default=d.allocation.value
    )
    p.add_argument(
        "--channel-axis", choices=[e.value for e in ChannelAxis], default=d.channel_axis.value
    )
    p.add_argument("--kmeans-iters", type=positive_int, default=d.kmeans_iters)
    p.add_argument("--kmeans-tol", type=float, default=d.kmeans_tol)
    p.add_argument("--damping", type=float, default=d.damping)
    p.add_argument(
        "--skip",
        default=",".join(d.skip),
        help=f"comma-separated fnmatch patterns of layers left unquantized ({','.join(d.skip)})",
    )
    p.add_argument(
        "--budget",
        choices=["codes", "stored"],
        default="stored" if d.budget_includes_overhead else "codes",
        help="what --bits limits: code bits only (the paper's count; codebooks and permutation "
        "are reported on top) or every stored bit",
    )
    p.add_argument(
        "--eval",
        default=None,
        help="after quantizing, compare FP and quantized "
        "perplexity on this source (e.g. wikitext2)",
    )
    p.add_argument("--eval-limit", type=positive_int, default=8)
    p.add_argument("--eval-seqlen", type=positive_int, default=2048)
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_cmd_quantize)


def _config_from_args(args: argparse.Namespace):
    from rsavq.config import RSAVQConfig, ScalarConfig

    skip = tuple(p for p in args.skip.split(",") if p)
    if args.method in ("gptq", "rtn"):
        if args.bits != int(args.bits):
            raise UsageError(f"--method {args.method} needs whole --bits, not {args.bits}")
        return ScalarConfig(
            args.method, int(args.bits), args.group_size, not args.no_act_order, args.damping, skip
        )
    if args.method == "kmeans":  # plain product VQ: one group, uniform bits, no EDSG
        args.groups, args.uniform_bits, args.lam, args.metric = 1, True, 0.0, "euclidean"
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
            "budget_includes_overhead": args.budget == "stored",
            "kmeans_iters": args.kmeans_iters,
            "kmeans_tol": args.kmeans_tol,
            "damping": args.damping,
            "seed": args.seed,
            "compensation": args.compensation,
            "skip": skip,
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
    hessians, spec = _hessians_for(model, tokenizer, calib, args, config)
    start = time.perf_counter()
    records = quantize_model(
        model, config, stats, args.out, tokenizer, hessians=hessians, calibration=spec
    )
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
            f"FP {before.ppl:.3f} -> {args.method} {after.ppl:.3f}"
        )
    return 0


def _quick_ppl(model, tokenizer, corpus, args):
    from rsavq.data import evaluation_windows
    from rsavq.eval import perplexity

    windows = evaluation_windows(tokenizer, corpus, args.eval_seqlen, args.eval_limit)
    return perplexity(model, windows, corpus.name)


def _stats_for(model, tokenizer, calib, args, skip):
    from rsavq.stats import load_stats
    from rsavq.stats.artifact import MANIFEST
    from rsavq.stats.collect import CollectOptions
    from rsavq.stats.run import CalibrationSpec, collect_model_stats, default_stats_dir

    spec = CalibrationSpec(calib.name, args.nsamples, args.seqlen, args.seed)
    root = Path(args.stats) if args.stats else default_stats_dir(model, spec)
    if (root / MANIFEST).exists():
        print(f"reusing Fisher statistics in {root}")
        return load_stats(root)
    print(
        f"collecting Fisher statistics into {root} ({args.nsamples} x {args.seqlen} tokens "
        f"of {calib.name})"
    )
    options = CollectOptions(checkpoint_every=16)
    return collect_model_stats(model, tokenizer, args.model, calib, spec, root, options, skip)


def _hessians_for(model, tokenizer, calib, args, config):
    """Input Hessians on the calibration windows when the method needs them (not cached:
    one forward pass per window)."""
    if not config.needs_hessian:
        return None, None
    from rsavq.data import calibration_windows
    from rsavq.modules import find_linears
    from rsavq.stats.hessian import input_hessians

    spec = {"source": calib.name, "nsamples": args.nsamples, "seqlen": args.seqlen}
    spec["seed"] = args.seed
    print(f"collecting input Hessians ({args.nsamples} x {args.seqlen} tokens of {calib.name})")
    windows = calibration_windows(tokenizer, calib, args.nsamples, args.seqlen, args.seed)
    return input_hessians(model, find_linears(model, config.skip), windows), spec
