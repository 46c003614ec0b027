"""`AutoModelForCausalLM.from_pretrained` on rsavq checkpoints (offline, tiny LLaMA)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rsavq  # registers quant_method "rsavq"
from helpers import build_tiny_llama, plain_config
from rsavq.config import preset
from rsavq.nn import VQLinear
from rsavq.pipeline import quantize_model
from rsavq.serialization import load_quantized

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["fisher-only", "default", "int8"])
def checkpoint(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("hf") / "q"
    if request.param == "default":  # row scales, codebooks per block of columns
        config = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2)
    elif request.param == "int8":  # int8 codebooks
        config = preset("default", 2, lam=0, uniform_bits=True, kmeans_iters=2,
                        codebook_dtype="int8")  # fmt: skip
    else:
        config = plain_config(bits=2, groups=2, lam=0, uniform_bits=True, kmeans_iters=2)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    model = build_tiny_llama(vocab_size=64, seed=7)
    quantize_model(model, config, None, out, progress=False, calibration=windows)
    return out


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_from_pretrained_builds_vqlinear_and_matches(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert sum(isinstance(m, VQLinear) for m in model.modules()) == 14
    assert model.config.quantization_config.quant_method == "rsavq"
    reference = load_quantized(checkpoint)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_save_pretrained_round_trips(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert again.model.layers[0].mlp.down_proj.codes_0.dtype == torch.int32


def test_device_map_cpu(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu", dtype=torch.float32)
    assert next(model.parameters()).device.type == "cpu"
    assert torch.isfinite(logits(model)).all()


def test_future_format_is_refused(checkpoint, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(rsavq.UsageError, match="format 99"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_codebooks_stay_fp16(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert all(book.dtype == torch.float16 for book in layer.codebooks)
    assert layer.perm.dtype == torch.int16
    assert logits(model).dtype == torch.bfloat16
    books = [
        t.dtype for n, t in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("codebooks")
    ]
    int8 = model.config.quantization_config.config.get("codebook_dtype") == "int8"
    assert set(books) == {torch.int8 if int8 else torch.float16}
