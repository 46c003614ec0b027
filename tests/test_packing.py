import pytest
import torch

from rsavq.packing import pack, packed_words, unpack


@pytest.mark.parametrize("width", range(1, 17))
@pytest.mark.parametrize("length", [1, 7, 32, 33, 100])
def test_roundtrip_every_width(width, length):
    gen = torch.Generator().manual_seed(width * 1000 + length)
    codes = torch.randint(0, 2**width, (3, length), generator=gen)
    codes[0, 0] = 2**width - 1  # the top value sets the sign bit of some words
    words = pack(codes, width)
    assert words.dtype == torch.int32 and words.shape == (3, packed_words(length, width))
    assert torch.equal(unpack(words, width, length), codes)


def test_exact_storage_no_padding_per_code():
    assert packed_words(32, 6) == 6  # 192 bits, not 32 x 8
    assert packed_words(64, 9) == 18


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range for 3 bits"):
        pack(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="1..16"):
        pack(torch.tensor([[1]]), 17)
