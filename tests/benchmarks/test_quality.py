"""The quality benchmark's row definitions, resume keys and table writer (no model runs)."""

import json

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


SETTINGS = {
    "model": "smollm2-135m",
    "calibration": "c4 64x512 seed 0",
    "windows": 16,
    "tasks": "arc_easy,piqa",
    "tasks_limit": 100,
}


def _row(section, label, bits, ppl, bpw=None, shots=None):
    row = {"section": section, "label": label, "bits": bits, "settings": SETTINGS}
    row["wikitext2"] = {"ppl": ppl, "windows": 16}
    if bits is not None:
        row.update(bits_per_weight=bpw, wall_seconds=61.2, median_relative_error=0.25)
    if shots:
        avg = sum(shots.values()) / len(shots)
        row["zero_shot"] = {
            "tasks": {t: {"acc": v, "acc_norm": v} for t, v in shots.items()},
            "average": {"acc": avg, "acc_norm": avg},
        }
    return row


def test_rows_cover_the_issue_table(quality):
    rows = quality.all_rows([2, 3, 4], set(quality.SECTIONS))
    main = [r for r in rows if r.section == "main"]
    assert [r.label for r in main[:7]] == [
        "FP",
        "RTN g128",
        "GPTQ g128 act-order",
        "k-means VQ",
        "RSAVQ (paper)",
        "rsavq, no fine-tuning (Quality I default)",
        "rsavq (default)",
    ]
    kmeans, paper, default = main[3].config, main[4].config, main[5].config
    assert main[6].config == default and main[6].tuning == quality.BlockTuning()
    assert main[6].distillation == quality.Distillation()
    assert main[5].tuning is None
    assert (kmeans.lam, kmeans.groups, kmeans.uniform_bits, kmeans.needs_hessian) == (
        0.0, 1, True, False,
    )  # fmt: skip
    assert (paper.groups, paper.vector_length, paper.sub_vectors) == (4, 6, 2)
    assert paper.budget_includes_overhead and not paper.needs_hessian
    assert default == quality.preset("default", 2) and default.sequential
    buildup = [r.config for r in rows if r.section == "buildup" and r.bits == 2]
    assert buildup[0] == kmeans and buildup[-1] == default  # one mechanism at a time
    lambdas = [r.config.lam for r in rows if r.section == "rsavq" and r.bits == 2]
    assert lambdas[:5] == [0.0, 0.003, 0.03, 0.1, 0.3]
    finetune = [r for r in rows if r.section == "finetune" and r.bits == 3]
    tuned, distilled, *more, staged, order = finetune
    assert tuned.tuning == distilled.tuning
    assert distilled.distillation == quality.Distillation(windows=None)  # the identity it had
    assert [m.distillation.windows for m in more] == [256, 512]
    assert order.config == quality.preset("default", 3, order="hessian")
    assert (order.tuning, order.distillation) == (tuned.tuning, distilled.distillation)
    assert all(m.tuning == tuned.tuning and m.distillation.bf16 for m in more)
    assert tuned.distillation is None and "distillation" not in tuned.identity
    assert staged.config == quality.preset("default", 3, true_sequential=True)
    assert (staged.tuning, staged.distillation) == (tuned.tuning, None)
    old, blocks, sequential = [r.config for r in rows if r.section == "compensation"]
    assert not old.sequential and old.codebook_overhead == 0 and sequential.sequential


def test_row_keys_change_with_config_and_settings(quality):
    rows = quality.main_rows(2)
    keys = {quality.row_key(r, SETTINGS) for r in rows}
    assert len(keys) == len(rows)
    other = dict(SETTINGS, windows=148)
    assert quality.row_key(rows[0], other) != quality.row_key(rows[0], SETTINGS)


def test_tables_from_cached_json(quality, tmp_path):
    results = {
        "rows": {
            "a": _row("main", "FP", None, 19.13, shots={"arc_easy": 0.5, "piqa": 0.6}),
            "b": _row("main", "RTN g128", 2, 1.8e6, 2.266, {"arc_easy": 0.25, "piqa": 0.5}),
            "c": _row("rsavq", "lambda 0.03", 2, 2.6e7, 1.814),
            "d": _row("rsavq", "lambda 0.1", 2, 30.5, 1.814),
        }
    }
    results["rows"]["d"]["settings"] = dict(SETTINGS, calibration="c4 128x512 seed 0")
    path = tmp_path / "q.json"
    path.write_text(json.dumps(results))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n")
    quality.main(["--table-only", "--json", str(path), "--markdown", str(md)])
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "| FP | FP | 32 (fp32) | 19.13 | 50.0 | - | 60.0 | - | 55.0 | - |" in text
    assert "| 2 | RTN g128 | 2.266 | 1.80e+06 | 25.0 | - | 50.0 | - | 37.5 | 61 s |" in text
    assert "| rsavq | 2 | lambda 0.03 | 1.814 | 2.60e+07 | 0.250 | 61 s |" in text
    assert "| lambda 0.1, calibration c4 128x512 seed 0 | 1.814 | 30.50 |" in text
    assert text.index("| FP | FP |") < text.index("| 2 | RTN g128 |")  # FP first
    assert "16 windows x 2048" in text and "first 100 examples per task" in text
    quality.main(["--table-only", "--json", str(path), "--markdown", str(md)])
    assert md.read_text() == text  # the block is replaced, not appended again
    old = {"label": "rsavq (default)", "tuning": {"epochs": 2}}
    assert quality.shown_label(old) == "rsavq, block fine-tuning only"
    assert quality.superseded(old)
    assert quality.shown_label({**old, "distillation": {"windows": 256}}) == "rsavq (default)"
    earlier = quality.shown_label({**old, "distillation": {"epochs": 1}})
    assert earlier.endswith(", distilled on the calibration's windows")


def test_rows_measured_before_the_default_widened_k_and_v_are_shown_for_what_they_ran(quality):
    old = {"label": quality.DEFAULT, "bits": 3, "config": quality.preset("default", 2).to_dict()}
    now = dict(old, config=quality.preset("default", 3).to_dict())
    assert quality.shown_label(now) == quality.DEFAULT
    assert quality.shown_label(old) == f"{quality.DEFAULT}, k/v at 3 bits"
    assert quality.superseded(old) and not quality.superseded(now)
    assert quality.shown_label(dict(old, bits=2)) == quality.DEFAULT  # 2 bits: nothing widened
    no_tuning = dict(now, label=quality.NO_TUNING)
    assert quality.shown_label(no_tuning) == "rsavq, no fine-tuning"
    assert not quality.superseded(no_tuning)
    tuned = dict(old, section="finetune", label="+ distillation on 256 windows (bf16 autocast)")
    assert quality.shown_label(tuned).endswith(", k/v at 3 bits")
    assert quality.shown_label(dict(tuned, config=now["config"])) == tuned["label"]
    assert quality.shown_label(dict(tuned, section="vector")) == tuned["label"]
    for bits in (3, 4):
        buildup = [r.config for r in quality.buildup_rows(bits)]
        assert buildup[-1] == quality.preset("default", bits) and not buildup[-2].layer_bits
    assert quality.buildup_rows(4)[-1].label.endswith("codebooks at 0.02 bits/weight = default")
