"""Pack integer codes of an exact bit width (1..16) into int32 words, and back.

Codes `[..., L]` become words `[..., ceil(L * width / 32)]`; code j occupies bits
`[j * width, (j + 1) * width)` of the little-endian bit stream of the row, possibly straddling
two words.
"""

from __future__ import annotations

import math

import torch


def packed_words(length: int, width: int) -> int:
    return math.ceil(length * width / 32)


def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative `codes` `[..., L]` (< 2**width) into int32 words `[..., W]`."""
    if not 1 <= width <= 16:
        raise ValueError(f"code width {width} must be 1..16")
    *lead, length = codes.shape
    codes = codes.reshape(-1, length).to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << width):
        raise ValueError(f"codes out of range for {width} bits")
    start = torch.arange(length, device=codes.device) * width
    word, offset = start // 32, start % 32
    words = torch.zeros(
        codes.shape[0], packed_words(length, width) + 1, dtype=torch.int64, device=codes.device
    )
    shifted = codes << offset  # < 2**47
    words.scatter_add_(1, word.expand_as(codes), shifted & 0xFFFFFFFF)
    words.scatter_add_(1, (word + 1).expand_as(codes), shifted >> 32)
    words = words[:, :-1]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as signed int32
    return words.to(torch.int32).reshape(*lead, -1)


def unpack(words: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words `[..., W]` to int64 codes `[..., length]`."""
    *lead, count = words.shape
    flat = words.reshape(-1, count).to(torch.int64) & 0xFFFFFFFF
    flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    start = torch.arange(length, device=words.device) * width
    word, offset = start // 32, start % 32
    both = flat[:, word] | (flat[:, word + 1] << 32)
    return ((both >> offset) & ((1 << width) - 1)).reshape(*lead, length)
