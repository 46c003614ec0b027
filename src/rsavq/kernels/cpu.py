"""CPU backend, a small C++ extension: lookup-table GEMVs for decode (AQLM's trick) and a
blockwise dequantize-and-multiply for prefill.

Decode (at most `DECODE_TOKENS` tokens): the input's sub-vectors are dotted
with every codeword once (tables `[T, J, K]`); each output is then a sum of `J` table entries
picked by the codes.
- Codes of at most 8 bits (every layout the default writes but the 5-bit key/value layers at 4
  bits): `vq_gemv16`. The codes are repacked once per layer into bytes, 64 rows side by side
  (`prepare`, kept in the caller's cache or until a tensor changes); per chunk of 64 codes the
  tables are computed straight into int16 (one step per token and chunk, a bound on the
  entries over 32000: each entry within half a step), held as byte planes in AVX-512 registers
  and summed exactly in int32. Row scales and bias are applied in the same call.
- Codes of 9-15 bits for pairs of weights in layers with fewer rows than codewords (the 5-bit
  key/value layers of the 4-bit default): `vq_gemv_wide`, no tables: each row gathers its
  codewords and dots them with `x[perm]` (a table would cost more than the layer itself).
- Other codes: `vq_gemv`, float tables, codes read from the packed int32 words (tables of <= 64
  entries in registers, larger ones looked up with gathers).

Prefill (more tokens): float32 inputs use `vq_prefill`. With AVX-512 it is a GEMM of its own
that never writes the weight out: per chunk of about 512 columns (in the codes' order), x[:, perm]
is packed once into panels of 32 tokens, and each thread decodes 12 rows of the chunk at a time
into an L1 buffer and multiplies them by every panel (12 x 32 accumulators in registers); row
scales and bias are applied as the last chunk is written. On CPUs with AMX (and a Linux that
grants its tile state) the same chunks go through the tile unit instead: x and the decoded rows
split into bfloat16 hi + lo, three bfloat16 products per multiply accumulated in float32 (at most
2^-16 of |x| |w| per product, float32's 2^-24; BENCHMARKS.md measures both paths);
`PREFILL_AMX = False` keeps the float32 one. Memory: per thread, the packed x and the partial
sums (4 bytes x tokens x (in + out features)), kept between calls. Without AVX-512
the weight is dequantized 1024 rows at a time (each row times its scale; x's columns permuted
once) and each block multiplied by torch's GEMM; memory: per thread, x permuted and one block
(4 bytes x (tokens + 1024) x in features), kept between calls. Other inputs
(bf16, autograd) use `vq_dequantize`: the whole float32 weight (columns in the codes' order)
once per call into a per-thread buffer kept between calls, then one matmul by `x[:, perm]`.

The extension also serves the quantizer's k-means (`nearest`: each point's nearest codeword
without writing the `[N, K]` distances; `rsavq.algorithms.kmeans.assign`).

The extension is compiled on first use (g++ and ninja, `-march=native`, or the target named by
the environment variable `RSAVQ_CPU_MARCH`, e.g. `haswell` to run the AVX2 kernels on a CPU with
AVX-512; cached by torch under `~/.cache/torch_extensions`); when that fails, `available()` is
False and dispatch uses the reference kernel. Without AVX-512 (AVX2: most AMD CPUs before Zen 4,
Intel client CPUs) decode looks tables of up to 128 entries up with `vpshufb` from byte planes
and those of 256 entries with plain loads of int16 entries; without AVX2, every table by loads.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from rsavq.config import LayerSpec
from rsavq.kernels.reference import scale_and_shift, unpack_block

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "lut_gemv.cpp"
DECODE_TOKENS = 8  # at most this many tokens per call use the LUT GEMV
BYTE_CODES = 8  # codes of at most this many bits decode with int16 tables (`vq_gemv16`)
PREFILL_COLUMNS = 0  # columns per chunk of `vq_prefill` (0: its own choice; tests set a few)
MARCH_VARIABLE = "RSAVQ_CPU_MARCH"  # the -march the extension is compiled for (default native)
PREFILL_AMX = True  # `vq_prefill` on the AMX tile unit where there is one (tests turn it off)
_extension = None
_failed = False
_local = threading.local()
_layers = WeakIdKeyDictionary()  # a layer's first codes tensor -> (key, `prepare`'s result)


def extension():
    """The compiled extension module, or None when it cannot be built here."""
    global _extension, _failed
    if _extension is None and not _failed:
        try:
            from torch.utils.cpp_extension import load

            march = os.environ.get(MARCH_VARIABLE, "native")
            suffix = "" if march == "native" else "_" + march.replace("-", "_")
            logger.info("loading the CPU kernels (compiled on first use: about a minute)")
            _extension = load(
                name="rsavq_lut_gemv" + suffix,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # compiler or ninja missing: fall back, say why once
            _failed = True
            logger.warning("CPU kernels unavailable (%s); using the reference kernel", exc)
    return _extension


def available() -> bool:
    return extension() is not None


@torch.library.custom_op("rsavq::vq_gemv", mutates_args=())
def vq_gemv(
    x: torch.Tensor,
    perm: torch.Tensor,
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    sizes: list[int],
    widths: list[int],
    vector_length: int,
    rows: int,
) -> torch.Tensor:
    """`[T, n]` float32 inputs -> `[T, rows]` outputs of all input-channel groups (no bias)."""
    return extension().vq_gemv(x, perm, codes, codebooks, sizes, widths, vector_length, rows)


@vq_gemv.register_fake
def _(x, perm, codes, codebooks, sizes, widths, vector_length, rows):
    return x.new_empty(x.shape[0], rows)


@torch.library.custom_op("rsavq::vq_dequantize", mutates_args=())
def vq_dequantize(
    codes: list[torch.Tensor],
    codebooks: list[torch.Tensor],
    sizes: list[int],
    widths: list[int],
    vector_length: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The float32 weight `[out_features, in_features]`, columns in the codes' permuted order
    (`W[:, perm]`, to meet `x[:, perm]`)."""
    args = (codes, codebooks, sizes, widths, vector_length, out_features, in_features)
    return extension().vq_dequantize(*args, None)


@vq_dequantize.register_fake
def _(codes, codebooks, sizes, widths, vector_length, out_features, in_features):
    return codebooks[0].new_empty(out_features, in_features, dtype=torch.float32)


@functools.lru_cache(maxsize=1024)
def _spec_args(spec: LayerSpec) -> tuple[list[int], list[int], int]:
    widths = [spec.code_bits(g) for g in range(len(spec.group_sizes))]
    return list(spec.group_sizes), widths, spec.vector_length


def _workspace(numel: int) -> torch.Tensor:
    """This thread's float32 buffer for dequantized weights (grown to the largest layer seen)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        _local.buffer = buffer = torch.empty(numel)
    return buffer


# Eager calls go to the extension directly (the same functions without the custom ops' Python
# dispatch, ~30 us per call: decode calls are short); `torch.compile` traces the custom ops.
def _gemv(x, perm, codes, books, spec: LayerSpec) -> torch.Tensor:
    args = (x, perm, codes, books, *_spec_args(spec), spec.out_features)
    return vq_gemv(*args) if torch.compiler.is_compiling() else extension().vq_gemv(*args)


def _dequantize(codes, books, spec: LayerSpec, reuse: bool) -> torch.Tensor:
    """The weight for one matmul; in the shared workspace when `reuse` (autograd saves none)."""
    args = (codes, books, *_spec_args(spec), spec.out_features, spec.in_features)
    if torch.compiler.is_compiling():
        return vq_dequantize(*args)
    workspace = _workspace(spec.out_features * spec.in_features) if reuse else None
    return extension().vq_dequantize(*args, workspace)


@functools.lru_cache(maxsize=1024)
def byte_codes(spec: LayerSpec) -> bool:
    """Whether `vq_gemv16` serves the layer: codes of <= 8 bits."""
    return all(spec.code_bits(g) <= BYTE_CODES for g in range(len(spec.group_sizes)))


@functools.lru_cache(maxsize=1024)
def wide_codes(spec: LayerSpec) -> bool:
    """Whether `vq_gemv_wide` serves the layer's decode: codes of 9-15 bits for pairs of weights
    (P = 1, d = 2) and fewer output rows than codewords, where tables would cost more than the
    layer's own multiply-adds."""
    widest = max(_spec_args(spec)[1])
    pairs = spec.sub_vectors == 1 and spec.vector_length == 2
    return pairs and BYTE_CODES < widest <= 15 and spec.out_features < 2**widest


def _perm32(perm, cache) -> torch.Tensor:
    return _kept(cache, "perm32", lambda: perm.int().contiguous())


def _books32(codebooks, cache) -> list[torch.Tensor]:
    """The fp16 codebooks widened to float32 (prefill and the wide-code decode read them)."""
    return _kept(cache, "books32", lambda: [b.half().float().contiguous() for b in codebooks])


def _wide_args(codes, codebooks, perm, spec: LayerSpec, bias, scales, cache) -> tuple:
    """`vq_gemv_wide`'s arguments after x: int16 codes, float32 codeword pairs, group sizes."""
    codes16 = [unpack_block(c, spec, g).flatten(1).to(torch.int16) for g, c in enumerate(codes)]
    pairs = [b.view(-1, 2) for b in _books32(codebooks, cache)]
    sizes = _spec_args(spec)[0]
    return (_perm32(perm, cache), codes16, pairs, sizes, _half(scales), _float(bias))


def _key(tensors) -> tuple:
    return tuple((id(t), t._version) for t in tensors)


def prepare(codes, codebooks, perm, spec: LayerSpec) -> tuple:
    """What `vq_gemv16` reads of a layer: int32 perm, the codes repacked (uint8 `[tiles, J, 64]`),
    the codebooks as float32 `[P, d, Kp]` (transposed, zero-padded to 64/128/256 entries) one
    after another, each group's longest codeword, and per group `(columns, P, J, Kp, offset)`."""
    widths = [spec.code_bits(g) for g in range(len(codes))]
    J = [spec.codes_per_row(g) for g in range(len(codes))]
    books, norms, meta, offset = [], [], [], 0
    for g, book in enumerate(codebooks):
        P, K, d = book.shape
        Kp = 64 if K <= 64 else (128 if K <= 128 else 256)
        t = F.pad(book.float().transpose(1, 2), (0, Kp - K))  # [P, d, Kp]
        books.append(t.reshape(-1))
        norms.append(book.float().norm(dim=-1).max())
        meta.append((spec.group_sizes[g], P, J[g], Kp, offset))
        offset += t.numel()
    packed = extension().vq_repack(list(codes), widths, J)
    return perm.int().contiguous(), packed, torch.cat(books), torch.stack(norms), torch.tensor(meta)


def _prepared(codes, codebooks, perm, spec: LayerSpec) -> tuple:
    """`prepare`'s result, kept per layer (on its first codes tensor) until a tensor changes."""
    key = (spec, _key(codes), _key(codebooks), id(perm), perm._version)
    hit = _layers.get(codes[0])
    if hit is None or hit[0] != key:
        hit = (key, prepare(codes, codebooks, perm, spec))
        _layers[codes[0]] = hit
    return hit[1]


def _state(codes, codebooks, perm, spec: LayerSpec, cache) -> tuple:
    if cache is None:
        return _prepared(codes, codebooks, perm, spec)
    return cache.get("cpu") or cache.setdefault("cpu", prepare(codes, codebooks, perm, spec))


def _kept(cache, key: str, make):
    """`make()`, kept in `cache` under `key` (made anew each call without a cache)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _decode_args(codes, codebooks, perm, spec: LayerSpec, bias, scales, cache) -> tuple:
    """`vq_gemv16`'s arguments after x, kept in `cache` (a decode call is short: the Python
    around it counts)."""
    state = _state(codes, codebooks, perm, spec, cache)  # perm32, packed, books, norms, meta
    return (*state, spec.vector_length, spec.out_features, _half(scales), _float(bias))


def _decode_kernel(spec: LayerSpec) -> tuple | None:
    """The layer's decode kernel: its name in the extension, the cache key of its arguments, the
    function that makes them and the name of its checked form (`decoder`; None: no LUT decode
    kernel serves the layer)."""
    if byte_codes(spec):
        return "vq_gemv16", "gemv16", _decode_args, "decode16"
    if wide_codes(spec):
        return "vq_gemv_wide", "wide", _wide_args, "decode_wide"
    return None


def decoder(codes, codebooks, perm, spec: LayerSpec, bias=None, scales=None, cache=None):
    """A function `x -> y` for the layer's decode calls, its kernel and arguments bound once
    (a decode call of a small layer takes tens of microseconds, of which the dispatch through
    `vq_linear` took a sizeable share). It returns None for an input it does not serve (not a
    contiguous float32 CPU tensor of at most `DECODE_TOKENS` tokens, or under `torch.compile`):
    use `vq_linear`. None for a layer no decode kernel serves. Arguments are prepared on the
    first call it serves."""
    chosen = _decode_kernel(spec)
    if chosen is None:
        return None
    _, key, make, checked = chosen
    gemv, args = getattr(extension(), checked), None
    compiling = torch.compiler.is_compiling

    def decode(x: torch.Tensor) -> torch.Tensor | None:
        # the input is checked and shaped by the extension (`checked`): from Python each tensor
        # attribute or view costs microseconds of cold caches after a large layer has run
        nonlocal args
        if compiling():
            return None
        if args is None:
            args = _kept(
                cache, key, lambda: make(codes, codebooks, perm, spec, bias, scales, cache)
            )
        return gemv(x, DECODE_TOKENS, *args)

    return decode


def vq_linear(
    x, codes, codebooks, perm, spec: LayerSpec, bias=None, scales=None, cache=None
) -> torch.Tensor:
    """The kernel contract on the CPU: LUT GEMV for decode, a decoding GEMM for float32 prefill,
    dequantize + matmul otherwise (`cache`: see `rsavq.kernels.vq_linear`)."""
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    decode = x2.shape[0] <= DECODE_TOKENS
    eager = not torch.compiler.is_compiling()
    if eager and decode and (chosen := _decode_kernel(spec)) is not None:
        kernel, key, make, _ = chosen
        args = _kept(cache, key, lambda: make(codes, codebooks, perm, spec, bias, scales, cache))
        out = getattr(extension(), kernel)(_float(x2), *args)
        return (out if x.dtype == torch.float32 else out.to(x.dtype)).view(*lead, -1)
    grad = torch.is_grad_enabled() and x.requires_grad
    if eager and not decode and x.dtype == torch.float32 and not grad:
        args = (*_spec_args(spec), spec.out_features, _half(scales), _float(bias))
        args = (*args, PREFILL_COLUMNS, PREFILL_AMX)
        perm32, books32 = _perm32(perm, cache), _books32(codebooks, cache)
        out = extension().vq_prefill(x2.contiguous(), perm32, list(codes), books32, *args)
        return out.reshape(*lead, spec.out_features)
    books = [cb.half().contiguous() for cb in codebooks]
    if decode:
        out = _gemv(x2.float().contiguous(), perm, list(codes), books, spec)
    else:
        W = _dequantize(list(codes), books, spec, reuse=not grad)
        out = F.linear(x2[:, perm.long()], W.to(x.dtype))
    return scale_and_shift(out, scales, bias).to(x.dtype).reshape(*lead, spec.out_features)


def _half(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float16 and t.is_contiguous()):
        return t
    return t.half().contiguous()


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


def serves_stored(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `stored_gemv` takes `x [T, n]` times `weight`: float32 inputs of at most
    `DECODE_TOKENS` tokens, a bfloat16 weight, no autograd, the extension built."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (
        x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and not grad
        and x.shape[0] <= DECODE_TOKENS and available()
    )  # fmt: skip


@torch.library.custom_op("rsavq::stored_gemv", mutates_args=())
def stored_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`[T, n]` float32 inputs times a `[m, n]` bfloat16 weight -> `[T, m]` float32 (no bias)."""
    return extension().stored_gemv(x, weight)


@stored_gemv.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])
