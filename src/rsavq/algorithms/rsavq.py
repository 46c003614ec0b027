"""RSAVQ for one linear layer (docs/method.md sections 2-6), as pure functions on tensors.

sensitivity -> sorted groups with bits (exact budget) -> blocks of columns sharing codebooks
-> EDSG target `T = W - lambda * ng` -> per-row scales -> per block: Hessian-weighted k-means on
the columns as the error feedback left them, then OBS assignment vector by vector (GPTVQ-style)
-> codebooks and scales refit to the Hessian objective -> packed codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsavq.algorithms.kmeans import assign, kmeans
from rsavq.algorithms.natural_gradient import (
    LayerFisher,
    channel_sensitivity,
    fisher_diag_weights,
    natural_gradient,
)
from rsavq.algorithms.obs import inverse_cholesky, obs_quantize
from rsavq.algorithms.refit import damped, refit
from rsavq.allocation import plan_groups, split_sizes
from rsavq.clock import timed
from rsavq.config import (
    ChannelOrder,
    Compensation,
    EdsgSign,
    LayerSpec,
    Metric,
    RSAVQConfig,
)
from rsavq.errors import UsageError
from rsavq.nn.codebooks import codebook_bits, encode_codebook, round_codebook
from rsavq.packing import pack, packed_words

SCALE_BITS = 16  # fp16 row scales


@dataclass
class QuantizedLayer:
    """A quantized layer's tensors and spec (what `VQLinear` holds)."""

    spec: LayerSpec
    perm: torch.Tensor  # [channels] int16/int32
    codes: list[torch.Tensor]  # per group [rows, words] int32
    codebooks: list[torch.Tensor]  # per group [P, K_g, sub_dim] fp16, as decoded
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # [out_features] fp16 when spec.row_scales

    def stored_codebook(self, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Group g's codebook as stored (fp16, or int8 and its scales)."""
        return encode_codebook(self.codebooks[g], self.spec.codebook_dtype)

    def stored_bits(self) -> float:
        """Bits of every stored quantization tensor, counted from the tensors themselves."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def dequantize(self) -> torch.Tensor:
        from rsavq.kernels import dequantize

        W = dequantize(self.codes, self.codebooks, self.perm, self.spec)
        return W if self.scales is None else W * self.scales.float()[:, None]

    def module(self):
        """The layer as a `VQLinear`."""
        from rsavq.nn import VQLinear

        return VQLinear.from_quantized(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors of the layer."""
        out = {"perm": self.perm}
        for g, c in enumerate(self.codes):
            out[f"codes_{g}"] = c
            out[f"codebooks_{g}"], scale = self.stored_codebook(g)
            if scale is not None:
                out[f"codebook_scales_{g}"] = scale
        if self.scales is not None:
            out["scales"] = self.scales
        return out


def layer_bits(spec: LayerSpec) -> int:
    """Stored bits of a layer with this spec (codes as int32 words, its own codebooks, perm)."""
    perm_bits = spec.in_features * torch.empty(0, dtype=spec.perm_dtype).element_size() * 8
    total = perm_bits
    for g in range(len(spec.group_bits)):
        rows = spec.block_shape(g)[0]
        total += rows * packed_words(spec.codes_per_row(g), spec.code_bits(g)) * 32
        total += codebook_bits(spec.codebook_shape(g), spec.codebook_dtype)
    return total + (spec.out_features * SCALE_BITS if spec.row_scales else 0)


def edsg_target(W: torch.Tensor, stats: LayerFisher | None, config: RSAVQConfig):
    """`T = W - lambda * ng` (descent sign) and the step's relative size `||step|| / ||W||`."""
    if stats is None or config.lam == 0:
        return W, 0.0
    ng = natural_gradient(stats, config.damping)
    step = config.lam * W.norm().item() / max(ng.norm().item(), 1e-30) * ng
    sign = -1.0 if config.edsg_sign == EdsgSign.DESCENT else 1.0
    return W + sign * step, step.norm().item() / max(W.norm().item(), 1e-30)


def make_plan(
    W: torch.Tensor,
    stats: LayerFisher | None,
    config: RSAVQConfig,
    bias: bool = False,
    hessian: torch.Tensor | None = None,
) -> tuple[LayerSpec, torch.Tensor]:
    """WCSG: the layer's spec (groups, bits, blocks) and permutation, within the budget."""
    m, n = W.shape
    sensitivity = _sensitivity(stats, config, hessian, n)

    def spec_for(sizes, bits) -> LayerSpec:
        return LayerSpec(
            n,
            m,
            tuple(sizes),
            tuple(bits),
            config.vector_length,
            config.sub_vectors,
            bias,
            config.row_scales,
            config.codebook_dtype.value,
        )

    def cost(sizes, bits) -> float:
        if config.budget_includes_overhead:
            return layer_bits(spec_for(*split_blocks(sizes, bits, m, config)))
        return sum(size * m * b for size, b in zip(sizes, bits, strict=True))

    quantum = group_quantum(config)
    plan = plan_groups(
        sensitivity,
        config.bits,
        split_sizes(n, config.groups, quantum),
        config.allocation,
        cost,
        budget=config.bits * m * n,
        bit_range=config.bit_range,
        uniform=config.uniform_bits,
        quantum=quantum,
    )
    return spec_for(*split_blocks(plan.group_sizes, plan.group_bits, m, config)), plan.perm


def _sensitivity(stats, config: RSAVQConfig, hessian, channels: int) -> torch.Tensor:
    if config.order == ChannelOrder.HESSIAN:
        if hessian is None:
            raise UsageError("channel order 'hessian' needs input Hessians (X^T X)")
        return torch.diag(hessian).double()
    if stats is None:
        return torch.ones(channels, dtype=torch.float64)
    return channel_sensitivity(stats, config.damping)


def split_blocks(sizes, bits, rows: int, config: RSAVQConfig) -> tuple[list[int], list[int]]:
    """Cut every channel group into blocks of columns that get codebooks of their own.

    `block_size` columns each (the last block takes the rest), or, with `block_size` 0 and a
    `codebook_overhead`, as many equal blocks as keep the codebooks near that many bits per
    weight; at least one block per group. Automatic blocks are cut in whole vectors whose codes
    fill whole 32-bit words, since each row of each block is packed into words of its own (so
    only a group's last block pads its rows)."""
    out_sizes, out_bits = [], []
    for size, b in zip(sizes, bits, strict=True):
        if config.block_size:
            parts = [min(config.block_size, size - s) for s in range(0, size, config.block_size)]
        else:
            blocks = _auto_blocks(size, rows, b, config)
            parts = _even_blocks(size, blocks, word_columns(b, config))
        out_sizes += parts
        out_bits += [b] * len(parts)
    return out_sizes, out_bits


def word_columns(bits: int, config: RSAVQConfig) -> int:
    """The fewest columns whose codes at `bits` per weight fill whole 32-bit words in every
    sub-vector's row (whole vectors)."""
    codes = 32 // math.gcd(32, bits * config.sub_dim)  # codes that fill whole words
    return config.vector_length * (codes // math.gcd(codes, config.sub_vectors))


def group_quantum(config: RSAVQConfig) -> int:
    """Columns that fill whole words at every width a group may get (WCSG's groups are cut in
    these before their bits are known, so no group but the last pads its rows)."""
    lo, hi = config.bit_range
    return math.lcm(*(word_columns(b, config) for b in range(lo, hi + 1)))


def _auto_blocks(size: int, rows: int, b: int, config: RSAVQConfig) -> int:
    if not config.codebook_overhead or size == 0:
        return 1
    shape = (config.sub_vectors, 2 ** (b * config.sub_dim), config.sub_dim)
    book = codebook_bits(shape, config.codebook_dtype)
    return max(1, int(size * rows * config.codebook_overhead // book))


def _even_blocks(size: int, blocks: int, quantum: int) -> list[int]:
    """`blocks` near-equal blocks of whole `quantum`s of columns; the last one also takes the
    columns left over (so no block is smaller than a quantum unless the group is)."""
    units = size // quantum
    blocks = max(1, min(blocks, units))
    q, r = divmod(units, blocks)
    parts = [(q + (i < r)) * quantum for i in range(blocks)]
    parts[-1] += size - sum(parts)
    return parts


def _compensation_hessian(config: RSAVQConfig, stats, hessian) -> torch.Tensor:
    if config.compensation == Compensation.FISHER:
        if stats is None:
            raise UsageError("compensation 'fisher' needs Fisher statistics (F_I)")
        return stats.F_I
    if hessian is None:
        raise UsageError("compensation 'hessian' needs input Hessians (X^T X) from calibration")
    return hessian


def _blocks(X: torch.Tensor, spec: LayerSpec, perm: torch.Tensor) -> list[torch.Tensor]:
    """Group blocks `[rows, cols]` of a `[m, n]` tensor in permuted channel order."""
    return list(torch.split(X[:, perm], list(spec.group_sizes), dim=1))


def _as_points(block: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """`[rows, cols]` -> `[P, rows * n_vec, sub_dim]`, zero-padded to whole vectors."""
    rows, cols = block.shape
    v, P = spec.vector_length, spec.sub_vectors
    padded = torch.nn.functional.pad(block, (0, math.ceil(cols / v) * v - cols))
    return padded.view(rows, -1, P, spec.sub_dim).permute(2, 0, 1, 3).reshape(P, -1, spec.sub_dim)


def _weighted_points(T_block, w_block, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`[P, N, d]` points of a block and their weights (0 on the padding)."""
    points = _as_points(T_block, spec)
    return points, _as_points(w_block, spec) * _as_points(torch.ones_like(T_block), spec)


def fit_codebooks(T_block, w_block, spec: LayerSpec, g: int, config: RSAVQConfig, generator):
    """Weighted k-means per sub-vector position: codebooks `[P, K, d]` as stored and decoded
    (fp16 values)."""
    points, weights = _weighted_points(T_block, w_block, spec)
    K = 2 ** spec.code_bits(g)
    books = [
        kmeans(p, w, K, config.kmeans_iters, config.kmeans_tol, generator).centroids
        for p, w in zip(points, weights, strict=True)
    ]
    return round_codebook(torch.stack(books), config.codebook_dtype.value)


def assign_codes(T_block, w_block, codebooks: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Nearest fp16 codeword of every sub-vector: codes `[rows, n_vec, P]`."""
    rows = T_block.shape[0]
    points = _as_points(T_block, spec)
    weights = _as_points(w_block, spec) * _as_points(torch.ones_like(T_block), spec)
    codes = [assign(points[p], weights[p], codebooks[p].float())[0] for p in range(len(points))]
    return torch.stack([c.view(rows, -1) for c in codes], dim=2)


def quantize_compensated(T, weights, U, spec: LayerSpec, perm, config: RSAVQConfig, generator):
    """Groups (blocks) in permuted order, sub-vector by sub-vector, with OBS error feedback
    (`algorithms.obs`), as GPTVQ does.

    A group's codebooks are fitted when the group is reached, on its columns with every earlier
    error already absorbed, by k-means with `weights` (the metric times each column's OBS
    importance, `obs_weights`); then each sub-vector `J` takes
    the codeword that minimizes the OBS error `||(w_J - c) U_JJ^-1||^2`, and the later columns
    absorb it (`U`: the upper Cholesky factor of the damped `H^-1`, in permuted order). Returns
    per group `(codebooks [P, K, d] fp16, codes [rows, n_vec, P] int64)`.
    """
    order = perm.long()
    edges = [0, *torch.tensor(spec.group_sizes).cumsum(0).tolist()]
    segments = [_segments(c0, c1, spec) for c0, c1 in zip(edges[:-1], edges[1:], strict=True)]
    weights = weights[:, order]
    books: list[torch.Tensor] = []
    codes = [
        torch.zeros(T.shape[0], spec.n_vectors(g), spec.sub_vectors, dtype=torch.int64)
        for g in range(len(segments))
    ]

    def prepare(g, block):
        w = weights[:, edges[g] : edges[g + 1]]
        books.append(fit_codebooks(block, w / w.mean(), spec, g, config, generator))

    def quantize(g, k, segment):
        s, e = segments[g][k]
        book = books[g][k % spec.sub_vectors].float()[:, : e - s]
        A = torch.linalg.inv(U[s:e, s:e]).float()  # OBS error of a sub-vector: (w - c) A
        idx, _ = assign(segment @ A, torch.ones_like(segment), book @ A)
        codes[g][:, k // spec.sub_vectors, k % spec.sub_vectors] = idx
        return book[idx]

    obs_quantize(T[:, order], U, segments, quantize, prepare)
    return list(zip(books, codes, strict=True))


def _segments(c0: int, c1: int, spec: LayerSpec) -> list[tuple[int, int]]:
    """A group's sub-vectors as column segments `[s, e)`, in code order (ragged at its end)."""
    v, d = spec.vector_length, spec.sub_dim
    vectors = math.ceil((c1 - c0) / v)
    starts = (c0 + k * v + p * d for k in range(vectors) for p in range(spec.sub_vectors))
    return [(s, min(s + d, c1)) for s in starts if s < c1]


def row_scales(T: torch.Tensor) -> torch.Tensor:
    """fp16 per-row RMS of `T` (1 for an all-zero row): the rows the codebooks see are unit RMS."""
    rms = T.square().mean(dim=1).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms)).to(torch.float16)


@dataclass
class Prepared:
    """A layer ready for assignment: its plan, EDSG target and the k-means weights."""

    spec: LayerSpec
    perm: torch.Tensor  # [n] int64
    T: torch.Tensor  # EDSG target [m, n]
    T_unit: torch.Tensor  # ... divided by the row scales
    scales: torch.Tensor | None
    weights: torch.Tensor  # [m, n]: metric x OBS importance of the column
    step: float  # ||lambda * ng|| / ||W||
    U: torch.Tensor | None  # OBS: upper Cholesky factor of the damped H^-1, permuted order


def prepare_layer(
    W: torch.Tensor,
    stats: LayerFisher | None,
    config: RSAVQConfig,
    bias: bool = False,
    hessian: torch.Tensor | None = None,
) -> Prepared:
    """WCSG plan, EDSG target, row scales and k-means weights of one layer."""
    if config.refit and hessian is None:
        raise UsageError("refit needs input Hessians (X^T X) from calibration")
    W = W.detach().float().cpu()
    spec, perm = make_plan(W, stats, config, bias, hessian)
    T, step = edsg_target(W, stats, config)
    scales = row_scales(T) if config.row_scales else None
    T_unit = T if scales is None else T / scales.float()[:, None]
    if config.metric == Metric.FISHER_DIAG and stats is not None:
        metric = fisher_diag_weights(stats)
        metric = metric / metric.mean().clamp_min(1e-30)
    else:
        metric = torch.ones_like(W)
    order = perm.long()
    weights, U = metric, None
    if config.compensation != Compensation.NONE:
        H = _compensation_hessian(config, stats, hessian)
        U = inverse_cholesky(H[order][:, order], config.damping)
        importance = torch.empty(len(order))
        importance[order] = (1.0 / torch.diag(U).square()).float()  # of the OBS pass's order
        weights = metric * importance
    return Prepared(spec, order, T, T_unit, scales, weights, step, U)


def quantize_layer(
    W: torch.Tensor,
    stats: LayerFisher | None,
    config: RSAVQConfig,
    bias: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[QuantizedLayer, float]:
    """Quantize `W` `[m, n]`; returns the layer and the EDSG step's relative norm.

    `hessian` (`X^T X`, `[n, n]`) is needed for compensation 'hessian', refit and the Hessian
    channel order.
    """
    prep = prepare_layer(W, stats, config, bias is not None, hessian)
    spec, perm, scales = prep.spec, prep.perm, prep.scales
    generator = torch.Generator().manual_seed(config.seed)
    if config.compensation == Compensation.NONE:
        blocks, weights = _blocks(prep.T_unit, spec, perm), _blocks(prep.weights, spec, perm)
        groups = [
            _quantize_block(t, w, spec, g, config, generator)
            for g, (t, w) in enumerate(zip(blocks, weights, strict=True))
        ]
    else:
        groups = quantize_compensated(
            prep.T_unit, prep.weights, prep.U, spec, perm, config, generator
        )
    books, codes = [b for b, _ in groups], [c for _, c in groups]
    if config.refit:
        with timed("refit"):
            H = damped(hessian[perm][:, perm], config.damping)
            books, scales = refit(prep.T[:, perm], H, codes, books, scales, spec)
            books = [round_codebook(b, spec.codebook_dtype) for b in books]
    layer = QuantizedLayer(
        spec,
        perm.to(spec.perm_dtype),
        [pack(c.reshape(c.shape[0], -1), spec.code_bits(g)) for g, c in enumerate(codes)],
        books,
        None if bias is None else bias.detach(),
        scales,
    )
    return layer, prep.step


def _quantize_block(T_block, w_block, spec: LayerSpec, g: int, config, generator):
    codebooks = fit_codebooks(T_block, w_block, spec, g, config, generator)
    return codebooks, assign_codes(T_block, w_block, codebooks, spec)
