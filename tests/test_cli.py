import json

import pytest

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
    ("extra", "message"),
    [
        (["--bits", "7"], "unsupported bits 7"),
        (["--bits", "2", "--vector-length", "5"], "vector length 5 must be a positive multiple"),
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
        "--codes-only-budget",
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
    assert "collecting Fisher statistics" in out and "FP " in out and "-> RSAVQ" in out
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert "reusing Fisher statistics" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "b")]) == 2  # never overwrites a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err
