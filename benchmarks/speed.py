"""Inference speed: VQLinear vs the dense layer it replaces, against the machine's bandwidth,
and whole-model decode, side by side.

    python benchmarks/speed.py --threads 1 --json benchmarks/results/speed-1thread.json
    python benchmarks/speed.py --table-only                # rewrite BENCHMARKS.md's tables
    python benchmarks/speed.py --threads 1 --bits 2 --model-bits 2 --codebooks int8 \
        --json benchmarks/results/speed-1thread-int8.json

First the yardstick: the machine's read bandwidth (a float32 sum over 1 GiB) with 1 thread and
with all. Layers (random codes: speed does not depend on their values): shapes in x out
576x1536, 1536x576, 4096x4096, 11008x4096 at 2/3/4 bits in the default configuration's format
(vector length by width, blocks of columns with their own codebooks, row scales; one WCSG group
unless `--groups`; `--codebooks int8`: int8 codebooks, more blocks). Decode (1 token) is timed
interleaved with the dense `F.linear` of the same shape in float32 and in bfloat16 (not with the
reference kernel: its large temporaries slowed every call timed beside it, dense ones 2x); its
effective bandwidth is the bytes the layer stores over its time. Prefill
(512 tokens) is timed against float32 dense; on CPUs with AMX, where prefill runs on the tile
unit, the float32 kernel's prefill is timed beside it (its own column). Ratios are dense / VQ:
> 1 means VQ is faster.
Whole model: SmolLM2-135M greedy decode tokens/s, the FP model in float32 and in bfloat16 vs
the same model with every decoder linear replaced by a VQLinear of random codes. With a CUDA
GPU, also the Triton kernels vs fp16 cuBLAS at 1, 8 and 512 tokens, and the bytes the VQ call
moves per second as a fraction of a device-to-device copy's (the practical bandwidth limit).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from rsavq.algorithms.rsavq import split_blocks
from rsavq.allocation import split_sizes
from rsavq.clock import cpu_name
from rsavq.config import LayerSpec, preset
from rsavq.io import atomic_write_json, rewrite_block
from rsavq.kernels import Backend, choose_backend
from rsavq.kernels import cpu as cpu_kernels
from rsavq.nn import VQLinear
from rsavq.packing import pack

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (11008, 4096)]
TABLES = (
    "benchmarks/results/speed-1thread.json,benchmarks/results/speed-2threads.json,"
    "benchmarks/results/speed-2threads-loaded.json,benchmarks/results/speed-1thread-int8.json,"
    "benchmarks/results/speed-1thread-e.json,benchmarks/results/speed-2threads-e.json,"
    "benchmarks/results/speed-checkpoints.json,benchmarks/results/speed-1thread-avx2.json,"
    "benchmarks/results/speed-2threads-avx2.json"
)


CODEBOOKS = {  # --codebooks: the options of `rsavq quantize` each layer format comes from
    "default": {},
    "int8": {"codebook_dtype": "int8"},
}
FORMATS = {
    "default": "format 2: the default's vectors, blocks and row scales",
    "int8": "format 3: the default's, int8 codebooks (more blocks at the same overhead)",
}


def random_vqlinear(
    n: int, m: int, bits: int, groups: int = 1, seed: int = 0, codebooks: str = "default"
) -> VQLinear:
    """A layer in the default configuration's format at `bits` (vector length, blocks of columns
    with codebooks of their own, row scales; `codebooks` as in `CODEBOOKS`), with random codes,
    codebooks and scales."""
    config = preset("default", bits, groups=groups, uniform_bits=True, **CODEBOOKS[codebooks])
    sizes, group_bits = split_blocks(split_sizes(n, groups), (bits,) * groups, m, config)
    spec = LayerSpec(
        n, m, tuple(sizes), tuple(group_bits), config.vector_length, config.sub_vectors,
        row_scales=config.row_scales, codebook_dtype=config.codebook_dtype.value,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    module = VQLinear(spec)
    module.perm.copy_(torch.randperm(n, generator=gen).to(spec.perm_dtype))
    for g in range(len(sizes)):
        K = 2 ** spec.code_bits(g)
        idx = torch.randint(0, K, (m, spec.codes_per_row(g)), generator=gen)
        getattr(module, f"codes_{g}").copy_(pack(idx, spec.code_bits(g)))
        module.set_codebook(g, torch.randn(spec.sub_vectors, K, spec.sub_dim, generator=gen))
    if module.scales is not None:
        module.scales.copy_(torch.rand(m, generator=gen) * 0.04)
    return module


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn so background load falls on all."""
    times = {name: [] for name in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def read_bandwidth(threads: int, numel: int = 2**28) -> float:
    """Bytes/s of a float32 sum over `numel` elements (1 GiB) with `threads` threads (best of 5):
    what one pass over memory can read here."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(numel)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    torch.set_num_threads(before)
    return numel * 4 / min(times[1:])


def amx_prefill() -> bool:
    """Whether prefill runs on the AMX tile unit here (`rsavq.kernels.cpu`)."""
    ext = cpu_kernels.extension() if cpu_kernels.available() else None
    return bool(ext is not None and cpu_kernels.PREFILL_AMX and ext.prefill_amx())


def float32_prefill(module: VQLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's prefill on the float32 FMA kernel, where AMX would serve it."""
    before, cpu_kernels.PREFILL_AMX = cpu_kernels.PREFILL_AMX, False
    try:
        return module(x)
    finally:
        cpu_kernels.PREFILL_AMX = before


@torch.no_grad()
def layer_rows(bits_list, tokens_list, groups: int, codebooks: str, bandwidth: float) -> list:
    rows = []
    for n, m in SHAPES:
        W = torch.randn(m, n) * 0.02
        Wb = W.bfloat16()
        for bits in bits_list:
            module = random_vqlinear(n, m, bits, groups, codebooks=codebooks)
            stored = layer_bytes(module)
            for tokens in tokens_list:
                x = torch.randn(tokens, n)
                repeats = 15 if tokens > 1 else (5 if n * m > 10**7 else 20)
                fns = {
                    "dense": lambda x=x, W=W: F.linear(x, W),
                    "vq": lambda x=x, m=module: m(x),
                }
                if tokens == 1:
                    xb = x.bfloat16()
                    fns["bf16"] = lambda x=xb, W=Wb: F.linear(x, W)
                elif amx_prefill():  # the float32 prefill beside the AMX one it stands in for
                    fns["vq_float32"] = lambda x=x, m=module: float32_prefill(m, x)
                t = interleaved(fns, repeats)
                row = {
                    "shape": f"{n}x{m}",
                    "bits": bits,
                    "tokens": tokens,
                    "backend": choose_backend(x).value,
                    "dense_ms": t["dense"] * 1e3,
                    "vq_ms": t["vq"] * 1e3,
                    "dense_over_vq": t["dense"] / t["vq"],
                    "vq_bytes": stored,
                    "vq_gbs": stored / t["vq"] / 1e9,
                    "bandwidth_share": stored / t["vq"] / bandwidth,
                }
                if tokens == 1:
                    row |= {"bf16_ms": t["bf16"] * 1e3, "bf16_over_vq": t["bf16"] / t["vq"]}
                else:
                    row["prefill_kernel"] = "amx" if "vq_float32" in t else "float32"
                if "vq_float32" in t:
                    row |= {
                        "vq_float32_ms": t["vq_float32"] * 1e3,
                        "dense_over_vq_float32": t["dense"] / t["vq_float32"],
                    }
                rows.append(row)
                print(json.dumps(row))
    return rows


@torch.no_grad()
def decode_seconds(model, ids, new_tokens: int) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    return time.perf_counter() - start


def layer_bytes(module: VQLinear) -> int:
    """Bytes of a layer's buffers."""
    return sum(t.numel() * t.element_size() for t in module.buffers())


def kernel_state_bytes(module: VQLinear) -> int:
    """Bytes of what the kernels keep beside a layer's buffers (the CPU decode's repacked codes,
    transposed codebooks)."""
    tensors = {
        t.data_ptr(): t
        for v in module._kernel_state.values()
        for t in (v if isinstance(v, (tuple, list)) else (v,))
        if isinstance(t, torch.Tensor)
    }  # each tensor once (the decode's argument tuple repeats the repacked state)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def model_row(
    model_id: str, bits: int, new_tokens: int, groups: int, codebooks: str = "default",
    rounds: int = 3, checkpoint: str | None = None,
) -> dict:  # fmt: skip
    """FP and VQ decode of the same prompt, alternated `rounds` times (medians). The VQ model is
    `checkpoint` loaded as a user loads it, or else the FP model with every decoder linear a
    random `bits`-bit VQLinear and its embeddings in bfloat16, as the default's checkpoints
    store them (`rsavq.nn.stored`)."""
    from rsavq.models import load_model
    from rsavq.modules import find_linears
    from rsavq.nn.stored import keep_stored_embeddings
    from rsavq.serialization import load_quantized, set_module

    model, tokenizer = load_model(model_id)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    params = sum(layer.weight.numel() for layer in find_linears(model).values())
    if checkpoint is not None:
        vq_model = load_quantized(checkpoint)
    else:
        vq_model = copy.deepcopy(model)
        for i, (name, layer) in enumerate(find_linears(vq_model).items()):
            vq_layer = random_vqlinear(
                layer.in_features, layer.out_features, bits, groups, i, codebooks
            )
            set_module(vq_model, name, vq_layer)
        keep_stored_embeddings(vq_model, torch.bfloat16)
    vq_bytes = sum(layer_bytes(m) for m in vq_model.modules() if isinstance(m, VQLinear))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    fns = {
        "fp": lambda: decode_seconds(model, ids, new_tokens),
        "fp_bf16": lambda: decode_seconds(bf16_model, ids, new_tokens),
        "vq": lambda: decode_seconds(vq_model, ids, new_tokens),
    }
    t = interleaved(fns, rounds)
    kept = sum(kernel_state_bytes(m) for m in vq_model.modules() if isinstance(m, VQLinear))
    return {
        "model": model_id,
        "bits": bits,
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        "embeddings": str(vq_model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "fp_tokens_per_s": new_tokens / t["fp"],
        "fp_bf16_tokens_per_s": new_tokens / t["fp_bf16"],
        "vq_tokens_per_s": new_tokens / t["vq"],
        "vq_over_fp": t["fp"] / t["vq"],
        "vq_over_fp_bf16": t["fp_bf16"] / t["vq"],
        "linear_weights": params,
        "vq_buffer_bytes": vq_bytes,
        "vq_bits_per_weight_in_memory": 8 * vq_bytes / params,
        "vq_kernel_state_bytes": kept,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, numel: int = 2**27) -> float:
    """Bytes/s of a device-to-device fp16 copy (read + write): the practical bandwidth limit."""
    a = torch.empty(numel, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    seconds = synced_times({"copy": lambda: b.copy_(a)}, device, repeats=5)["copy"]
    return 2 * a.numel() * a.element_size() / seconds


def synced_times(fns: dict, device: torch.device, repeats: int, inner: int = 1) -> dict:
    """Median seconds per call, each sample `inner` calls between device synchronizations."""

    def batch(f):
        def run():
            for _ in range(inner):
                f()
            _sync(device)

        return run

    t = interleaved({name: batch(f) for name, f in fns.items()}, repeats)
    return {name: seconds / inner for name, seconds in t.items()}


@torch.no_grad()
def gpu_rows(shapes, bits_list, tokens_list, device="cuda", copy_numel=2**27, repeats=10):
    """Triton `VQLinear` vs fp16 cuBLAS `F.linear`, and the bytes the VQ call moves per second
    as a fraction of a device copy's (codes, codebooks, perm, x and the output)."""
    device = torch.device(device)
    limit = copy_bandwidth(device, copy_numel)
    rows = []
    for n, m in shapes:
        W = (torch.randn(m, n) * 0.02).to(device, torch.float16)
        for bits in bits_list:
            module = random_vqlinear(n, m, bits).to(device)
            module.backend = Backend.TRITON
            stored = sum(b.numel() * b.element_size() for b in module.buffers())
            for tokens in tokens_list:
                x = torch.randn(tokens, n).to(device, torch.float16)
                fns = {"cublas": lambda x=x, W=W: F.linear(x, W), "vq": lambda x=x, q=module: q(x)}
                t = synced_times(fns, device, repeats, inner=20 if tokens <= 8 else 3)
                moved = stored + 2 * tokens * (n + m)
                rows.append(
                    {
                        "shape": f"{n}x{m}",
                        "bits": bits,
                        "tokens": tokens,
                        "cublas_ms": t["cublas"] * 1e3,
                        "vq_ms": t["vq"] * 1e3,
                        "cublas_over_vq": t["cublas"] / t["vq"],
                        "vq_fraction_of_copy_bandwidth": moved / t["vq"] / limit,
                        "copy_bandwidth_gbs": limit / 1e9,
                    }
                )
                print(json.dumps(rows[-1]))
    return rows


def gpu_table(rows: list[dict]) -> str:
    lines = [
        "| shape (in x out) | bits | tokens | fp16 cuBLAS / Triton VQ | cuBLAS / VQ "
        "| VQ bytes/s vs device copy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['bits']} | {r['tokens']} | {r['cublas_ms']:.3f} / "
            f"{r['vq_ms']:.3f} ms | **{r['cublas_over_vq']:.2f}** | "
            f"{100 * r['vq_fraction_of_copy_bandwidth']:.0f}% of "
            f"{r['copy_bandwidth_gbs']:.0f} GB/s |"
        )
    return "\n".join(lines)


def layer_table(layers: list[dict], bandwidth: float | None) -> str:
    """Decode and prefill per shape and width: times, ratios (dense / VQ) and the decode's
    effective bandwidth (bytes stored / time) as a share of the machine's read bandwidth."""
    lines = [
        "| shape (in x out) | bits | decode fp32 / bf16 / VQ | decode vs fp32 | decode vs bf16 "
        "| VQ GB/s | % of bandwidth | prefill 512 fp32 / VQ | prefill vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    amx = any(r.get("prefill_kernel") == "amx" for r in layers)
    if amx:  # the float32 kernel's prefill beside the AMX one
        lines[0] += " prefill vs fp32, float32 kernel |"
        lines[1] += "---|"
    cells = {(r["shape"], r["bits"], r["tokens"]): r for r in layers}
    for shape, bits in dict.fromkeys((r["shape"], r["bits"]) for r in layers):
        row = [shape, str(bits)]
        d, p = cells.get((shape, bits, 1)), cells.get((shape, bits, 512))
        if d is None:
            row += ["-"] * 5
        else:
            share = f"{100 * d['bandwidth_share']:.0f}%" if bandwidth else "-"
            row += [
                f"{d['dense_ms']:.2f} / {d['bf16_ms']:.2f} / {d['vq_ms']:.3f} ms",
                f"**{d['dense_over_vq']:.2f}**",
                f"**{d['bf16_over_vq']:.2f}**",
                f"{d['vq_gbs']:.1f}",
                share,
            ]
        if p is None:
            row += ["-", "-"]
        else:
            row += [f"{p['dense_ms']:.1f} / {p['vq_ms']:.1f} ms", f"**{p['dense_over_vq']:.2f}**"]
        if amx:
            row.append(f"{p['dense_over_vq_float32']:.2f}" if p and "vq_float32_ms" in p else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def model_line(m: dict) -> str:
    if m.get("checkpoint"):
        vq = f"the default's {m['bits']}-bit checkpoint (`{m['checkpoint']}`, loaded as saved)"
    else:
        vq = f"every decoder linear as a random {m['bits']}-bit VQLinear"
    vq += f", embeddings in {m.get('embeddings', 'float32')},"  # (float32 before they were kept)
    return (
        f"Whole model, {m['model']} greedy decode of {m['new_tokens']} tokens (median of "
        f"{m['rounds']}, alternated): FP {m['fp_tokens_per_s']:.2f} tokens/s in float32, "
        f"{m['fp_bf16_tokens_per_s']:.2f} in bfloat16; {vq} "
        f"{m['vq_tokens_per_s']:.2f} tokens/s: **{m['vq_over_fp']:.2f}x of FP** "
        f"(**{m['vq_over_fp_bf16']:.2f}x** of FP bf16); memory of the loaded VQ linears "
        f"{m['vq_buffer_bytes'] / 2**20:.1f} MiB for {m['linear_weights'] / 1e6:.1f} M weights = "
        f"{m['vq_bits_per_weight_in_memory']:.3f} bits/weight"
        + (
            f", plus {m['vq_kernel_state_bytes'] / 2**20:.1f} MiB the CPU kernels keep (codes "
            "repacked for decode, codebooks transposed)."
            if "vq_kernel_state_bytes" in m
            else "."
        )
    )


def render(results: list[dict]) -> str:
    """One table per result file (thread count, layer format) and its whole-model lines."""
    parts = []
    for result in results:
        bandwidth = result.get("bandwidth_gbs", {}).get(str(result["threads"]))
        read = result.get("bandwidth_gbs", {})
        load = result.get("load", 0)
        under = f", while {load} busy process(es) shared the cores" if load else ""
        cpu = f", {result['cpu']}" if result.get("cpu") else ""
        parts += [
            f"#### {result['threads']} thread(s), {result['format']}{under}{cpu}",
            "",
            f"Read bandwidth here: {read.get('1', 0):.1f} GB/s with 1 thread, "
            f"{read.get(str(result.get('cores', 2)), 0):.1f} GB/s with all "
            f"{result.get('cores', 2)} cores.",
            "",
        ]
        if result["layers"]:
            parts += [layer_table(result["layers"], bandwidth), ""]
        if result.get("gpu"):
            parts += [f"GPU: {result['gpu_name']}", "", gpu_table(result["gpu"]), ""]
        for m in result["models"]:
            parts += [model_line(m), ""]
    return "\n".join(parts)


def write_tables(paths: list[str], markdown: str) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    if results:
        rewrite_block(markdown, "speed", render(results))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--tokens", default="1,512")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="whole-model decodes per model")
    p.add_argument("--groups", type=int, default=1, help="channel groups per layer (default 1)")
    p.add_argument("--model-bits", default="2,3", help="bit widths of the whole-model rows")
    p.add_argument(
        "--checkpoints", type=lambda s: s.split(","), default=[], metavar="B=DIR,...",
        help="quantized checkpoints for the whole-model rows at those widths (default: random "
        "layers of the default layout, embeddings in bfloat16)",
    )  # fmt: skip
    p.add_argument("--codebooks", choices=list(CODEBOOKS), default="default",
                   help="the layers' codebook format (see the module docstring)")  # fmt: skip
    p.add_argument("--json", default="benchmarks/results/speed-1thread.json")
    p.add_argument("--tables", default=TABLES, help="result JSONs tabulated in --markdown")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--table-only", action="store_true", help="only rewrite the tables")
    p.add_argument("--no-gpu", action="store_true", help="skip the Triton-vs-cuBLAS rows")
    p.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    args = p.parse_args(argv)
    if args.table_only:
        return write_tables(args.tables.split(","), args.markdown)
    cores = os.cpu_count() or 1
    bandwidth = {str(k): read_bandwidth(k) / 1e9 for k in sorted({1, args.threads, cores})}
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",") if b]
    tokens = [int(t) for t in args.tokens.split(",")]
    with busy_processes(args.load):
        result = measure(args, bits, tokens, cores, bandwidth)
    if torch.cuda.is_available() and not args.no_gpu:
        result["gpu_name"] = torch.cuda.get_device_name()
        result["gpu"] = gpu_rows(SHAPES, bits, [1, 8, 512])
    print(json.dumps(result["models"]))
    atomic_write_json(args.json, result)
    write_tables(args.tables.split(","), args.markdown)


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` processes spinning on the CPU while the block runs (a machine under load)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def measure(args, bits: list[int], tokens: list[int], cores: int, bandwidth: dict) -> dict:
    checkpoints = {int(b): path for b, path in (c.split("=", 1) for c in args.checkpoints if c)}
    return {
        "threads": args.threads,
        "cores": cores,
        "groups": args.groups,
        "format": "the default's real checkpoints, loaded as saved"
        if checkpoints
        else FORMATS[args.codebooks],
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "bandwidth_gbs": bandwidth,
        "layers": layer_rows(
            bits, tokens, args.groups, args.codebooks, bandwidth[str(args.threads)] * 1e9
        ),
        "models": [
            model_row(
                args.model,
                int(b),
                args.new_tokens,
                args.groups,
                args.codebooks,
                args.rounds,
                checkpoints.get(int(b)),
            )  # fmt: skip
            for b in args.model_bits.split(",")
            if b
        ],
        "load": args.load,
    }


if __name__ == "__main__":
    main()
