import json

import pytest
import torch

from helpers import build_tiny_llama, plain_config
from rsavq.errors import UsageError
from rsavq.pipeline import quantize_model
from rsavq.serialization import load_quantized

CONFIG = plain_config(
    bits=2, groups=1, uniform_bits=True, lam=0, kmeans_iters=2, budget_includes_overhead=False
)


@pytest.fixture()
def checkpoint(tmp_path):
    quantize_model(build_tiny_llama(vocab_size=64), CONFIG, None, tmp_path / "q", progress=False)
    return tmp_path / "q"


def test_load_to_bfloat16(checkpoint):
    model = load_quantized(checkpoint, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.codebooks[0].dtype == torch.float16


def test_not_a_quantized_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(UsageError, match="not an rsavq checkpoint"):
        load_quantized(tiny_model_dir)
    with pytest.raises(UsageError, match="no config.json"):
        load_quantized(tmp_path)


def test_format_version_checked(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="rsavq format 99"):
        load_quantized(checkpoint)


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_still_load(checkpoint, version):
    """Format 2 only added optional row scales, format 3 optional int8 codebooks: a
    checkpoint of an older format loads unchanged."""
    before = load_quantized(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    for spec in config["quantization_config"]["layers"].values():
        assert "codebook_dtype" not in spec
        if version == 1:
            del spec["row_scales"]  # format 1 specs have no such key
    (checkpoint / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(checkpoint)(ids).logits, before(ids).logits)


def test_corrupt_or_truncated_weights(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="incomplete or corrupt"):
        load_quantized(checkpoint)


def test_shape_mismatch_detected(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    spec = config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]
    spec["group_bits"] = [3]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="has shape .* the config says"):
        load_quantized(checkpoint)


def test_missing_codes_detected(checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.0.mlp.up_proj.codes_0"]
    save_file(state, str(weights))
    with pytest.raises(UsageError, match="lacks tensors .*up_proj.codes_0"):
        load_quantized(checkpoint)
