"""Print the memory table for collecting Fisher statistics of a LLaMA-7B-shaped model.

python benchmarks/fisher_memory.py
"""

from rsavq.stats.memory import fisher_memory, llama_shapes

GIB = 2**30


def main() -> None:
    shapes = llama_shapes(hidden=4096, intermediate=11008, layers=32)
    print(
        "| mode | accumulators (fp32) = stats on disk | captured inputs, 1 x 2048 tokens bf16 "
        "| largest G_s |"
    )
    print("|---|---|---|---|")
    for label, diag in (("full F_O", False), ("diag F_O (`--diag-output`)", True)):
        mem = fisher_memory(shapes, diag, seqlen=2048)
        print(
            f"| {label} | {mem.accumulators / GIB:.1f} GiB | {mem.captured_inputs / GIB:.2f} GiB "
            f"| {mem.largest_G / GIB:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
