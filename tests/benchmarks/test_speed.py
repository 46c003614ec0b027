"""The speed benchmark's table writer, on a cached result (no timing runs)."""

import json

import pytest
import torch

from helpers import load_benchmark


def load_speed():
    return load_benchmark("speed")


def _layer(shape, bits, tokens, dense, vq, ref, bf16=None, stored=4_000_000):
    row = {
        "shape": shape,
        "bits": bits,
        "tokens": tokens,
        "dense_ms": dense,
        "vq_ms": vq,
        "dense_over_vq": dense / vq,
        "vq_bytes": stored,
        "vq_gbs": stored / vq / 1e6,
        "bandwidth_share": stored / vq / 1e6 / 10.0,
    }
    if tokens == 1:
        row |= {"bf16_ms": bf16, "bf16_over_vq": bf16 / vq, "reference_ms": ref}
    return row


def test_tables_from_cached_json(tmp_path):
    result = {
        "threads": 1,
        "cores": 2,
        "groups": 1,
        "format": "format 2: the default's vectors, blocks and row scales",
        "bandwidth_gbs": {"1": 10.0, "2": 18.0},
        "layers": [
            _layer("4096x4096", 2, 1, 4.0, 0.8, 300.0, bf16=3.0),
            _layer("4096x4096", 2, 512, 180.0, 200.0, 500.0),
            _layer("576x1536", 3, 1, 0.3, 0.2, 6.0, bf16=0.4, stored=400_000),
        ],
        "models": [
            {
                "model": "smollm2-135m",
                "bits": 2,
                "new_tokens": 32,
                "rounds": 3,
                "fp_tokens_per_s": 13.0,
                "fp_bf16_tokens_per_s": 10.0,
                "vq_tokens_per_s": 26.0,
                "vq_over_fp": 2.0,
                "vq_over_fp_bf16": 2.6,
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
    assert "#### 1 thread(s), format 2" in text
    assert "10.0 GB/s with 1 thread, 18.0 GB/s with all 2 cores" in text
    row = (
        "| 4096x4096 | 2 | 4.00 / 3.00 / 0.800 ms | **5.00** | **3.75** | 5.0 | 50% "
        "| 180.0 / 200.0 ms | **0.90** |"
    )
    assert row in text
    assert (
        "| 576x1536 | 3 | 0.30 / 0.40 / 0.200 ms | **1.50** | **2.00** | 2.0 | 20% | - | - |"
        in text
    )
    assert "**2.00x of FP** (**2.60x** of FP bf16)" in text and "2.035 bits/weight" in text


def test_read_bandwidth_is_measured():
    gbs = load_speed().read_bandwidth(1, numel=2**22) / 1e9
    assert 0.1 < gbs < 1000


def test_gpu_rows_run_under_the_triton_interpreter():
    pytest.importorskip("triton")  # on a CPU-only machine conftest set TRITON_INTERPRET=1
    speed = load_speed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = speed.gpu_rows([(24, 16)], [2], [1, 9], device, copy_numel=2**12, repeats=1)
    assert [(r["shape"], r["tokens"]) for r in rows] == [("24x16", 1), ("24x16", 9)]
    assert all(r["vq_ms"] > 0 and r["vq_fraction_of_copy_bandwidth"] > 0 for r in rows)
    table = speed.gpu_table(rows)
    assert "| 24x16 | 2 | 9 |" in table and "GB/s |" in table


@pytest.mark.parametrize("codebooks", ["default", "int8"])
def test_random_layers_in_each_codebook_format_run(codebooks):
    speed = load_speed()
    module = speed.random_vqlinear(60, 16, 2, codebooks=codebooks)
    assert module.spec.codebook_dtype == ("int8" if codebooks == "int8" else "float16")
    assert module.spec.vector_length == 4
    x = torch.randn(3, 60)
    torch.testing.assert_close(module(x), x @ module.dequantize().T, rtol=1e-4, atol=1e-4)
    assert speed.layer_bytes(module) > 0


def test_busy_processes_run_while_the_block_runs_and_stop_after():
    speed = load_speed()
    with speed.busy_processes(1):
        pass  # started and killed; a leak would keep the test process from exiting cleanly
    assert speed.render(
        [
            {
                "threads": 2,
                "format": "format 2",
                "load": 1,
                "bandwidth_gbs": {"1": 10.0, "2": 18.0},
                "layers": [],
                "models": [],
            }
        ]
    ).startswith("#### 2 thread(s), format 2, while 1 busy process(es) shared the cores")


def test_kernel_state_bytes_count_what_the_cpu_decode_keeps():
    from rsavq.kernels import cpu

    speed = load_speed()
    module = speed.random_vqlinear(256, 64, 2)
    assert speed.kernel_state_bytes(module) == 0
    module(torch.randn(1, 256))
    if cpu.available():  # the repacked codes: one byte per code, 64 rows per tile
        assert speed.kernel_state_bytes(module) >= 64 * 64


def test_model_line_names_a_real_checkpoint_and_the_embeddings_dtype():
    speed = load_speed()
    row = {
        "model": "smollm2-135m", "bits": 4, "new_tokens": 32, "rounds": 3,
        "fp_tokens_per_s": 13.0, "fp_bf16_tokens_per_s": 10.0, "vq_tokens_per_s": 22.1,
        "vq_over_fp": 1.7, "vq_over_fp_bf16": 2.21, "linear_weights": 106168320,
        "vq_buffer_bytes": 53000000, "vq_bits_per_weight_in_memory": 3.99,
    }  # fmt: skip
    assert "random 4-bit VQLinear, embeddings in float32, 22.10" in speed.model_line(row)
    line = speed.model_line(row | {"checkpoint": "rsavq-4-s0", "embeddings": "bfloat16"})
    assert "the default's 4-bit checkpoint (`rsavq-4-s0`, loaded as saved), embeddings in " in line
    assert "bfloat16, 22.10 tokens/s: **1.70x of FP**" in line
