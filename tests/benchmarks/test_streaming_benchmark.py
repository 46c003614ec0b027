"""The streaming benchmark's planner and table, on a made-up result (no runs)."""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


def load_streaming():
    sys.path.insert(0, str(ROOT))  # it imports its sibling scale.py
    try:
        spec = importlib.util.spec_from_file_location("streaming", ROOT / "streaming.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def test_streaming_holds_one_block_and_the_table_says_so():
    streaming = load_streaming()
    args = argparse.Namespace(blocks=3, hidden=4096, intermediate=11008, seqlen=64,
                              memory_budget="1.5GiB")  # fmt: skip
    whole, streamed = streaming.planner(args, False), streaming.planner(args, True)
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 4 / 2**30
    assert abs(whole["weights_gib"] - streamed["weights_gib"] - 2 * block) < 1e-9
    assert whole["passes"] == streamed["passes"] > 1
    stage = {"seconds": 10.0, "peak_rss_gib": 2.0}
    result = {
        "settings": {**vars(args), "nsamples": 2, "quantizer": "kmeans", "bits": "2"},
        "rows": [
            {"streamed": s, "fisher": stage, "quantize": stage, "plan": p}
            for s, p in ((False, whole), (True, streamed))
        ],  # fmt: skip
        "identical": True,
    }
    table = streaming.render(result)
    assert "| streamed (`--stream-weights`) |" in table and "bit-identical: True" in table
    assert "Measured with the code of" not in table  # no commits in this result
    result["rows"][1]["fisher"] = {**stage, "commit": "abc1234"}
    assert "fisher at commit abc1234" in streaming.render(result)


def test_the_figure_counts_the_runtime_and_a_streamed_read():
    streaming = load_streaming()
    args = argparse.Namespace(blocks=2, hidden=256, intermediate=688, seqlen=8,
                              memory_budget="1GiB")  # fmt: skip
    base, counted = streaming.planner(args, True), streaming.planner(args, True, runtime=2**30)
    assert counted["fisher_planned_gib"] - base["fisher_planned_gib"] == 1.0
    assert base["read_gib"] == 688 * 256 * 4 / 2**30
    assert streaming.planner(args, False)["read_gib"] == 0
