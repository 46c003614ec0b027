"""Where a quantized checkpoint's error costs perplexity: each decoder block's output error with
the FP model's inputs, then the WikiText-2 perplexity with parts of the FP model swapped back in
(one linear of one block, one role in every block, or single rows of one linear).

    python benchmarks/fp_swap_probe.py CHECKPOINT [block=28] [windows=16] [tag=q3]

CHECKPOINT: an rsavq checkpoint of SmolLM2-135M, e.g. from
`rsavq quantize --model smollm2-135m --bits 3 --calib c4 --nsamples 64 --seqlen 512
--finetune none --out q3` (no fine-tuning). Block errors: `||block_q(x) - block(x)||^2 /
||block(x) - x||^2` summed over 4 C4 calibration windows of 512 tokens (x: the FP model's input
to the block); the per-linear errors of `block` swap one quantized linear into the FP block.
Perplexity: WikiText-2, the first `windows` windows of 2048, bf16 (the fast protocol). Writes
benchmarks/results/fp-swap-<tag>.json.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from rsavq.data import calibration_windows, evaluation_windows, load_corpus
from rsavq.eval.perplexity import perplexity
from rsavq.models import load_model

ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def block_inputs(fp, windows) -> dict[int, list]:
    """Per block: (args, kwargs, output) of the FP model's calls on `windows`."""
    calls: dict[int, list] = {}

    def hook(i):
        def record(module, args, kwargs, out):
            calls.setdefault(i, []).append(
                (args, kwargs, out[0] if isinstance(out, tuple) else out)
            )

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks(fp))]
    for w in windows:
        fp(w[None])
    for h in handles:
        h.remove()
    return calls


def blocks(model) -> nn.ModuleList:
    return model.model.layers


def block_error(block, calls) -> float:
    num = den = 0.0
    for args, kwargs, out in calls:
        got = block(*args, **kwargs)
        got = got[0] if isinstance(got, tuple) else got
        x = args[0] if args else kwargs["hidden_states"]
        num += (got - out).square().sum().item()
        den += (out - x).square().sum().item()
    return num / den


def swapped(block, name: str, module: nn.Module) -> nn.Module:
    block = copy.deepcopy(block)
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent), leaf, module)
    return block


def dense_weight(module: nn.Module) -> torch.Tensor:
    """`[out, in]` weight of any linear-like module, from its outputs on the identity."""
    eye = torch.eye(module.in_features)
    W = module(eye).T.contiguous()
    return W if module.bias is None else W - module.bias[:, None]


def largest_inputs(fp, index: int, name: str, windows, k: int = 4) -> tuple[list, list]:
    """The `k` input channels of `name` in block `index` with the largest |x| on `windows`."""
    peaks = []
    module = blocks(fp)[index].get_submodule(name)
    handle = module.register_forward_hook(lambda m, a, o: peaks.append(a[0].abs().amax((0, 1))))
    for w in windows:
        fp(w[None])
    handle.remove()
    peak = torch.stack(peaks).amax(0)
    top = peak.topk(k)
    return top.indices.tolist(), [*top.values.tolist(), peak.median().item()]


def main() -> None:
    ckpt = sys.argv[1]
    named = dict(a.split("=") for a in sys.argv[2:])
    index, n, tag = (
        int(named.get("block", 28)),
        int(named.get("windows", 16)),
        named.get("tag", "q"),
    )
    torch.set_grad_enabled(False)
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    fp, tok = load_model("smollm2-135m")
    q, _ = load_model(ckpt)
    calib = calibration_windows(tok, load_corpus("c4", data), 64, 512, 0)[:4]
    calls = block_inputs(fp, calib)
    result: dict = {"checkpoint": ckpt, "block": index, "windows": n}
    result["block_error"] = [block_error(b, calls[i]) for i, b in enumerate(blocks(q))]
    linears = [name for name, m in blocks(fp)[index].named_modules() if isinstance(m, nn.Linear)]
    fp_block, q_block = blocks(fp)[index], blocks(q)[index]
    result["linear_error"] = {
        name: block_error(swapped(fp_block, name, q_block.get_submodule(name)), calls[index])
        for name in linears
    }
    print(json.dumps(result, indent=1), flush=True)
    evals = evaluation_windows(tok, load_corpus("wikitext2", data), 2048, n)

    def ppl(model) -> float:
        return perplexity(
            copy.deepcopy(model).to(torch.bfloat16), evals, "wikitext2", progress=False
        ).ppl

    rows = {"quantized": ppl(q)}
    worst = max(result["linear_error"], key=result["linear_error"].get)
    channels, peaks = largest_inputs(fp, index, "mlp.down_proj", calib)
    result["down_proj_inputs"] = {"channels": channels, "peaks_then_median": peaks}
    saved = blocks(q)[index].get_submodule(worst)
    fp_module = blocks(fp)[index].get_submodule(worst)
    parent, _, leaf = worst.rpartition(".")
    setattr(blocks(q)[index].get_submodule(parent), leaf, fp_module)
    rows[f"FP {worst} in block {index}"] = ppl(q)
    if worst in ("mlp.gate_proj", "mlp.up_proj"):  # the rows that feed the largest channels
        W = dense_weight(saved)
        for k in (1, 4):
            dense = nn.Linear(saved.in_features, saved.out_features, bias=False)
            dense.weight.copy_(W)
            dense.weight[channels[:k]] = fp_module.weight[channels[:k]]
            setattr(blocks(q)[index].get_submodule(parent), leaf, dense)
            rows[f"{worst} in block {index} with its {k} row(s) of largest output from FP"] = ppl(q)
    setattr(blocks(q)[index].get_submodule(parent), leaf, saved)
    for role in ROLES:
        model = copy.deepcopy(q)
        for b_q, b_fp in zip(blocks(model), blocks(fp), strict=True):
            for name, module in b_fp.named_modules():
                if name.endswith(role):
                    parent, _, leaf = name.rpartition(".")
                    setattr(b_q.get_submodule(parent), leaf, module)
        rows[f"FP {role} in every block"] = ppl(model)
        print(rows, flush=True)
    result["ppl"] = rows
    out = Path("benchmarks/results") / f"fp-swap-{tag}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
