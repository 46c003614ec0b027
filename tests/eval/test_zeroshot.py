import json

import pytest
import torch

from helpers import build_tiny_llama, build_tokenizer
from rsavq.errors import UsageError
from rsavq.eval import zeroshot
from rsavq.eval.zeroshot import ZeroShotResult, build_task, parse_tasks, zero_shot

pytest.importorskip("lm_eval")

PIQA = [
    {
        "goal": "the fox",
        "sol1": "jumps over a dog.",
        "sol2": "rivers of light near stone.",
        "label": 0,
    },
    {"goal": "seven wizards", "sol1": "quietly hex zebras.", "sol2": "old bridges.", "label": 1},
    {
        "goal": "a lazy dog",
        "sol1": "the brown fox.",
        "sol2": "jovial zebras quietly jump.",
        "label": 0,
    },
    {"goal": "old stone", "sol1": "bridges and rivers.", "sol2": "wizards.", "label": 1},
]
WINO = [
    {
        "sentence": "The fox jumps over the dog so _ is quick.",
        "option1": "fox",
        "option2": "dog",
        "answer": "1",
    },
    {
        "sentence": "Seven wizards hex zebras and _ run away.",
        "option1": "wizards",
        "option2": "zebras",
        "answer": "2",
    },
]


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer()
    return build_tiny_llama(len(tok), seed=3), tok


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), tokenized as lm-eval does (whole minus context)."""
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def expected(scores: list[list[tuple[float, int]]], golds: list[int]) -> dict:
    """acc: argmax loglikelihood; acc_norm: argmax loglikelihood / characters of the choice."""
    pairs = list(zip(scores, golds, strict=True))
    acc = [max(range(len(s)), key=lambda i: s[i][0]) == g for s, g in pairs]
    norm = [max(range(len(s)), key=lambda i: s[i][0] / s[i][1]) == g for s, g in pairs]
    return {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}


def test_piqa_matches_hand_computed_loglikelihoods(lm, tmp_path):
    model, tok = lm
    path = _write(tmp_path / "piqa.jsonl", PIQA)
    result = zero_shot(model, tok, f"piqa={path}", batch_size=2)
    scores = []
    for row in PIQA:
        ctx = f"Question: {row['goal']}\nAnswer:"
        scores.append(
            [(loglikelihood(model, tok, ctx, " " + s), len(s)) for s in (row["sol1"], row["sol2"])]
        )
    want = expected(scores, [r["label"] for r in PIQA])
    got = result.tasks["piqa"]
    assert got["acc"] == pytest.approx(want["acc"])
    assert got["acc_norm"] == pytest.approx(want["acc_norm"])
    assert result.average["acc"] == pytest.approx(want["acc"])


def test_winogrande_partial_scoring(lm, tmp_path):
    model, tok = lm
    path = _write(tmp_path / "wino.jsonl", WINO)
    result = zero_shot(model, tok, [f"winogrande={path}"])
    hits = []
    for row in WINO:
        cut = row["sentence"].index("_")
        target = " " + row["sentence"][cut + 1 :].strip()
        lls = [
            loglikelihood(model, tok, row["sentence"][:cut] + o, target)
            for o in (row["option1"], row["option2"])
        ]
        hits.append(lls.index(max(lls)) == int(row["answer"]) - 1)
    assert result.tasks["winogrande"]["acc"] == pytest.approx(sum(hits) / len(hits))
    assert "acc_norm" not in result.tasks["winogrande"]  # as lm-eval: acc only


def test_arc_ai2_format_is_converted():
    row = {
        "question": {
            "stem": "Why?",
            "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}],
        },
        "answerKey": "B",
    }
    assert zeroshot._arc_row(row) == {
        "question": "Why?",
        "choices": {"text": ["a", "b"], "label": ["A", "B"]},
        "answerKey": "B",
    }


def test_hellaswag_preprocessing_matches_lm_eval():
    from lm_eval.tasks.hellaswag.utils import preprocess

    row = {
        "ctx_a": "A man [title] sits.",
        "ctx_b": "he",
        "activity_label": "Sitting",
        "endings": ["stands [step] up.", "sits."],
        "label": "1",
    }
    out = zeroshot._hellaswag_row(row)
    assert out["query"] == preprocess("Sitting: A man [title] sits. He")
    assert out["choices"] == [preprocess(e) for e in row["endings"]]
    assert out["label"] == 1


def test_parse_tasks_and_errors(tmp_path):
    assert parse_tasks("arc_easy, hellaswag=/x.jsonl") == {
        "arc_easy": None,
        "hellaswag": "/x.jsonl",
    }
    with pytest.raises(UsageError, match="no tasks"):
        parse_tasks(" , ")
    with pytest.raises(UsageError, match="does not exist"):
        build_task("piqa", tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="no local-file config"):
        build_task("lambada_openai", tmp_path / "x.jsonl")
    # no local copy anywhere: falls back to lm-eval's own (hub) task name
    assert build_task("hellaswag", data_dir=tmp_path) == "hellaswag"


def test_local_data_dir_is_found(tmp_path):
    _write((tmp_path / "piqa").mkdir() or tmp_path / "piqa" / "piqa_validation.jsonl", PIQA)
    task = build_task("piqa", data_dir=tmp_path)
    assert task.config.task == "piqa"
    assert len(list(task.test_docs())) == len(PIQA)


def test_average_over_tasks():
    result = ZeroShotResult({"a": {"acc": 0.5, "acc_norm": 0.7}, "b": {"acc": 0.3}}, None)
    assert result.average == {"acc": pytest.approx(0.4), "acc_norm": pytest.approx(0.5)}
