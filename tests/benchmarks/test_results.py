"""The results benchmark: one row end to end on a tiny model, resumed; its tables."""

import json
import shutil

from helpers import load_benchmark, sample_text


def load_results():
    return load_benchmark("results")


def test_rows_end_to_end_then_resume_without_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    results = load_results()
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "wikitext2" / "wiki.test.raw").write_text(sample_text(200, seed=2))
    (data / "c4").mkdir()
    docs = [sample_text(6, seed=s) for s in range(300)]
    (data / "c4" / "c4_validation.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs)
    )
    monkeypatch.setattr(results, "FAST", results.Protocol("fast", 2, 2, "float32", (), None, 32))
    monkeypatch.setattr(results, "C4_SKIP_TOKENS", 4 * 32)
    for name in ("README.md", "BENCHMARKS.md"):
        (tmp_path / name).write_text("# doc\n")
    monkeypatch.setattr(results, "ROOT", tmp_path)
    out = tmp_path / "r.json"
    argv = ["--fast", "--bits", "3", "--only", "RTN g128", "--model", str(tiny_model_dir),
            "--data-dir", str(data), "--runs", str(tmp_path / "runs"), "--json", str(out),
            "--threads", "1", "--quantize-args", "--group-size 16"]  # fmt: skip
    results.main(argv)
    row = json.loads(out.read_text())["rows"]["RTN g128 | 3 bits | seed 0"]
    assert set(row["steps"]) == {"quantize", "wikitext2", "c4"}
    assert row["steps"]["quantize"]["bits_per_weight"] > 3
    assert row["steps"]["wikitext2"]["windows"] == 2 and row["steps"]["c4"]["windows"] == 2
    assert "| 3 | RTN g128 |" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "results-fast:begin" not in (tmp_path / "README.md").read_text()
    capsys.readouterr()

    def no_work(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    run = results.subprocess.run
    monkeypatch.setattr(results.subprocess, "run", no_work)
    results.main(argv)
    assert json.loads(out.read_text())["rows"]["RTN g128 | 3 bits | seed 0"] == row

    # a fresh clone: the JSON holds the row and a step is left, the checkpoint is not here
    shutil.rmtree(tmp_path / "runs" / "fast" / "rtn-3-s0")
    data = json.loads(out.read_text())
    del data["rows"]["RTN g128 | 3 bits | seed 0"]["steps"]["c4"]
    out.write_text(json.dumps(data))
    monkeypatch.setattr(results.subprocess, "run", run)
    results.main(argv)
    again = json.loads(out.read_text())["rows"]["RTN g128 | 3 bits | seed 0"]["steps"]
    assert set(again) == {"quantize", "wikitext2", "c4"}  # quantized and evaluated again
    assert (tmp_path / "runs" / "fast" / "rtn-3-s0" / "report.json").exists()
    assert "is gone; quantizing and evaluating it again" in capsys.readouterr().out


def step(ppl):
    return {"ppl": ppl, "windows": 16}


def test_table_orders_rows_and_spread_reads_the_seeds():
    results = load_results()
    rows = {}
    for method, bits, seed, ppl in [("rsavq (default)", 3, 0, 27.5), ("FP", None, 0, 20.7),
                                    ("GPTQ g128", 3, 0, 40.1), ("rsavq (default)", 3, 1, 28.0),
                                    ("rsavq (default)", 3, 2, 27.0)]:  # fmt: skip
        steps = {"wikitext2": step(ppl), "c4": step(ppl + 1)}
        if bits:
            steps["quantize"] = {"bits_per_weight": 3.15, "wall_seconds": 600.0,
                                 "checkpoint_mib": 94.4}  # fmt: skip
        rows[f"{method} {bits} {seed}"] = {"method": method, "bits": bits, "seed": seed,
                                           "steps": steps}  # fmt: skip
    rows["rsavq (default) 3 0"]["steps"]["zero_shot"] = {
        "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.6}, "winogrande": {"acc": 0.5}}
    }
    text = results.render({"rows": rows})
    lines = text.splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:5]] == [
        "FP", "GPTQ g128", "rsavq (default)"
    ]  # fmt: skip
    assert "| 3 | rsavq (default) | 3.150 | 27.50 | 28.50 | 60.0 | - | - | 50.0 | 55.0 |" in text
    assert "10.0 min | 94.4 MiB |" in text
    assert "seeds 0, 1, 2: wikitext2 27.50 / 28.00 / 27.00 (mean 27.50" in text
    assert "max - min 3.6% of the mean" in text


def test_a_time_measured_beside_another_row_is_marked():
    results = load_results()
    quiet = {"bits_per_weight": 3.15, "wall_seconds": 600.0, "checkpoint_mib": 94.4}
    rows = {"q": {"method": "GPTQ g128", "bits": 3, "seed": 0, "steps": {"quantize": quiet}}}
    assert "10.0 min |" in results.render({"rows": rows})
    assert results.CONTENDED not in results.render({"rows": rows})
    rows["q"]["steps"]["quantize"] = {**quiet, "parallel": True}
    text = results.render({"rows": rows})
    assert "10.0 min* |" in text and results.CONTENDED in text


def test_rows_filter_by_method_and_seed():
    results = load_results()
    chosen = results.rows(results.FAST, [3], "rsavq (default)", [1, 2])
    assert [(r.method, r.bits, r.seed) for r in chosen] == [
        ("rsavq (default)", 3, 1), ("rsavq (default)", 3, 2)
    ]  # fmt: skip
    assert [r.seed for r in results.rows(results.FAST, [3], "rsavq (default)")] == [0, 1, 2]
