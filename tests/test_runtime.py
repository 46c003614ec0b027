import pytest
import torch

import rsavq.runtime
from rsavq.errors import UsageError
from rsavq.runtime import bf16_autocast, fast_bf16, resolve_device, resolve_dtype


def test_float16_on_cpu_is_refused_with_fix():
    with pytest.raises(UsageError, match="float16 is not supported on CPU; use --dtype"):
        resolve_dtype("float16", torch.device("cpu"))


def test_known_dtypes_on_cpu():
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32


def test_unknown_dtype():
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))


def test_auto_device_and_bad_device():
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("floppy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu():
    with pytest.raises(UsageError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")


def test_fast_bf16_is_onednns_own_check_on_the_cpu():
    expected = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fast_bf16(torch.device("cpu")) is expected
    assert fast_bf16("cpu") is expected


@pytest.mark.parametrize(("fast", "wanted"), [(True, True), (True, False), (False, True)])
def test_bf16_autocast_only_where_wanted_and_fast(monkeypatch, fast, wanted):
    monkeypatch.setattr(rsavq.runtime, "_fast_bf16", lambda device_type: fast)
    with bf16_autocast(torch.device("cpu"), wanted):
        y = torch.randn(4, 8) @ torch.randn(8, 3)
    assert y.dtype == (torch.bfloat16 if fast and wanted else torch.float32)
