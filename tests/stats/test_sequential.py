import pytest
import torch

from helpers import build_tiny_llama
from rsavq.modules import decoder_blocks, find_linears, weight_matrix
from rsavq.stats.hessian import input_hessians
from rsavq.stats.sequential import block_stages, capture_inputs, sequential_hessians


def _windows(vocab=64):
    return torch.randint(0, vocab, (10, 12), generator=torch.Generator().manual_seed(4))


def test_block_by_block_equals_one_pass_when_nothing_changes():
    model = build_tiny_llama(vocab_size=64, layers=3)
    layers = find_linears(model)
    one_pass = input_hessians(model, layers, _windows(), progress=False)
    seen = {}
    for batch in sequential_hessians(model, layers, _windows()):
        seen.update(batch)
    assert list(seen) == list(layers)  # model order, every layer once
    for name in layers:
        torch.testing.assert_close(seen[name], one_pass[name], rtol=1e-4, atol=1e-5)


def test_hessians_with_tuning_equal_those_without():
    """With block fine-tuning the targets' FP pass gives the Hessians too (one pass, not two):
    the same Hessians, and never from the held-out windows."""
    model = build_tiny_llama(vocab_size=64, layers=2)
    layers = find_linears(model)
    plain = {n: h for b in sequential_hessians(model, layers, _windows()) for n, h in b.items()}
    held = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(9))
    tuned = sequential_hessians(model, layers, _windows(), tune=lambda *a: None, heldout=held)
    fused = {n: h for b in tuned for n, h in b.items()}
    assert list(fused) == list(plain)
    for name in layers:
        assert torch.equal(fused[name], plain[name]), name


def test_later_blocks_see_the_changed_prefix():
    model = build_tiny_llama(vocab_size=64, layers=3)
    layers = find_linears(model)
    batches = sequential_hessians(model, layers, _windows())
    first = next(batches)  # block 0: now "quantize" it (here: halve its MLP output)
    with torch.no_grad():
        weight_matrix(model.model.layers[0].mlp.down_proj).mul_(0.5)
    second = next(batches)
    expected = input_hessians(model, layers, _windows(), progress=False)
    for name in second:
        torch.testing.assert_close(second[name], expected[name], rtol=1e-4, atol=1e-5)
    assert set(first) == {n for n in layers if n.startswith("model.layers.0.")}


def test_tuning_targets_are_the_fp_block_on_the_quantized_prefix():
    model = build_tiny_llama(vocab_size=64, layers=3)
    with torch.no_grad():
        out = model(_windows(), output_hidden_states=True)
    fp_hidden = out.hidden_states[1:-1]  # each block's output (the last one is normed)
    seen = []

    def tune(index, block, data):
        ((inputs, targets),) = data
        seen.append(torch.cat(targets))

    layers = find_linears(model)
    batches = sequential_hessians(model, layers, _windows(), tune=tune)
    for i, _ in enumerate(batches):
        if i < 3:  # "quantize" each block: halve its MLP output
            with torch.no_grad():
                weight_matrix(model.model.layers[i].mlp.down_proj).mul_(0.5)
    torch.testing.assert_close(seen[0], fp_hidden[0])  # the same inputs for block 0
    assert not torch.allclose(seen[1], fp_hidden[1], rtol=1e-4, atol=1e-5)  # not the FP model's


def test_done_layers_get_no_hessian_and_done_blocks_are_not_calibrated():
    model = build_tiny_llama(vocab_size=64, layers=2)
    layers = find_linears(model)
    done = lambda name: name.startswith("model.layers.0.")  # noqa: E731
    batches = list(sequential_hessians(model, layers, _windows(), done))
    assert all(h is None for h in batches[0].values())
    assert all(h is not None for h in batches[1].values())


def test_layers_outside_the_blocks_come_last():
    model = build_tiny_llama(vocab_size=64, layers=2)
    layers = find_linears(model, skip=("*embed*",))  # lm_head too (tied, still a Linear)
    batches = list(sequential_hessians(model, layers, _windows()))
    assert list(batches[-1]) == ["lm_head"]
    assert decoder_blocks(model, layers)[0] == "model.layers"


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe"])
def test_other_families(family):
    from families import build_family

    model = build_family(family)
    layers = find_linears(model)
    one_pass = input_hessians(model, layers, _windows(), progress=False)
    seen = {}
    for batch in sequential_hessians(model, layers, _windows()):
        seen.update(batch)
    for name in layers:
        torch.testing.assert_close(seen[name], one_pass[name], rtol=1e-4, atol=1e-4)


def test_stages_follow_the_blocks_data_flow():
    model = build_tiny_llama(vocab_size=64, layers=2)
    layers = find_linears(model)
    block = model.model.layers[1]
    mine = {n: m for n, m in layers.items() if n.startswith("model.layers.1.")}
    stages = block_stages(block, mine, capture_inputs(model, model.model.layers[0], _windows()))
    short = [[n.rsplit(".", 1)[-1] for n in stage] for stage in stages]
    qkv, o, gate_up, down = (
        ["q_proj", "k_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    )
    assert short == [qkv, o, gate_up, down]


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe"])
def test_stages_cover_other_families_once(family):
    from families import build_family

    model = build_family(family)
    layers = find_linears(model)
    batches = list(sequential_hessians(model, layers, _windows(), true_sequential=True))
    names = [n for b in batches for n in b]
    assert sorted(names) == sorted(layers) and len(names) == len(layers)


def test_true_sequential_stages_see_the_blocks_quantized_earlier_stages():
    model = build_tiny_llama(vocab_size=64, layers=2)
    layers = find_linears(model)
    block = model.model.layers[0]
    batches = sequential_hessians(model, layers, _windows(), true_sequential=True)
    first = next(batches)  # q/k/v of block 0: now "quantize" them (halve v_proj)
    assert [n.rsplit(".", 1)[-1] for n in first] == ["q_proj", "k_proj", "v_proj"]
    with torch.no_grad():
        weight_matrix(block.self_attn.v_proj).mul_(0.5)
    second = next(batches)
    assert list(second) == ["model.layers.0.self_attn.o_proj"]
    expected = input_hessians(model, layers, _windows(), progress=False)
    name = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(second[name], expected[name], rtol=1e-4, atol=1e-5)
    staged = {n: h for b in batches for n, h in b.items()}
    assert set(staged) == {n for n in layers if not n.startswith("model.layers.0.self_attn")}
    with torch.no_grad():
        weight_matrix(block.self_attn.v_proj).mul_(2.0)
    plain = {n: h for b in sequential_hessians(model, layers, _windows()) for n, h in b.items()}
    assert not torch.allclose(plain[name], second[name])  # without stages: the FP block's
