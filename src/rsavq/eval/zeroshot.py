"""Zero-shot accuracy through lm-eval-harness (the optional `[eval]` extra).

The tasks are lm-eval's own multiple-choice configs (prompts, choices, acc / acc_norm). Where a
local copy of the data exists (`--data-dir`, `$RSAVQ_DATA_DIR`, or `task=PATH`), the same config
reads it through the `json` loader instead of the hub, so the evaluation runs offline; otherwise
the standard lm-eval task of that name is used (hub access needed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rsavq.data import resolve_data_dir
from rsavq.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande")
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class LocalTask:
    """A standard lm-eval task reading a local file."""

    files: tuple[str, ...]  # candidates relative to the data dir, first found wins
    prompt: dict  # lm-eval TaskConfig fields
    process: Callable[[dict], dict] | None = None  # row -> the schema `prompt` expects
    metrics: tuple[str, ...] = METRICS  # lm-eval reports acc only for winogrande


def _arc_row(row: dict) -> dict:
    """AI2 format (`question.stem`, `question.choices[]`) or HF format -> HF format."""
    question = row["question"]
    if isinstance(question, dict):
        choices = question["choices"]
        return {
            "question": question["stem"],
            "choices": {
                "text": [c["text"] for c in choices],
                "label": [c["label"] for c in choices],
            },
            "answerKey": row["answerKey"],
        }
    return {"question": question, "choices": row["choices"], "answerKey": row["answerKey"]}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_row(row: dict) -> dict:
    """lm-eval's hellaswag preprocessing; `ctx` is used where `ctx_a`/`ctx_b` are absent."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize() if "ctx_a" in row else row["ctx"]
    return {
        "query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in row["endings"]],
        "label": int(row["label"]),
    }


def _winogrande_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]


def _winogrande_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def _winogrande_choices(doc: dict) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + doc["option1"], doc["sentence"][:cut] + doc["option2"]]


_ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}
LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(
        ("arc/ai2_arc.ARC-Easy.test.hf.jsonl", "arc/ARC-Easy-Test.jsonl"), _ARC, _arc_row
    ),
    "arc_challenge": LocalTask(
        ("arc/ai2_arc.ARC-Challenge.test.hf.jsonl", "arc/ARC-Challenge-Test.jsonl"), _ARC, _arc_row
    ),
    "piqa": LocalTask(
        ("piqa/piqa_validation.jsonl",),
        {
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}",
        },
    ),
    "winogrande": LocalTask(
        ("winogrande/dev.jsonl",),
        {
            "doc_to_text": _winogrande_text,
            "doc_to_target": _winogrande_target,
            "doc_to_choice": _winogrande_choices,
        },
        metrics=("acc",),
    ),
    "hellaswag": LocalTask(
        ("hellaswag/hellaswag_val.jsonl", "hellaswag/validation.jsonl"),
        {"doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices"},
        _hellaswag_row,
    ),
}


@dataclass(frozen=True)
class ZeroShotResult:
    """Per task `{"acc": .., "acc_norm": .., "n": ..}` and the average over tasks."""

    tasks: dict[str, dict[str, float]]
    limit: int | None

    @property
    def average(self) -> dict[str, float]:
        """Mean over tasks of `acc`, and of `acc_norm` (`acc` for a task without it, as
        WinoGrande), the mix papers report."""
        if not self.tasks:
            return {}
        rows = list(self.tasks.values())
        return {
            "acc": sum(t["acc"] for t in rows) / len(rows),
            "acc_norm": sum(t.get("acc_norm", t["acc"]) for t in rows) / len(rows),
        }

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "average": self.average, "limit": self.limit}


def parse_tasks(spec: str | Sequence[str]) -> dict[str, str | None]:
    """`"arc_easy,hellaswag=/d/hs.jsonl"` -> `{"arc_easy": None, "hellaswag": "/d/hs.jsonl"}`."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: dict[str, str | None] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, path = item.partition("=")
        out[name.strip()] = path.strip() or None
    if not out:
        raise UsageError(f"no tasks in '{spec}'; e.g. --tasks {','.join(DEFAULT_TASKS)}")
    return out


def build_task(name: str, path: str | Path | None = None, data_dir: str | Path | None = None):
    """An lm-eval task: the local config when a file is found, else lm-eval's standard name."""
    local = LOCAL_TASKS.get(name)
    if path is not None and local is None:
        raise UsageError(
            f"task '{name}' has no local-file config; local files work for "
            f"{', '.join(sorted(LOCAL_TASKS))}"
        )
    found = _local_file(name, local, path, data_dir) if local else None
    if found is None:
        logger.info("task %s: no local file, using lm-eval's hub task", name)
        return name
    logger.info("task %s: reading %s", name, found)
    return _configurable_task(name, local, found)


def _local_file(name, local: LocalTask, path, data_dir) -> Path | None:
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"task file {path} for '{name}' does not exist; fix the path")
        return Path(path)
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    return next((root / f for f in local.files if (root / f).is_file()), None)


def _configurable_task(name: str, local: LocalTask, path: Path):
    from lm_eval.api.task import ConfigurableTask

    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in local.metrics
        ],
        "metadata": {"version": 1.0},
        **local.prompt,
    }
    if local.process is not None:
        config["process_docs"] = lambda dataset: dataset.map(
            local.process, remove_columns=dataset.column_names
        )
    return ConfigurableTask(config=config)


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
) -> ZeroShotResult:
    """Run lm-eval's evaluator on an in-memory model (FP or quantized) and collect acc/acc_norm."""
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise UsageError("zero-shot evaluation needs lm-eval: pip install 'rsavq[eval]'") from exc
    built = [build_task(n, p, data_dir) for n, p in parse_tasks(tasks).items()]
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = evaluator.simple_evaluate(
        model=lm, tasks=built, limit=limit, log_samples=False, bootstrap_iters=0
    )
    return ZeroShotResult(_collect(output["results"]), limit)


def _collect(results: dict) -> dict[str, dict[str, float]]:
    out = {}
    for task, values in results.items():
        row = {m: float(values[f"{m},none"]) for m in METRICS if f"{m},none" in values}
        if "sample_len" in values:
            row["n"] = values["sample_len"]
        out[task] = row
    return out
