import pytest
import torch

from rsavq.errors import UsageError
from rsavq.runtime import resolve_device, resolve_dtype


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
