import pytest

from rsavq.errors import UsageError
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


def test_plan_passes_fits_the_budget_in_model_order():
    from rsavq.stats.memory import layer_bytes, plan_passes

    shapes = {"a": (4, 3), "b": (2, 3), "c": (4, 3)}
    assert plan_passes(shapes, False, None) == [["a", "b", "c"]]
    cost = layer_bytes(4, 3, False)  # 148 bytes; b: 76
    assert plan_passes(shapes, False, cost + layer_bytes(2, 3, False)) == [["a", "b"], ["c"]]
    assert plan_passes(shapes, False, cost) == [["a"], ["b"], ["c"]]
    with pytest.raises(UsageError, match=r"too small for layer a's .* minimum is 148 B"):
        plan_passes(shapes, False, cost - 1)


@pytest.mark.parametrize(
    ("text", "value"), [("24GiB", 24 * 2**30), ("500MiB", 500 * 2**20), ("2.5G", int(2.5 * 2**30)),
                        ("1000", 1000)],
)  # fmt: skip
def test_parse_bytes(text, value):
    from rsavq.stats.memory import parse_bytes

    assert parse_bytes(text) == value
    with pytest.raises(UsageError, match="use a size such as"):
        parse_bytes("lots")


def test_collection_peak_adds_what_the_process_holds():
    from rsavq.stats.memory import collection_peak, held_bytes, layer_bytes, plan_text

    shapes = {"a": (4, 3), "b": (2, 3), "c": (4, 3)}
    passes = [["a", "b"], ["c"]]
    held = held_bytes(passes, shapes, False)
    assert held == layer_bytes(4, 3, False) + layer_bytes(2, 3, False)
    memory = fisher_memory(list(shapes.values()), False, seqlen=10)
    peak = collection_peak(1000, held, memory, block=7, read=5)
    assert peak == 1000 + 7 + 5 + held + memory.largest_G + memory.captured_inputs
    text = plan_text(passes, shapes, False, 1, peak)
    assert text.endswith(f"; expected peak about {peak / 1024:.2f} KiB per rank")


def test_resident_bytes_is_this_process():
    from helpers import fresh_resident_pages
    from rsavq.stats.memory import resident_bytes

    before = resident_bytes()
    block = fresh_resident_pages(64 * 2**20)
    assert resident_bytes() - before > 48 * 2**20
    block.close()
