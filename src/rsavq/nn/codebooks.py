"""Stored codebooks: fp16 or int8 (with an fp16 scale per sub-vector position)."""

from __future__ import annotations

import torch

from rsavq.config import CodebookDtype

INT8_MAX = 127


def encode_codebook(book: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`book` `[P, K, d]` as stored: fp16 (no scale), or int8 entries and fp16 scales `[P]`
    (symmetric, each sub-vector position's largest magnitude at 127). Encoding is idempotent:
    a decoded book encodes back to the same entries and scales (`_stable_scale`)."""
    if CodebookDtype(dtype) == CodebookDtype.FLOAT16:
        return book.to(torch.float16), None
    book = book.float()
    scale = _stable_scale(book.abs().amax(dim=(1, 2)) / INT8_MAX)
    q = torch.round(book / scale.float()[:, None, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def _stable_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` in fp16, raised by an ulp where needed so that the scale computed again from the
    decoded largest entry, `fp16(fp16(127 s) / 127)`, is `s` itself (true of ~99% of fp16
    values; one ulp up fixes the rest)."""
    scale = scale.to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    up = torch.tensor(float("inf"), dtype=torch.float16)
    for _ in range(4):
        again = (INT8_MAX * scale.float()).half().float() / INT8_MAX
        unstable = again.half() != scale
        if not unstable.any():
            break
        scale = torch.where(unstable, torch.nextafter(scale, up), scale)
    return scale


def decode_codebook(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp16 codebook every kernel reads: `stored` itself, or `fp16(int8 * scale)`."""
    if scale is None:
        return stored
    return (stored.float() * scale.float()[:, None, None]).to(torch.float16)


def round_codebook(book: torch.Tensor, dtype: str) -> torch.Tensor:
    """What `book` becomes once stored and read back (fp16 values)."""
    return decode_codebook(*encode_codebook(book, dtype))


def store_codebook(
    book: torch.Tensor, dtype: str, target: torch.Tensor, target_scale: torch.Tensor | None
) -> None:
    """Encode `book` (float) in `dtype` into the stored tensors `target` (and its scales)."""
    stored, scale = encode_codebook(book, dtype)
    target.copy_(stored)
    if target_scale is not None:
        target_scale.copy_(scale)


def stored_dtype(dtype: str) -> torch.dtype:
    return torch.int8 if CodebookDtype(dtype) == CodebookDtype.INT8 else torch.float16


def codebook_bits(shape: tuple[int, ...], dtype: str) -> int:
    """Stored bits of one codebook `[P, K, d]` (with its scales)."""
    P, K, d = shape
    if CodebookDtype(dtype) == CodebookDtype.INT8:
        return P * K * d * 8 + P * 16
    return P * K * d * 16
