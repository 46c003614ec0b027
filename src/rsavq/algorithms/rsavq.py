"""RSAVQ for one linear layer (ALGORITHM.md sections 2-4), as pure functions on tensors.

sensitivity -> sorted groups with bits (exact budget) -> EDSG target `T = W - lambda * ng`
-> per group and sub-vector position: k-means++ then weighted k-means -> packed codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rsavq.algorithms.kmeans import assign, kmeans
from rsavq.algorithms.obs import inverse_cholesky, obs_quantize
from rsavq.allocation import plan_groups, split_sizes
from rsavq.config import (
    ChannelAxis,
    Compensation,
    EdsgSign,
    LambdaMode,
    LayerSpec,
    Metric,
    RSAVQConfig,
)
from rsavq.errors import UsageError
from rsavq.packing import pack, packed_words
from rsavq.stats.accumulator import LayerFisher
from rsavq.stats.natural_gradient import (
    channel_sensitivity,
    fisher_diag_weights,
    natural_gradient,
)

CODEBOOK_BITS = 16  # fp16


@dataclass
class QuantizedLayer:
    """A quantized layer's tensors and spec (what `VQLinear` holds)."""

    spec: LayerSpec
    perm: torch.Tensor  # [channels] int16/int32
    codes: list[torch.Tensor]  # per group [rows, words] int32
    codebooks: list[torch.Tensor]  # per group [P, K_g, sub_dim] fp16
    bias: torch.Tensor | None = None

    def stored_bits(self) -> int:
        """Bits of every stored quantization tensor, counted from the tensors themselves."""
        tensors = [self.perm, *self.codes, *self.codebooks]
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def dequantize(self) -> torch.Tensor:
        from rsavq.kernels import dequantize

        return dequantize(self.codes, self.codebooks, self.perm, self.spec)

    def module(self):
        from rsavq.nn import VQLinear

        return VQLinear.from_quantized(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"perm": self.perm}
        for g, (c, cb) in enumerate(zip(self.codes, self.codebooks, strict=True)):
            out[f"codes_{g}"], out[f"codebooks_{g}"] = c, cb
        return out


def layer_bits(spec: LayerSpec) -> int:
    """Stored bits of a layer with this spec (codes as int32 words, fp16 codebooks, perm)."""
    perm_bits = spec.channels * torch.empty(0, dtype=spec.perm_dtype).element_size() * 8
    total = perm_bits
    for g in range(len(spec.group_bits)):
        rows = spec.block_shape(g)[0]
        total += rows * packed_words(spec.codes_per_row(g), spec.code_bits(g)) * 32
        total += spec.sub_vectors * 2 ** spec.code_bits(g) * spec.sub_dim * CODEBOOK_BITS
    return total


def edsg_target(W: torch.Tensor, stats: LayerFisher | None, config: RSAVQConfig):
    """`T = W - lambda * ng` (descent sign) and the step's relative size `||step|| / ||W||`."""
    if stats is None or config.lam == 0:
        return W, 0.0
    ng = natural_gradient(stats, config.damping)
    scale = config.lam
    if config.lambda_mode == LambdaMode.RELATIVE:
        scale *= W.norm().item() / max(ng.norm().item(), 1e-30)
    step = scale * ng
    sign = -1.0 if config.edsg_sign == EdsgSign.DESCENT else 1.0
    return W + sign * step, step.norm().item() / max(W.norm().item(), 1e-30)


def make_plan(
    W: torch.Tensor, stats: LayerFisher | None, config: RSAVQConfig, bias: bool = False
) -> tuple[LayerSpec, torch.Tensor]:
    """WCSG: the layer's spec (groups, bits) and permutation, within the exact budget."""
    axis = ChannelAxis(config.channel_axis)
    m, n = W.shape
    channels = n if axis == ChannelAxis.INPUT else m
    if stats is None:
        sensitivity = torch.ones(channels, dtype=torch.float64)
    else:
        sensitivity = channel_sensitivity(stats, axis, config.damping)

    def spec_for(sizes, bits) -> LayerSpec:
        return LayerSpec(
            n,
            m,
            tuple(sizes),
            tuple(bits),
            config.vector_length,
            config.sub_vectors,
            axis.value,
            bias,
        )

    def cost(bits) -> float:
        spec = spec_for(sizes, bits)
        if config.budget_includes_overhead:
            return layer_bits(spec)
        return sum(spec.block_shape(g)[0] * spec.block_shape(g)[1] * b for g, b in enumerate(bits))

    sizes = split_sizes(channels, config.groups)
    plan = plan_groups(
        sensitivity,
        config.bits,
        config.groups,
        config.allocation,
        cost,
        budget=config.bits * m * n,
        bit_range=(config.min_group_bits, config.max_group_bits),
        uniform=config.uniform_bits,
    )
    return spec_for(plan.group_sizes, plan.group_bits), plan.perm


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
    ordered = X[:, perm] if spec.axis == ChannelAxis.INPUT.value else X[perm]
    dim = 1 if spec.axis == ChannelAxis.INPUT.value else 0
    return list(torch.split(ordered, list(spec.group_sizes), dim=dim))


def _as_points(block: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """`[rows, cols]` -> `[P, rows * n_vec, sub_dim]`, zero-padded to whole vectors."""
    rows, cols = block.shape
    v, P = spec.vector_length, spec.sub_vectors
    padded = torch.nn.functional.pad(block, (0, math.ceil(cols / v) * v - cols))
    return padded.view(rows, -1, P, spec.sub_dim).permute(2, 0, 1, 3).reshape(P, -1, spec.sub_dim)


def fit_codebooks(T_block, w_block, spec: LayerSpec, g: int, config: RSAVQConfig, generator):
    """Weighted k-means per sub-vector position: fp16 codebooks `[P, K, d]`."""
    points = _as_points(T_block, spec)
    weights = _as_points(w_block, spec) * _as_points(torch.ones_like(T_block), spec)  # 0: pad
    K = 2 ** spec.code_bits(g)
    return torch.stack(
        [
            kmeans(
                points[p], weights[p], K, config.kmeans_iters, config.kmeans_tol, generator
            ).centroids.to(torch.float16)
            for p in range(spec.sub_vectors)
        ]
    )


def assign_codes(T_block, w_block, codebooks: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Nearest fp16 codeword of every sub-vector: codes `[rows, n_vec, P]`."""
    rows = T_block.shape[0]
    points = _as_points(T_block, spec)
    weights = _as_points(w_block, spec) * _as_points(torch.ones_like(T_block), spec)
    codes = [assign(points[p], weights[p], codebooks[p].float())[0] for p in range(len(points))]
    return torch.stack([c.view(rows, -1) for c in codes], dim=2)


def quantize_group(T_block, w_block, spec: LayerSpec, g: int, config: RSAVQConfig, generator):
    """Product VQ of one group: codebooks `[P, K, d]` (fp16) and packed codes `[rows, words]`."""
    codebooks = fit_codebooks(T_block, w_block, spec, g, config, generator)
    codes = assign_codes(T_block, w_block, codebooks, spec)
    return codebooks, pack(codes.reshape(codes.shape[0], -1), spec.code_bits(g))


def _decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """`[rows, n_vec, P]` codes -> `[rows, n_vec * v]` weights."""
    parts = [codebooks[p].float()[codes[..., p]] for p in range(codes.shape[-1])]
    return torch.stack(parts, dim=2).reshape(codes.shape[0], -1)


def quantize_compensated(T, metric, H, spec: LayerSpec, perm, config: RSAVQConfig, generator):
    """Groups in permuted order, vector by vector, with OBS error feedback (`algorithms.obs`).

    Each group's codebooks are fitted when the group is reached, on its columns with every earlier
    group's error already absorbed; then its vectors are assigned one column-segment at a time.
    """
    v, order = spec.vector_length, perm.long()
    edges = [0, *torch.tensor(spec.group_sizes).cumsum(0).tolist()]
    blocks = [
        [(s, min(s + v, c1)) for s in range(c0, c1, v)]
        for c0, c1 in zip(edges[:-1], edges[1:], strict=True)
    ]
    metric_p = metric[:, order]
    books: list[torch.Tensor] = []
    codes: list[list[torch.Tensor]] = [[] for _ in blocks]

    def prepare(g, block):
        w = metric_p[:, edges[g] : edges[g + 1]]
        books.append(fit_codebooks(block, w, spec, g, config, generator))

    def quantize(g, k, segment):
        s, e = blocks[g][k]
        idx = assign_codes(segment, metric_p[:, s:e], books[g], spec)  # [rows, 1, P]
        codes[g].append(idx)
        return _decode(idx, books[g])[:, : e - s]

    U = inverse_cholesky(H[order][:, order], config.damping)
    obs_quantize(T[:, order], U, blocks, quantize, prepare)
    return [
        (books[g], pack(torch.cat(c, dim=1).reshape(c[0].shape[0], -1), spec.code_bits(g)))
        for g, c in enumerate(codes)
    ]


def quantize_layer(
    W: torch.Tensor,
    stats: LayerFisher | None,
    config: RSAVQConfig,
    bias: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[QuantizedLayer, float]:
    """Quantize `W` `[m, n]`; returns the layer and the EDSG step's relative norm.

    `hessian` (`X^T X`, `[n, n]`) is needed for `compensation=hessian` only.
    """
    W = W.detach().float().cpu()
    spec, perm = make_plan(W, stats, config, bias is not None)
    T, step = edsg_target(W, stats, config)
    if config.metric == Metric.FISHER_DIAG and stats is not None:
        metric = fisher_diag_weights(stats)
        metric = metric / metric.mean().clamp_min(1e-30)
    else:
        metric = torch.ones_like(W)
    generator = torch.Generator().manual_seed(config.seed)
    if config.compensation == Compensation.NONE:
        groups = [
            quantize_group(t, w, spec, g, config, generator)
            for g, (t, w) in enumerate(
                zip(_blocks(T, spec, perm), _blocks(metric, spec, perm), strict=True)
            )
        ]
    else:
        H = _compensation_hessian(config, stats, hessian)
        groups = quantize_compensated(T, metric, H, spec, perm, config, generator)
    layer = QuantizedLayer(
        spec,
        perm.to(spec.perm_dtype),
        [c for _, c in groups],
        [cb for cb, _ in groups],
        None if bias is None else bias.detach(),
    )
    return layer, step
