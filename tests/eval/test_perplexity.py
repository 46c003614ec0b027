import math

import pytest
import torch

from rsavq.eval import perplexity


@pytest.fixture(scope="module")
def model_and_windows(tiny_model_dir):
    from rsavq.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    windows = torch.randint(0, len(tokenizer), (3, 40), generator=torch.Generator().manual_seed(0))
    return model, windows


def hand_mean_nll(model, windows) -> float:
    """Mean NLL computed token by token from log-probabilities."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logprobs = torch.log_softmax(model(row[None]).logits[0].double(), dim=-1)
            for t in range(len(row) - 1):
                total -= logprobs[t, row[t + 1]].item()
                count += 1
    return total / count


def test_perplexity_equals_hand_computed_mean_nll(model_and_windows):
    model, windows = model_and_windows
    result = perplexity(model, windows, "rand", progress=False)
    expected = hand_mean_nll(model, windows)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert (result.windows, result.seqlen, result.tokens) == (3, 40, 120)


def test_batch_size_does_not_change_result(model_and_windows):
    model, windows = model_and_windows
    one = perplexity(model, windows, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert three.nll == pytest.approx(one.nll, rel=1e-5)


def test_result_dict_has_throughput(model_and_windows):
    model, windows = model_and_windows
    record = perplexity(model, windows[:1], progress=False).to_dict()
    assert record["tokens_per_second"] > 0 and record["windows"] == 1
