"""The cost benchmark's table, on a synthetic result (no quantization runs)."""

from helpers import load_benchmark


def load_cost():
    return load_benchmark("cost")


def run(bits, stages, label=""):
    clock = {
        "stages": {name: {"seconds": s, "peak_rss_gib": 1.0, "calls": 1} for name, s in stages},
        "total_seconds": sum(s for _, s in stages) + 6,
        "peak_rss_gib": 4.25,
    }
    return {"bits": bits, "clock": clock, "ppl": {"value": 29.5}, "extra": "", "label": label,
            "bits_per_weight": bits + 0.15, "checkpoint_mib": 94.4}  # fmt: skip


def test_table_has_a_column_per_stage_and_the_total():
    cost = load_cost()
    results = {"runs": {"3": run(3, [("fisher", 300), ("finetune", 600)]),
                        "2 old": run(2, [("distill", 120)], label="old")}}  # fmt: skip
    lines = cost.table(results).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:3] == ["bits", "run", "load"] and head[-3] == "total min"
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[1] == "(default)" and first[head.index("fisher")] == "5.0"
    assert first[head.index("finetune")] == "10.0" and first[head.index("teacher")] == "-"
    assert first[head.index("total min")] == "**15.1**" and first[-1] == "29.50"
    assert lines[3].split("|")[2].strip() == "old"


def test_summary_sorts_by_width_and_gives_what_a_user_gets():
    cost = load_cost()
    results = {"runs": {"3 abc": run(3, [("fisher", 300)], label="abc"),
                        "2 abc": run(2, [("fisher", 60)], label="abc")}}  # fmt: skip
    lines = cost.summary(results).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["2", "3"]
    assert rows[1] == ["3", "- / -", "3.150", "29.50", "5.1 min", "4.2 GiB", "94.4 MiB"]
    results["runs"]["3 abc"]["windows"] = {"calibration": 64, "distill": 128}
    assert "| 3 | 64 / 128 | 3.150 |" in cost.summary(results)
    results["runs"]["3 abc"]["windows"] = {"calibration": 128, "distill": None}  # not distilled
    assert "| 3 | 128 / none | 3.150 |" in cost.summary(results)


def test_rates_use_the_window_counts_a_run_recorded():
    cost = load_cost()
    recorded = {**run(3, [("fisher", 320), ("distill", 256)]),
                "windows": {"calibration": 64, "distill": 128}}  # fmt: skip
    older = run(3, [("fisher", 640), ("distill", 512)])  # (128 and 256 then)
    work = cost.work(recorded)
    assert work["fisher"] == 64 and work["distill"] == 128 and work["teacher"] == 132
    assert cost.work(older)["fisher"] == 128
    rates = cost.rates({"runs": {"a": recorded, "b": older}}).splitlines()
    assert "| fisher | s / window | 5.00 | 5.00 |" in rates


def test_runs_of_several_files_merge_by_width(tmp_path):
    import json

    cost = load_cost()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": {"x": run(4, [], "a4"), "y": run(2, [], "a2")}}))
    b.write_text(json.dumps({"runs": {"x": run(2, [], "b2")}}))
    labels = [r["label"] for r in cost.merged([str(a), str(b)], by_bits=True)["runs"].values()]
    assert labels == ["a2", "b2", "a4"]
    in_order = [r["label"] for r in cost.merged([str(a), str(b)])["runs"].values()]
    assert in_order == ["a4", "a2", "b2"]
