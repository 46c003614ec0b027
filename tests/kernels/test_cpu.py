"""The CPU kernels (LUT GEMV, dequantize + matmul) against the reference kernel (the oracle)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_SHAPES, assert_prefill_close
from helpers import random_vq_layer as random_layer
from rsavq.kernels import Backend, choose_backend, cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ extension cannot be built here")


def int16_error_bound(x, books, spec, scales) -> float:
    """The most an output of `vq_gemv16` may differ from the float sum: half a step per code,
    the step at most |x_j| |codeword| / 32000 <= sub_dim * max|x| * max|codeword entry| / 32000."""
    codes = sum(spec.codes_per_row(g) for g in range(len(books)))
    top = spec.sub_dim * x.abs().max() * max(b.float().abs().max() for b in books)
    return float(codes * top / 64000 * scales.float().abs().max()) + 1e-5


def amx_here() -> bool:
    return cpu.available() and cpu.extension().prefill_amx()


@pytest.fixture(params=["float32", "amx"])
def prefill_path(request, monkeypatch) -> str:
    """Each prefill test on both paths: float32 FMAs and, where the CPU has it, the AMX tiles."""
    if request.param == "amx" and not amx_here():
        pytest.skip("no AMX tile unit here")
    monkeypatch.setattr(cpu, "PREFILL_AMX", request.param == "amx")
    return request.param


def assert_close_on(path: str, got, want, x, layer, scales) -> None:
    """float32 kernel: 1e-4; AMX: its bound (`helpers.assert_prefill_close`)."""
    if path == "float32":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    spec, perm, codes, books = layer
    W = reference.dequantize(codes, books, perm, spec) * scales.float()[:, None]
    assert_prefill_close(got, want, x, W)


@pytest.mark.parametrize("tokens", [1, 3, 5, 8, 9, 40])  # > 8: prefill
@pytest.mark.parametrize(("m", "n", "sizes", "bits", "v", "P"), KERNEL_SHAPES)
def test_cpu_matches_reference(tokens, m, n, sizes, bits, v, P):
    layer = spec, perm, codes, books = random_layer(m, n, sizes, bits, v, P, m * n + tokens)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    bias, scales = torch.randn(m), (torch.rand(m) + 0.5).half()
    want = reference.vq_linear(x, codes, books, perm, spec, bias, scales)
    got = cpu.vq_linear(x, codes, books, perm, spec, bias, scales)
    if tokens > cpu.DECODE_TOKENS:
        assert_close_on("amx" if amx_here() else "float32", got, want, x, layer, scales)
        return
    atol = int16_error_bound(x, books, spec, scales) if cpu.byte_codes(spec) else 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("columns", [8, 24])
@pytest.mark.parametrize(("m", "n", "sizes", "bits", "v", "P"), KERNEL_SHAPES)
def test_prefill_in_chunks_of_columns_matches_reference(
    monkeypatch, prefill_path, columns, m, n, sizes, bits, v, P
):
    """Several chunks (partial sums kept between them), tokens past a panel of 32 (a tile of 16),
    rows past a tile of 12 (a block of 16), a chunk edge inside a block of columns."""
    monkeypatch.setattr(cpu, "PREFILL_COLUMNS", columns)
    layer = spec, perm, codes, books = random_layer(m, n, sizes, bits, v, P, m + n + columns)
    x = torch.randn(45, n, generator=torch.Generator().manual_seed(columns))
    bias, scales = torch.randn(m), (torch.rand(m) + 0.5).half()
    want = reference.vq_linear(x, codes, books, perm, spec, bias, scales)
    got = cpu.vq_linear(x, codes, books, perm, spec, bias, scales)
    assert_close_on(prefill_path, got, want, x, layer, scales)


def test_a_token_with_nan_or_inf_gives_nan_not_zeros():
    spec, perm, codes, books = random_layer(64, 40, (40,), (2,), 4, 1)
    x = torch.randn(3, 40)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    y = cpu.vq_linear(x, codes, books, perm, spec)
    assert y[0].isfinite().all() and y[1:].isnan().all()


def test_int16_tables_serve_the_default_layouts():
    spec = random_layer(130, 200, (136, 64), (2, 2), 4, 1)[0]
    assert cpu.byte_codes(spec)
    assert not cpu.byte_codes(random_layer(70, 36, (18, 18), (3, 5), 2, 1)[0])  # 10-bit codes


@pytest.mark.parametrize(
    ("m", "n", "sizes", "bits", "v", "P"),
    [(130, 200, (136, 64), (2, 2), 4, 1), (70, 36, (18, 18), (3, 5), 2, 1)],  # bytes, wide
)
def test_checked_decode_serves_its_inputs_and_none_else(m, n, sizes, bits, v, P):
    """The decode kernels' checked forms (what `VQLinear` calls): any leading shape of at most
    `limit` tokens in, the kernel's output in that shape out; None for anything else."""
    spec, perm, codes, books = random_layer(m, n, sizes, bits, v, P, 5)
    kernel, _, make, checked = cpu._decode_kernel(spec)
    args = make(codes, books, perm, spec, torch.randn(m), (torch.rand(m) + 0.5).half(), None)
    ext = cpu.extension()
    x = torch.randn(2, 3, n)
    y = getattr(ext, checked)(x, 6, *args)
    assert y.shape == (2, 3, m)
    assert torch.equal(y, getattr(ext, kernel)(x.view(6, n), *args).view(2, 3, m))
    wide = torch.randn(2, 3, 2 * n)
    others = [x, x.double(), wide[..., ::2], torch.randn(1, n + 1), torch.randn(0)]
    limits = [5, 6, 6, 6, 6]  # 6 tokens over a limit of 5, then one thing wrong each
    for other, limit in zip(others, limits, strict=True):
        assert getattr(ext, checked)(other, limit, *args) is None


def test_a_kept_cache_is_reused_and_emptying_it_reads_the_layer_again():
    spec, perm, codes, books = random_layer(64, 40, (40,), (2,), 4, 1)
    x, cache = torch.randn(1, 40), {}
    first = cpu.vq_linear(x, codes, books, perm, spec, cache=cache)
    state = cache["cpu"]
    assert cpu.vq_linear(x, codes, books, perm, spec, cache=cache) is not None
    assert cache["cpu"] is state
    books[0].mul_(2)  # the caller changes the layer and empties its cache
    cache.clear()
    again = cpu.vq_linear(x, codes, books, perm, spec, cache=cache)
    torch.testing.assert_close(again, 2 * first, rtol=1e-3, atol=1e-3)


def test_without_a_cache_a_changed_tensor_is_seen():
    spec, perm, codes, books = random_layer(64, 40, (40,), (2,), 4, 1)
    x = torch.randn(1, 40)
    first = cpu.vq_linear(x, codes, books, perm, spec)
    books[0].mul_(2)
    torch.testing.assert_close(
        cpu.vq_linear(x, codes, books, perm, spec), 2 * first, rtol=1e-3, atol=1e-3
    )


def test_batch_dims_and_dtype_are_kept():
    spec, perm, codes, books = random_layer(8, 12, (12,), (2,))
    x = torch.randn(2, 1, 12, dtype=torch.bfloat16)
    got = cpu.vq_linear(x, codes, books, perm, spec)
    assert got.shape == (2, 1, 8) and got.dtype == torch.bfloat16
    want = reference.vq_linear(x.float(), codes, books, perm, spec)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_dispatch_by_device():
    assert choose_backend(torch.randn(1, 12)) == Backend.CPU
    assert choose_backend(torch.randn(64, 12)) == Backend.CPU  # prefill: dequantize + matmul
    assert choose_backend(torch.randn(1, 12, device="meta")) == Backend.REFERENCE


def test_custom_op_has_a_fake_implementation():
    spec, perm, codes, books = random_layer(8, 18, (12, 6), (2, 3))
    x = torch.randn(2, 18)
    widths = [spec.code_bits(g) for g in range(2)]
    torch.library.opcheck(cpu.vq_gemv, (x, perm, codes, books, [12, 6], widths, 6, 8))
    args = (codes, books, [12, 6], widths, 6, 8, 18)
    torch.library.opcheck(cpu.vq_dequantize, args)


@pytest.mark.parametrize("tokens", [2, 20])
def test_traced_by_torch_compile_through_the_custom_ops(tokens):
    spec, perm, codes, books = random_layer(70, 36, (18, 18), (2, 3))
    x = torch.randn(tokens, 36)

    def f(x):
        return cpu.vq_linear(x, codes, books, perm, spec)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference.vq_linear(x, codes, books, perm, spec))


def test_prefill_workspace_is_not_shared_with_autograd():
    spec, perm, codes, books = random_layer(16, 24, (24,), (2,))
    other = random_layer(16, 24, (24,), (3,), seed=1)
    x = torch.randn(12, 24, requires_grad=True)
    y = cpu.vq_linear(x, codes, books, perm, spec)
    cpu.vq_linear(x.detach(), *other[2:], other[1], other[0])  # reuses the workspace
    y.sum().backward()
    W = reference.dequantize(codes, books, perm, spec)
    torch.testing.assert_close(x.grad, W.sum(0).expand(12, -1), rtol=1e-4, atol=1e-4)


def test_prefill_over_more_tokens_than_one_block_of_panels_matches_reference(prefill_path):
    """1100 tokens x 400 columns: the token panels are multiplied in two blocks (each decodes the
    rows again); on AMX, 69 tiles of 16 tokens (an odd one last) and 2 blocks of 16 rows."""
    layer = spec, perm, codes, books = random_layer(30, 400, (200, 200), (3, 2), 2, 1)
    x, scales = torch.randn(1100, 400), (torch.rand(30) + 0.5).half()
    want = reference.vq_linear(x, codes, books, perm, spec, None, scales)
    got = cpu.vq_linear(x, codes, books, perm, spec, None, scales)
    assert_close_on(prefill_path, got, want, x, layer, scales)


def test_amx_prefill_is_within_its_bound_on_a_real_layer_shape():
    """576 x 1536 with 512 tokens (SmolLM2's MLP, 4 bits): a 2^-16 bound that holds at this
    size, and an error that is actually that of three bfloat16 products (not of one)."""
    if not amx_here():
        pytest.skip("no AMX tile unit here")
    layer = spec, perm, codes, books = random_layer(1536, 576, (576,), (4,), 2, 1, 3)
    x, scales = torch.randn(512, 576), (torch.rand(1536) + 0.5).half()
    want = reference.vq_linear(x, codes, books, perm, spec, None, scales)
    got = cpu.vq_linear(x, codes, books, perm, spec, None, scales)
    assert_close_on("amx", got, want, x, layer, scales)
    W = reference.dequantize(codes, books, perm, spec)
    one_product = x.bfloat16().float() @ W.bfloat16().float().T * scales.float()
    assert (got - want).abs().max() < (one_product - want).abs().max() / 50


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2; neither AVX2 nor AVX-512
def test_the_extension_compiles_for_a_cpu_without_avx512(march):
    """The fallbacks (`#else` of every AVX-512 path) are compiled nowhere else on this machine."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    command = ["g++", "-fsyntax-only", "-std=c++17", f"-march={march}", "-fopenmp", "-w"]
    done = subprocess.run([*command, *includes, str(cpu.SOURCE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


@pytest.mark.skipif(
    shutil.which("g++") is None or not {"avx2", "avx512vbmi", "avx512_vnni"} <= cpu_flags(),
    reason="needs g++ and a CPU whose native build is not the AVX2 one",
)
def test_the_avx2_kernels_match_the_reference_on_a_cpu_with_avx512():
    """The native build of a CPU with AVX-512 never runs the AVX2 look-ups: built for haswell
    (`RSAVQ_CPU_MARCH`, a second extension compiled here), every decode and prefill case of
    `test_cpu_matches_reference` runs them."""
    env = {**os.environ, cpu.MARCH_VARIABLE: "haswell"}
    test = f"{__file__}::test_cpu_matches_reference"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    root = Path(__file__).parents[2]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]
    assert "CPU kernels unavailable" not in done.stdout + done.stderr


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize(("m", "n"), [(4, 16), (7, 33), (64, 576), (130, 17)])
def test_stored_gemv_matches_the_widened_weight(tokens, m, n):
    """A bfloat16 weight times float32 inputs equals F.linear on the weight widened to float32
    (row tiles of 4 with a remainder, column tails under 16), up to float32 rounding: outputs
    reach ~sqrt(n) and the BLAS behind F.linear sums in its own order (on an AMD Zen 4 host a
    576-term sum differed by 1.2e-5)."""
    torch.manual_seed(0)
    x, w = torch.randn(tokens, n), torch.randn(m, n).bfloat16()
    assert cpu.serves_stored(x, w)
    y = cpu.stored_gemv(x, w)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.float()), rtol=1e-5, atol=1e-4)


def test_stored_linear_serves_decode_and_widens_otherwise():
    from rsavq.kernels import stored_linear

    torch.manual_seed(0)
    w, b = torch.randn(10, 24).bfloat16(), torch.randn(10)
    for shape in [(1, 1, 24), (2, 3, 24), (1, 40, 24)]:  # 40 tokens: widened for F.linear
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, w.float(), b)
        torch.testing.assert_close(stored_linear(x, w, b), expected, rtol=1e-5, atol=1e-5)
    assert not cpu.serves_stored(torch.randn(9, 24), w)  # more than DECODE_TOKENS
    assert not cpu.serves_stored(torch.randn(1, 24).bfloat16(), w)


@pytest.mark.parametrize(
    ("n", "D", "K"), [(1, 4, 1), (5, 4, 7), (37, 6, 16), (130, 4, 33), (515, 8, 256), (70, 4, 1024)]
)
def test_nearest_is_the_argmin_of_the_products(n, D, K):
    """`nearest` (k-means' assignment) against the [n, K] products and their min: row tiles of 4
    with a remainder, codeword tails under 16; ties go to the lowest codeword."""
    gen = torch.Generator().manual_seed(n * K)
    lhs, rhs = torch.randn(n, D, generator=gen), torch.randn(D, K, generator=gen)
    idx, best = cpu.extension().nearest(lhs, rhs)
    products = lhs @ rhs
    assert torch.equal(idx, products.argmin(dim=1))
    torch.testing.assert_close(best, products.min(dim=1).values, rtol=1e-5, atol=1e-5)
    twins = torch.cat([rhs, rhs], dim=1)  # every codeword twice: the first copy wins
    assert torch.equal(cpu.extension().nearest(lhs, twins)[0], idx)
