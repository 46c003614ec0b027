"""`rsavq quantize`: RSAVQ and the baselines, end to end."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rsavq.cli.common import add_model_args, add_stream_arg, non_negative_int, positive_int
from rsavq.clock import StageClock, format_clock, timed, using
from rsavq.config import default_windows, describe_default
from rsavq.errors import UsageError
from rsavq.runtime import resolve_device, resolve_dtype

METHODS = ("rsavq", "kmeans", "gptq", "rtn")  # rsavq.methods.METHODS, without importing it


def add_parser(sub) -> None:
    from rsavq.api import Calibration
    from rsavq.config import (
        PRESETS,
        Allocation,
        ChannelOrder,
        CodebookDtype,
        Compensation,
        EdsgSign,
        Metric,
    )
    from rsavq.distill import Distillation
    from rsavq.finetune import BlockTuning

    p = sub.add_parser(
        "quantize",
        help="quantize a model with RSAVQ (or a baseline)",
        description="Fisher statistics (computed or reused), then block by block: input "
        "Hessians from the quantized prefix, WCSG groups, EDSG target, product VQ with OBS "
        "assignment and refit (resumable); writes a checkpoint and a report. --preset picks a "
        "named configuration (options given on top override it); --method picks a baseline: "
        "kmeans (plain product VQ), gptq or rtn (scalar, asymmetric, groups of --group-size).",
    )
    b = p.add_argument_group("basic")
    add_model_args(b)
    b.add_argument("--bits", type=float, required=True, help="average bits per weight (2, 3, 4)")
    b.add_argument("--out", required=True, help="checkpoint directory (new, or to resume)")
    b.add_argument("--method", choices=METHODS, default="rsavq")
    b.add_argument(
        "--preset", choices=PRESETS, default="default", help="rsavq configuration to start from"
    )
    b.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: $OMP_NUM_THREADS if set, else one per core); fewer when "
        "other busy processes share the cores: oversubscribed threads run many times slower",
    )
    b.add_argument(
        "--save-dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the unquantized tensors in the checkpoint (embeddings, norms, biases); "
        "default: the model's",
    )
    b.add_argument(
        "--eval",
        default=None,
        help="after quantizing, compare FP and quantized "
        "perplexity on this source (e.g. wikitext2)",
    )
    b.add_argument("--eval-limit", type=positive_int, default=8)
    b.add_argument("--eval-seqlen", type=positive_int, default=2048)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=Calibration.source, help="c4 (default), wikitext2, a file")
    c.add_argument(
        "--nsamples",
        type=positive_int,
        default=None,
        help="calibration windows for the Fisher statistics, input Hessians and block "
        f"fine-tuning (default {describe_default('calibration')})",
    )
    c.add_argument("--seqlen", type=positive_int, default=Calibration.seqlen)
    c.add_argument("--seed", type=int, default=Calibration.seed)
    c.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet files")
    c.add_argument(
        "--stats",
        default=None,
        help="Fisher stats directory to reuse or fill (default: a cache entry "
        "keyed by model and calibration settings)",
    )
    a = p.add_argument_group("advanced")
    add_stream_arg(a)
    a.add_argument(
        "--group-size", type=positive_int, default=None, help="gptq/rtn group size (128)"
    )
    a.add_argument(
        "--no-act-order",
        dest="act_order",
        action="store_false",
        default=None,
        help="gptq: natural column order",
    )
    a.add_argument("--damping", type=float, default=None)
    a.add_argument(
        "--skip",
        default=None,
        help="comma-separated fnmatch patterns of layers left unquantized (lm_head,*embed*)",
    )
    a.add_argument(
        "--one-pass",
        dest="sequential",
        action="store_false",
        default=None,
        help="input Hessians from one pass over the FP model instead of block by block",
    )
    _flag(
        a,
        "true-sequential",
        "within each decoder block too: quantize its linears stage by stage (q/k/v, o, gate/up, "
        "down), each stage calibrated on what the block's quantized earlier stages produce "
        "(GPTQ's true-sequential)",
    )
    g = p.add_argument_group("method (rsavq; each overrides the preset)")
    g.add_argument(
        "--lambda", dest="lam", type=float, default=None, help="EDSG step, relative to ||W||"
    )
    g.add_argument(
        "--edsg-sign", choices=[e.value for e in EdsgSign], default=None, help=argparse.SUPPRESS
    )
    g.add_argument("--groups", type=positive_int, default=None, help="WCSG channel groups")
    g.add_argument(
        "--uniform-bits",
        action="store_true",
        default=None,
        help="every group at --bits (no WCSG bit allocation)",
    )
    g.add_argument("--vector-length", type=positive_int, default=None)
    g.add_argument("--sub-vectors", type=positive_int, default=None)
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="columns per codebook (0: sized by --codebook-overhead)",
    )
    g.add_argument(
        "--codebook-overhead",
        type=float,
        default=None,
        help="with --block-size 0: codebook bits per weight to aim at (0: one codebook per group)",
    )
    g.add_argument(
        "--codebook-dtype",
        choices=[e.value for e in CodebookDtype],
        default=None,
        help="int8: codebooks stored as int8 with an fp16 scale per sub-vector position "
        "(default: int8 at 4 bits, float16 at 2 and 3)",
    )
    _flag(g, "row-scales", "an fp16 scale per output row")
    _flag(g, "refit", "refit codebooks and scales to the Hessian objective after assignment")
    g.add_argument(
        "--compensation",
        choices=[e.value for e in Compensation],
        default=None,
        help="OBS error feedback while assigning codes, with X^T X (hessian) or F_I (fisher)",
    )
    g.add_argument("--order", choices=[e.value for e in ChannelOrder], default=None)
    g.add_argument("--metric", choices=[e.value for e in Metric], default=None)
    g.add_argument("--allocation", choices=[e.value for e in Allocation], default=None)
    g.add_argument("--kmeans-iters", type=positive_int, default=None)
    g.add_argument("--kmeans-tol", type=float, default=None)
    g.add_argument(
        "--budget",
        choices=["codes", "stored"],
        default=None,
        help="what --bits limits: code bits only, or every stored bit",
    )
    g.add_argument(
        "--layer-bits",
        default=None,
        metavar="PATTERN=BITS,...",
        help="other widths for some layers, e.g. 'k_proj=4,v_proj=4' (fnmatch patterns on the "
        "layer's name or its last part; first match wins)",
    )
    t = p.add_argument_group("fine-tuning (docs/method.md sections 8 and 9)")
    t.add_argument(
        "--finetune",
        choices=["auto", "none", "block", "e2e", "both"],
        default="auto",
        help="block: after each decoder block is quantized, train its codebooks, scales and "
        "norms (codes frozen) to match the FP block's outputs on the calibration windows; "
        "e2e: then train them across the whole model to match the FP model's next-token "
        "distributions (KL); both; auto (default): both wherever the method runs the "
        "block-sequential VQ pass (block alone at 4 bits), else none",
    )
    t.add_argument(
        "--finetune-epochs",
        type=positive_int,
        default=None,
        help="block stage: passes over the calibration windows "
        f"(default {describe_default('block_epochs')})",
    )
    t.add_argument("--finetune-lr", type=float, default=BlockTuning.lr, help="block stage")
    t.add_argument(
        "--distill-epochs", type=positive_int, default=Distillation.epochs, help="e2e stage"
    )
    t.add_argument("--distill-lr", type=float, default=Distillation.lr, help="e2e stage")
    _flag(
        t,
        "finetune-bf16",
        "bfloat16 autocast in both stages and the teacher's pass (default, where bfloat16 "
        "products are fast: CPUs with AVX-512 or AMX, GPUs; float32 on AVX2-only CPUs); "
        "--no-finetune-bf16 trains in float32",
    )
    t.add_argument(
        "--distill-windows",
        type=non_negative_int,
        default=None,
        help="e2e stage: distill on this many C4 windows of --seqlen drawn like the "
        f"calibration's (default {default_windows(2).distillation} at 2 bits, "
        f"{default_windows(3).distillation} at 3; at 4 bits --finetune auto does not distill), or "
        "the calibration's own when --nsamples is larger or the text too short; 0: the "
        "calibration's windows; BENCHMARKS.md)",
    )
    p.set_defaults(func=_cmd_quantize)


def _flag(group, name: str, text: str) -> None:
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=text)
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)


OVERRIDES = (
    "lam", "edsg_sign", "groups", "uniform_bits", "vector_length", "sub_vectors",
    "block_size", "codebook_overhead", "codebook_dtype", "row_scales", "refit",
    "compensation", "order", "metric", "allocation", "kmeans_iters", "kmeans_tol",
    "damping", "sequential", "true_sequential", "group_size", "act_order",
)  # fmt: skip


def _layer_bits(text: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in filter(None, text.split(",")):
        pattern, _, bits = item.partition("=")
        try:
            pairs.append((pattern.strip(), float(bits)))
        except ValueError:
            raise UsageError(
                f"--layer-bits item '{item}' is not PATTERN=BITS; e.g. 'k_proj=4,v_proj=4'"
            ) from None
    return tuple(pairs)


def _config_from_args(args: argparse.Namespace):
    from rsavq.methods import METHODS

    given = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    if args.skip is not None:
        given["skip"] = tuple(p for p in args.skip.split(",") if p)
    if args.budget is not None:
        given["budget_includes_overhead"] = args.budget == "stored"
    if args.layer_bits is not None:
        given["layer_bits"] = _layer_bits(args.layer_bits)
    if args.method == "rsavq":
        given["preset_name"] = args.preset
    return METHODS[args.method].configure(args.bits, seed=args.seed, **given)


def _tuning(args: argparse.Namespace, config):
    """The fine-tuning stages `--finetune` asks for, with the command line's options."""
    from rsavq.api import finetune_stages
    from rsavq.distill import Distillation
    from rsavq.finetune import BlockTuning

    block, e2e = finetune_stages(args.finetune, config)
    bf16 = BlockTuning.bf16 if args.finetune_bf16 is None else args.finetune_bf16
    if block is not None:
        block = BlockTuning(
            epochs=args.finetune_epochs or block.epochs, lr=args.finetune_lr, seed=args.seed,
            bf16=bf16,
        )  # fmt: skip
    if e2e is not None:
        e2e = Distillation(
            epochs=args.distill_epochs, lr=args.distill_lr,
            seed=args.seed, bf16=bf16, windows=_windows(args.distill_windows, e2e.windows),
        )  # fmt: skip
    return block, e2e


def _windows(count: int | None, default: int | None) -> int | None:
    """`--distill-windows`: unset is the default's count, 0 the calibration's own windows."""
    return default if count is None else count or None


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from rsavq.api import Calibration, quantize
    from rsavq.models import resolve_model
    from rsavq.pipeline import check_output_dir, update_report
    from rsavq.stats import distributed

    config = _config_from_args(args)
    tuning = _tuning(args, config)
    check_output_dir(Path(args.out))
    resolve_model(args.model)
    device = distributed.local_device(resolve_device(args.device))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    distributed.init_from_env(device)
    lead = distributed.world()[0] == 0  # prints, evaluates; the other ranks only quantize
    dtype = resolve_dtype(args.dtype, device)
    clock = StageClock()
    with using(clock):
        calib, evaluation, model, tokenizer = _load(args, dtype, device)
        calibration = Calibration(calib, args.nsamples, args.seqlen, args.seed)
        calibration = calibration.resolved(config.bits)
        before = _quick_ppl(model, tokenizer, evaluation, args) if evaluation and lead else None
        if lead:
            _say_what_runs(model, config, calibration, args, tuning)
        start = time.perf_counter()
        records = quantize(
            model,
            config,
            tokenizer=tokenizer,
            calibration=calibration,
            out=args.out,
            stats=args.stats,
            model_id=args.model,
            save_dtype=getattr(torch, args.save_dtype) if args.save_dtype else None,
            finetune=tuning,
        )
        if not lead:
            return 0
        _print_result(args, records, time.perf_counter() - start)
        if evaluation is not None:
            after = _quick_ppl(model, tokenizer, evaluation, args)
            print(
                f"{evaluation.name} PPL over {after.windows} windows x {after.seqlen}: "
                f"FP {before.ppl:.3f} -> {args.method} {after.ppl:.3f}"
            )
    update_report(args.out, clock=clock.to_dict())
    print(f"stage clock ({torch.get_num_threads()} threads; also in {args.out}/report.json):")
    print(format_clock(clock.to_dict()))
    return 0


def _print_result(args: argparse.Namespace, records, seconds: float) -> None:
    from rsavq.pipeline import summarize

    summary = summarize(records)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(
        f"quantized {summary['layers']} layers to {summary['bits_per_weight']:.4f} bits/weight "
        f"(stored, codebooks and permutations included) in {seconds:.0f} s; checkpoint "
        f"{args.out}: {size / 2**20:.1f} MiB"
    )


@timed("load")
def _load(args: argparse.Namespace, dtype, device):
    """The calibration and evaluation text, the model and its tokenizer."""
    from rsavq.data import load_corpus
    from rsavq.models import load_model

    calib = load_corpus(args.calib, args.data_dir, args.text_field)
    evaluation = load_corpus(args.eval, args.data_dir, args.text_field) if args.eval else None
    model, tokenizer = load_model(
        args.model, dtype=dtype, device=device, stream=args.stream_weights
    )
    return calib, evaluation, model, tokenizer


def _quick_ppl(model, tokenizer, corpus, args):
    from rsavq.data import evaluation_windows
    from rsavq.eval import perplexity

    with timed("eval"):
        windows = evaluation_windows(tokenizer, corpus, args.eval_seqlen, args.eval_limit)
        return perplexity(model, windows, corpus.name)


def _say_what_runs(model, config, calibration, args, tuning) -> None:
    from rsavq.stats.artifact import MANIFEST
    from rsavq.stats.run import default_stats_dir

    corpus = calibration.source
    tokens = f"{calibration.nsamples} x {calibration.seqlen} tokens of {corpus.name}"
    if config.needs_stats:
        spec = calibration.fisher_spec(corpus)
        root = Path(args.stats) if args.stats else default_stats_dir(model, spec)
        if (root / MANIFEST).exists():
            print(f"reusing Fisher statistics in {root}")
        else:
            fisher = f"{spec.nsamples} x {spec.seqlen} tokens of {corpus.name}"
            print(f"collecting Fisher statistics into {root} ({fisher})")
    if config.needs_hessian:
        how = "block by block" if config.sequential else "in one pass over the FP model"
        print(f"input Hessians from {tokens}, {how}")
    block, e2e = tuning
    if block is not None:
        print(
            f"block fine-tuning after each decoder block: {block.epochs} epoch(s), lr "
            f"{block.lr:g} (--finetune none skips it)"
        )
    if e2e is not None:
        budget = f"{e2e.epochs} epoch(s) over {e2e.windows or calibration.nsamples} windows"
        print(f"end-to-end distillation from the FP model: {budget}, lr {e2e.lr:g}")
