"""The speed benchmark's table writer, on a cached result (no timing runs)."""

import json

import pytest
import torch

from helpers import load_benchmark


def load_speed():
    return load_benchmark("speed")


def _layer(shape, bits, tokens, dense, vq, ref):
    return {
        "shape": shape,
        "bits": bits,
        "tokens": tokens,
        "dense_ms": dense,
        "vq_ms": vq,
        "reference_ms": ref,
        "dense_over_vq": dense / vq,
        "reference_over_vq": ref / vq,
    }


def test_tables_from_cached_json(tmp_path):
    result = {
        "threads": 2,
        "groups": 1,
        "layers": [
            _layer("4096x4096", 2, 1, 4.0, 2.0, 300.0),
            _layer("4096x4096", 2, 512, 180.0, 240.0, 500.0),
            _layer("576x1536", 3, 1, 0.3, 0.6, 6.0),
        ],
        "models": [
            {
                "model": "smollm2-135m",
                "bits": 2,
                "new_tokens": 32,
                "fp_tokens_per_s": 13.0,
                "vq_tokens_per_s": 15.6,
                "vq_over_fp": 1.2,
                "linear_weights": 106168320,
                "vq_buffer_bytes": 27002880,
                "vq_bits_per_weight_in_memory": 2.0347,
            }
        ],
    }
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(result))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- speed:begin -->\nold\n<!-- speed:end -->\n\n## Next\n")
    load_speed().main(["--table-only", "--tables", str(path), "--markdown", str(md)])
    text = md.read_text()
    assert "old" not in text and text.endswith("<!-- speed:end -->\n\n## Next\n")
    assert "#### 2 thread(s), 1 WCSG group(s) per layer" in text
    row = "| 4096x4096 | 2 | 4.00 / 2.00 ms | **2.00** | 150 | 180.00 / 240.00 ms | **0.75** |"
    assert row in text
    assert "| 576x1536 | 3 | 0.30 / 0.60 ms | **0.50** | 10 | - | - |" in text
    assert "**1.20x of FP**" in text and "2.035 bits/weight" in text


def test_gpu_rows_run_under_the_triton_interpreter():
    pytest.importorskip("triton")  # on a CPU-only machine conftest set TRITON_INTERPRET=1
    speed = load_speed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = speed.gpu_rows([(24, 16)], [2], [1, 9], device, copy_numel=2**12, repeats=1)
    assert [(r["shape"], r["tokens"]) for r in rows] == [("24x16", 1), ("24x16", 9)]
    assert all(r["vq_ms"] > 0 and r["vq_fraction_of_copy_bandwidth"] > 0 for r in rows)
    table = speed.gpu_table(rows)
    assert "| 24x16 | 2 | 9 |" in table and "GB/s |" in table


@pytest.mark.parametrize("codebooks", ["default", "int8", "shared-long"])
def test_random_layers_in_each_codebook_format_run(codebooks):
    speed = load_speed()
    module = speed.random_vqlinear(60, 16, 2, codebooks=codebooks)
    assert (module.spec.codebook_source != "") == (codebooks == "shared-long")
    assert module.spec.vector_length == (6 if codebooks == "shared-long" else 4)
    x = torch.randn(3, 60)
    torch.testing.assert_close(module(x), x @ module.dequantize().T, rtol=1e-4, atol=1e-4)
    assert speed.layer_bytes(module) > 0
