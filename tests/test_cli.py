import json

import pytest
import torch

from rsavq.cli import main


def test_eval_writes_json_and_prints(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--ppl",
            str(text_file),
            "--seqlen",
            "32",
            "--limit",
            "4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    [ppl] = record["perplexity"]
    assert ppl["windows"] == 4 and ppl["seqlen"] == 32 and ppl["ppl"] > 1
    assert "PPL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ppl", "nosuchset"], "unknown dataset 'nosuchset'"),
        (["--ppl", "/no/such/file.txt"], "not found; check the path"),
        (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on CPU"),
        (["--seqlen", "100000"], "fewer than one window of 100000"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tiny_model_dir, text_file, capsys, extra, message):
    args = ["eval", "--model", str(tiny_model_dir), "--ppl", str(text_file), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rsavq: error:")


def test_missing_model_exit_2(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "absent"), "--ppl", "wikitext2"]) == 2
    assert "absent' not found. Tried:" in capsys.readouterr().err


def test_bad_number_is_argparse_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "x", "--seqlen", "0"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    "extra",
    [["--threads", "0"], ["--nsamples", "-1"], ["--distill-epochs", "-5"], ["--seqlen", "0"]],
)
def test_quantize_bad_numbers_refused_before_any_work(tiny_model_dir, tmp_path, capsys, extra):
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "3", "--out", str(tmp_path / "q")]
    with pytest.raises(SystemExit) as info:
        main([*args, *extra])
    assert info.value.code == 2 and not (tmp_path / "q").exists()
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "must be at least" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bits", "7"], "unsupported bits 7"),
        (["--bits", "2", "--vector-length", "5", "--sub-vectors", "2"], "vector length 5 must"),
        (
            ["--bits", "2", "--block-size", "6"],
            "block size 6 must be a multiple of the vector length 4",
        ),
        pytest.param(
            ["--bits", "3", "--device", "cuda"],
            "CUDA is not available; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
    ],
)
def test_quantize_bad_settings_exit_2(tiny_model_dir, tmp_path, capsys, extra, message):
    args = ["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_end_to_end_and_reuses_stats(tiny_model_dir, text_file, tmp_path, capsys):
    base = [
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--bits",
        "2",
        "--calib",
        str(text_file),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--budget",
        "codes",
        "--groups",
        "2",
        "--kmeans-iters",
        "2",
    ]
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "a"),
                "--eval",
                str(text_file),
                "--eval-seqlen",
                "32",
                "--eval-limit",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "collecting Fisher statistics" in out and "FP " in out and "-> rsavq" in out
    assert "stage clock" in out and "  fisher " in out and "  eval " in out and "  total " in out
    clock = json.loads((tmp_path / "a" / "report.json").read_text())["clock"]
    assert clock["stages"]["eval"]["calls"] == 2  # before and after quantizing
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert "reusing Fisher statistics" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b")]) == 2  # never overwrites a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gptq", "rtn", "kmeans"])
def test_quantize_baselines(tiny_model_dir, text_file, tmp_path, capsys, method):
    out = tmp_path / method
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "3", "--method", method]
    args += ["--calib", str(text_file), "--nsamples", "3", "--seqlen", "32", "--out", str(out)]
    extra = ["--kmeans-iters", "2"] if method == "kmeans" else ["--group-size", "16"]
    assert main([*args, *extra]) == 0
    printed = capsys.readouterr().out
    assert ("input Hessians from" in printed) == (method == "gptq")
    assert "collecting Fisher" not in printed  # no baseline needs Fisher statistics
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["bits_per_weight"] > 3
    config = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in config) == (method == "kmeans")


def test_option_of_another_method_is_refused(tiny_model_dir, tmp_path, capsys):
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "3", "--method", "gptq"]
    assert main([*args, "--lambda", "0.1", "--out", str(tmp_path / "q")]) == 2
    assert "lam: not an option of method gptq" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--preset", "paper"], {"groups": 4, "vector_length": 6, "compensation": "none"}),
        (["--one-pass", "--lambda", "0"], {"sequential": False, "lam": 0.0, "refit": True}),
        (["--no-refit", "--block-size", "8"], {"refit": False, "block_size": 8}),
        (["--true-sequential"], {"true_sequential": True, "sequential": True}),
        (["--codebook-dtype", "int8"], {"codebook_dtype": "int8", "refit": True}),
    ],
)
def test_quantize_presets_and_overrides(
    tiny_model_dir, text_file, tmp_path, capsys, extra, expected
):
    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "2", "--out", str(out)]
    args += ["--calib", str(text_file), "--nsamples", "3", "--seqlen", "32", "--kmeans-iters", "2"]
    assert main([*args, *extra]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]["config"]
    assert {k: config[k] for k in expected} == expected
    printed = capsys.readouterr().out
    assert ("in one pass over the FP model" in printed) == ("--one-pass" in extra)


def test_quantize_fractional_bits_for_scalar_refused(tiny_model_dir, tmp_path, capsys):
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "2.5", "--method", "rtn"]
    assert main([*args, "--out", str(tmp_path / "q")]) == 2
    assert "needs whole bits" in capsys.readouterr().err


def test_eval_zero_shot_task_file(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    rows = [
        {"goal": "a fox", "sol1": "jumps.", "sol2": "sleeps.", "label": i % 2} for i in range(4)
    ]
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(tiny_model_dir), "--ppl", "", "--tasks", f"piqa={path}"]
    assert main([*args, "--json", str(out)]) == 0
    assert "average" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["zero_shot"]["tasks"]["piqa"]["acc"] == 0.5  # same choices, alternating labels


def test_eval_nothing_to_do(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--ppl", ""]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_quantize_with_both_finetuning_stages(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_model_dir), "--bits", "2", "--calib", str(text_file)]
    args += ["--nsamples", "3", "--seqlen", "32", "--kmeans-iters", "2", "--lambda", "0"]
    args += ["--uniform-bits", "--finetune", "both", "--finetune-epochs", "1"]
    assert main([*args, "--one-pass", "--out", str(out)]) == 2
    assert "block-sequential pass" in capsys.readouterr().err and not out.exists()
    args += ["--distill-lr", "1e-3", "--finetune-bf16"]
    args += ["--distill-windows", "0"]  # the calibration's windows
    assert main([*args, "--out", str(out)]) == 0
    assert "end-to-end distillation from the FP model: 1 epoch(s) over 3 windows" in (
        capsys.readouterr().out
    )
    report = json.loads((out / "report.json").read_text())
    assert len(report["finetune"]) == 2 and report["distill"]["steps"] == 3
    stages = report["clock"]["stages"]  # every stage of the run, timed
    for stage in ("load", "teacher", "hessians", "quantize", "refit", "finetune"):
        assert stages[stage]["seconds"] > 0 and stages[stage]["peak_rss_gib"] > 0, stage
    assert {"distill", "save"} <= set(stages)
    assert sorted(stages["finetune"]["per_item"]) == ["0", "1"]  # each block's tuning
    assert sum(s["seconds"] for s in stages.values()) <= report["clock"]["total_seconds"]
    finetune = json.loads((out / "config.json").read_text())["quantization_config"]["finetune"]
    assert finetune["block"]["bf16"] and finetune["e2e"]["bf16"] and finetune["e2e"]["epochs"] == 1
    assert "windows" not in finetune["e2e"] and report["distill"]["windows"] == 3


def torchrun(command: list[str]):
    """`rsavq COMMAND` under `torchrun --standalone` with 2 ranks of one thread each."""
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc-per-node", "2", "-m", "rsavq.cli", *command],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_fisher_under_torchrun_equals_one_process(tiny_model_dir, text_file, tmp_path):
    """The documented launcher command: 2 gloo ranks on the CPU."""
    from rsavq.stats.artifact import load_stats

    args = ["--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4"]
    args += ["--seqlen", "16", "--checkpoint-every", "0", "--device", "cpu"]
    assert main(["fisher", *args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(["fisher", *args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("Fisher statistics of 14 layers") == 1  # printed by rank 0 only
    assert "on 2 ranks" in run.stdout
    one, two = load_stats(tmp_path / "one"), load_stats(tmp_path / "two")
    for name in one.layer_names:
        a, b = one.layer(name), two.layer(name)
        assert (a.F_I - b.F_I).abs().max() <= 1e-4 * a.F_I.abs().max() and a.count == b.count


def test_quantize_under_torchrun_equals_one_process(tiny_model_dir, text_file, tmp_path):
    """Layer-parallel quantization with the documented launcher: the same checkpoint."""
    from safetensors.torch import load_file

    args = ["--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4"]
    args += ["--seqlen", "16", "--bits", "2", "--kmeans-iters", "2", "--lambda", "0"]
    args += ["--uniform-bits", "--finetune-epochs", "1", "--device", "cpu"]
    assert main(["quantize", *args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(["quantize", *args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("quantized 14 layers") == 1  # rank 0 reports
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert not (tmp_path / "two" / ".partial").exists()


def test_fisher_memory_budget_plans_passes_or_refuses(tiny_model_dir, text_file, tmp_path, capsys):
    args = ["fisher", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "2"]
    args += ["--seqlen", "16", "--out", str(tmp_path / "s")]
    assert main([*args, "--memory-budget", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "memory budget 1.00 KiB is too small for layer" in err and "minimum is" in err
    assert not (tmp_path / "s").exists()
    assert main([*args, "--memory-budget", "150KiB"]) == 0
    out = capsys.readouterr().out
    assert "plan: 14 layers in 4 pass(es)" in out and "; expected peak about " in out
