import io

import pytest
import torch
from transformers import AutoTokenizer

from rsavq.cli import main


def test_generate_streams_and_reports_speed(tiny_model_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "The quick", "--max-new-tokens"]
    assert main([*args, "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The quick")
    assert "[6 tokens in" in out and "tokens/s]" in out


def test_generate_greedy_is_deterministic(tiny_model_dir, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "a lazy", "--max-new-tokens"]
    main([*args, "5"])
    first = capsys.readouterr().out.split("[")[0]
    main([*args, "5"])
    assert capsys.readouterr().out.split("[")[0] == first


def test_chat_uses_the_template(tiny_model_dir, tmp_path, monkeypatch, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model_dir = tmp_path / "chat-model"
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).parent.mkdir(exist_ok=True)
        (model_dir / f.name).write_bytes(f.read_bytes())
    tok.save_pretrained(model_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello fox\n\nthe dog\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("tokens/s]") == 2  # two turns, blank line skipped


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--temperature", "-1"], "--temperature >= 0"), ([], "no chat template")],
)
def test_chat_errors(tiny_model_dir, monkeypatch, capsys, extra, message):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tiny_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture()
def quantized_dir(tmp_path, tiny_tokenizer):
    from helpers import build_tiny_llama
    from rsavq.config import preset
    from rsavq.pipeline import quantize_model

    # the default: row scales, blocks of columns with codebooks of their own
    config = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2)
    model = build_tiny_llama(len(tiny_tokenizer))
    windows = torch.randint(0, len(tiny_tokenizer), (4, 16))
    quantize_model(
        model, config, None, tmp_path / "q", tiny_tokenizer, progress=False, calibration=windows
    )
    return tmp_path / "q"


def test_every_backend_generates_the_same_text(quantized_dir, capsys):
    args = ["generate", "--model", str(quantized_dir), "--prompt", "the dog", "--max-new-tokens"]
    texts = []
    for backend in ("reference", "cpu", "auto"):
        assert main([*args, "6", "--backend", backend]) == 0
        texts.append(capsys.readouterr().out.split("[")[0])
    assert texts[0] == texts[1] == texts[2]
