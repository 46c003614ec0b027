from rsavq.stats.memory import fisher_memory, llama_shapes


def test_memory_from_shapes():
    shapes = [(4, 3), (2, 3)]
    full = fisher_memory(shapes, diag_output=False, seqlen=10, batch=2)
    assert full.accumulators == 4 * ((16 + 9 + 12) + (4 + 9 + 6))
    assert full.captured_inputs == 2 * (2 * 10 * 3) * 2
    assert full.largest_G == 4 * 2 * 12
    diag = fisher_memory(shapes, diag_output=True, seqlen=10)
    assert diag.accumulators == 4 * ((4 + 9 + 12) + (2 + 9 + 6))


def test_llama7b_shapes():
    shapes = llama_shapes(4096, 11008, 32)
    assert len(shapes) == 224
    assert sum(m * n for m, n in shapes) == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
