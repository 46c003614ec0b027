"""`rsavq eval`: perplexity and zero-shot accuracy."""

from __future__ import annotations

import argparse

from rsavq import __version__
from rsavq.cli.common import (
    add_backend_arg,
    add_model_args,
    add_stream_arg,
    apply_backend,
    positive_int,
)
from rsavq.errors import UsageError
from rsavq.eval.zeroshot import parse_tasks
from rsavq.runtime import resolve_device, resolve_dtype


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model's perplexity and zero-shot accuracy",
        description="Perplexity over non-overlapping windows, and zero-shot accuracy through "
        "lm-eval-harness (README: Evaluation protocol).",
    )
    add_model_args(p)
    add_stream_arg(p)
    add_backend_arg(p)
    p.add_argument(
        "--ppl",
        default="wikitext2",
        help="comma-separated sources: wikitext2, c4, ptb, name:split, or file paths; '' for none",
    )
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated lm-eval tasks, e.g. arc_easy,arc_challenge,piqa,winogrande,"
        "hellaswag; a local file as task=PATH (needs rsavq[eval])",
    )
    p.add_argument(
        "--tasks-limit", type=positive_int, default=None, help="first N examples per task only"
    )
    p.add_argument("--seqlen", type=positive_int, default=2048)
    p.add_argument("--limit", type=positive_int, default=None, help="first N windows only")
    p.add_argument("--batch-size", type=positive_int, default=1)
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
    tasks = parse_tasks(args.tasks) if args.tasks else None
    if not corpora and not tasks:
        raise UsageError("nothing to evaluate: give --ppl SOURCES and/or --tasks TASKS")
    model, tokenizer = load_model(
        args.model, dtype=dtype, device=device, stream=args.stream_weights
    )
    apply_backend(model, args.backend)
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
    shots = _zero_shot(model, tokenizer, tasks, args) if tasks else None
    if args.json:
        record = {
            "model": args.model,
            "dtype": args.dtype,
            "device": str(device),
            "version": __version__,
            "perplexity": [r.to_dict() for r in results],
            "zero_shot": shots.to_dict() if shots else None,
        }
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    return 0


def _zero_shot(model, tokenizer, tasks: dict, args: argparse.Namespace):
    from rsavq.eval.zeroshot import zero_shot

    specs = [f"{n}={p}" if p else n for n, p in tasks.items()]
    result = zero_shot(model, tokenizer, specs, args.tasks_limit, args.batch_size, args.data_dir)
    print(format_zero_shot(result))
    return result


def format_zero_shot(result) -> str:
    """A small table: task, acc, acc_norm, examples; then the average."""
    rows = [f"{'task':<16} {'acc':>7} {'acc_norm':>9} {'n':>6}"]
    for task, v in [*result.tasks.items(), ("average", result.average)]:
        norm = f"{v['acc_norm']:.4f}" if "acc_norm" in v else "-"
        rows.append(f"{task:<16} {v['acc']:>7.4f} {norm:>9} {v.get('n', ''):>6}")
    return "\n".join(rows)
