"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse
import logging


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="HF directory, .gguf file, hub id, or alias smollm2-135m"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="local data directory (default: $RSAVQ_DATA_DIR, else the hub)",
    )


def add_stream_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream-weights",
        action="store_true",
        help="keep the model's decoder blocks on disk and read each when it runs (safetensors "
        "read in place): memory for about one block of weights instead of the whole model, "
        "at the cost of reading blocks again on every pass",
    )


def add_backend_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "cpu", "triton"],
        help="kernel for the quantized layers: auto (default: triton on CUDA, the C++ kernels on "
        "the CPU), or pin one",
    )


def apply_backend(model, name: str) -> None:
    """Pin the quantized layers of `model` to the `--backend` kernel (no-op for `auto`)."""
    from rsavq.nn import set_backend

    if name != "auto" and set_backend(model, name) == 0:
        logging.getLogger("rsavq").warning("--backend %s: the model has no quantized layers", name)
