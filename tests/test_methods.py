import subprocess
import sys

import pytest
import torch
from torch import nn

from rsavq.cli import quantize as cli_quantize
from rsavq.config import RSAVQConfig, ScalarConfig, preset
from rsavq.errors import UsageError
from rsavq.methods import FISHER, HESSIAN, METHODS, method_for


def test_cli_offers_every_registered_method():
    assert tuple(METHODS) == cli_quantize.METHODS


@pytest.mark.parametrize(
    ("name", "needs"),
    [("rsavq", {FISHER, HESSIAN}), ("kmeans", set()), ("gptq", {HESSIAN}), ("rtn", set())],
)
def test_methods_declare_what_they_need(name, needs):
    method = METHODS[name]
    config = method.configure(3)
    assert isinstance(config, method.config_type)
    assert method.needs(config) == needs
    assert method_for(config).quantize is method.quantize


def test_configure_refuses_options_of_other_methods():
    with pytest.raises(UsageError, match="lam: not an option of method gptq"):
        METHODS["gptq"].configure(3, lam=0.1)
    with pytest.raises(UsageError, match="group_size: not an option of method kmeans"):
        METHODS["kmeans"].configure(3, group_size=64)
    with pytest.raises(UsageError, match="needs whole bits"):
        METHODS["rtn"].configure(2.5)
    assert METHODS["rsavq"].configure(3, preset_name="paper") == preset("paper", 3)


def test_method_for_an_unknown_config_is_one_line():
    with pytest.raises(UsageError, match="no registered method for dict"):
        method_for({})


@pytest.mark.parametrize(
    "config", [preset("kmeans", 3, kmeans_iters=2), ScalarConfig("rtn", 3, group_size=8)]
)
def test_every_result_round_trips_through_its_state_and_installs(config):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    model = nn.Sequential(layer)
    method = method_for(config)
    result, _ = method.quantize(config, layer, None, None)
    again = method.load(*result.state())
    assert torch.equal(again.dequantize(), result.dequantize())
    assert again.stored_bits() == result.stored_bits() and again.group_bits == result.group_bits
    again.install(model, "0", layer)
    x = torch.randn(2, 16)
    expected = x @ result.dequantize().T + layer.bias
    assert torch.allclose(model(x), expected, atol=1e-3)  # (the CPU decode sums int16 tables)
    assert (result.spec() is None) == isinstance(config, ScalarConfig)


def test_rsavq_config_names_its_method():
    assert RSAVQConfig.method == "rsavq" and "method" not in RSAVQConfig().to_dict()


QUANTIZER = ("rsavq.algorithms", "rsavq.stats", "rsavq.methods", "rsavq.pipeline", "rsavq.api")


@pytest.mark.parametrize(
    ("imported", "forbidden"),
    [
        (  # the inference path
            "rsavq.nn, rsavq.kernels, rsavq.integrations.transformers, rsavq.serialization",
            QUANTIZER,
        ),
        ("rsavq.algorithms.rsavq, rsavq.algorithms.scalar", QUANTIZER[1:]),
        ("rsavq.stats.run, rsavq.stats.sequential", QUANTIZER[2:]),
        ("rsavq.streaming, rsavq.models", QUANTIZER),  # loading, below everything
        ("rsavq.pipeline", ("rsavq.api", "rsavq.cli")),
    ],
)
def test_import_direction(imported, forbidden):
    """algorithms below statistics below pipeline below API/CLI; inference imports none."""
    code = (
        f"import sys, {imported}\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({forbidden!r}))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
