"""Builders shared by the tests: tiny tokenizer and LLaMA, brute-force Fisher statistics."""

from __future__ import annotations

import importlib.util
import mmap
import sys
from pathlib import Path

import torch

from rsavq.config import LayerSpec
from rsavq.packing import pack
from rsavq.stats.collect import sequence_loss

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "jovial zebras near old stone bridges and rivers of light"
).split()


def sample_text(sentences: int = 400, seed: int = 0) -> str:
    """Deterministic pseudo-English text for training the tiny tokenizer and for data tests."""
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(sentences):
        idx = torch.randint(
            len(WORDS), (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen
        )
        lines.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return "\n".join(lines)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sample_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def brute_force(model, layers, windows):
    """F_O, F_I, g, sq_norm from explicit per-sample gradients (autograd.grad, one at a time)."""
    weights = [layer.weight for layer in layers.values()]
    per_sample = {name: [] for name in layers}
    for row in windows:
        grads = torch.autograd.grad(sequence_loss(model, row[None]), weights)
        for name, grad in zip(layers, grads, strict=True):
            per_sample[name].append(grad.double())
    out = {}
    for name, Gs in per_sample.items():
        G = torch.stack(Gs)  # [S, m, n]
        out[name] = {
            "F_O": torch.einsum("smn,skn->mk", G, G) / len(G),
            "F_I": torch.einsum("smn,smk->nk", G, G) / len(G),
            "g": G.mean(0),
            "sq_norm": G.square().sum(dim=(1, 2)).mean().item(),
        }
    return out


def random_vq_layer(m, n, sizes, bits, v=6, P=2, seed=0):
    """A VQ layer of random codes and codebooks: `(spec, perm, codes, codebooks)`."""
    spec = LayerSpec(n, m, sizes, bits, v, P)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(spec.perm_dtype)
    codes, books = [], []
    for g in range(len(sizes)):
        K = 2 ** spec.code_bits(g)
        rows = spec.block_shape(g)[0]
        idx = torch.randint(0, K, (rows, spec.codes_per_row(g)), generator=gen)
        codes.append(pack(idx, spec.code_bits(g)))
        books.append(torch.randn(P, K, spec.sub_dim, generator=gen).half())
    return spec, perm, codes, books


KERNEL_SHAPES = [  # every backend is checked against the reference on these
    # m, n, group sizes, group bits, v, P
    (16, 24, (12, 12), (2, 1), 6, 2),
    (7, 25, (13, 12), (3, 2), 6, 2),  # ragged: groups not multiples of v
    (33, 50, (20, 15, 10, 5), (4, 3, 2, 1), 6, 2),
    (12, 18, (18,), (5,), 6, 2),  # 15-bit codes straddle words
    (9, 16, (8, 8), (2, 4), 4, 2),
    (5, 12, (12,), (2,), 6, 1),  # full VQ: one sub-vector of 6
    # >= 64 rows: whole tiles + leftover rows; tables of 8/32/64/512 entries
    (130, 50, (26, 24), (2, 1), 6, 2),
    (65, 30, (30,), (1,), 10, 2),
    (128, 100, (100,), (3,), 6, 2),  # 9-bit codes end on bit 33; chunked tables
    # the default's layouts (byte codes, int16 tables on the CPU): 256-entry tables of 4 and 2
    # weights, 64- and 256-entry tables in one layer, 128 entries, a wider (10-bit) group
    (130, 200, (136, 64), (2, 2), 4, 1),  # 3 tiles, chunks of 64 codes, ragged
    (300, 40, (24, 16), (2, 3), 2, 1),  # 5 tiles: three share each table load, then two
    (200, 96, (64, 32), (3, 4), 2, 1),
    (64, 14, (14,), (7,), 1, 1),
    (70, 36, (18, 18), (3, 5), 2, 1),
    (192, 51, (30, 21), (5, 4), 2, 1),  # the 4-bit default's 5-bit k/v: codewords gathered
]


PLAIN = {  # the per-layer quantizer without the Hessian-based parts (no calibration needed)
    "vector_length": 6,
    "sub_vectors": 2,
    "compensation": "none",
    "codebook_overhead": 0.0,
    "row_scales": False,
    "refit": False,
}


def plain_config(**overrides):
    """An `RSAVQConfig` of the Fisher-only method (the paper's shapes), with overrides."""
    from rsavq.config import RSAVQConfig

    return RSAVQConfig.from_dict({**PLAIN, **overrides})


def load_benchmark(name: str):
    """The module of `benchmarks/<name>.py` (registered in `sys.modules`: dataclasses look their
    module up)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fresh_resident_pages(size: int) -> mmap.mmap:
    """`size` bytes of new anonymous pages, written 1 MiB at a time so that they are resident (an
    allocator may hand back memory an earlier test left resident; these pages are always new)."""
    block = mmap.mmap(-1, size)
    chunk = b"\1" * 2**20
    for _ in range(size // len(chunk)):
        block.write(chunk)
    return block


def assert_prefill_close(got, want, x, W) -> None:
    """A prefill `got` against `want` = x W^T (+ bias) in float32: within the AMX kernel's bound
    (three bfloat16 products: at most 2^-16 of |x| |w| per product, `rsavq.kernels.cpu`) plus
    float32's tolerance; the float32 kernel meets it with room to spare."""
    bound = x.abs() @ W.abs().T * 2**-16 + 1e-4 + 1e-4 * want.abs()
    assert ((got - want).abs() <= bound).all(), (got - want).abs().max()
