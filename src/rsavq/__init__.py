"""rsavq: Riemannian sensitivity-aware vector quantization of large language models.

Importing the package registers `quant_method = "rsavq"` with transformers (so that
`AutoModelForCausalLM.from_pretrained(quantized_dir)` works); nothing else runs at import, and the
other heavy modules (datasets, lm-eval) load lazily.
"""

from rsavq.errors import DataError, ModelNotFoundError, RsavqError, UsageError

__version__ = "0.15.0"


def _register_with_transformers() -> None:
    from rsavq.integrations.transformers import register

    register()


_register_with_transformers()

__all__ = [
    "BlockTuning",
    "Distillation",
    "Calibration",
    "DataError",
    "ModelNotFoundError",
    "RSAVQConfig",
    "RsavqError",
    "ScalarConfig",
    "UsageError",
    "__version__",
    "fisher_statistics",
    "load_model",
    "load_quantized",
    "preset",
    "quantize",
]

_LAZY = {  # name -> module: imported on first use (no heavy import at start)
    "BlockTuning": "rsavq.finetune",
    "Distillation": "rsavq.distill",
    "Calibration": "rsavq.api",
    "quantize": "rsavq.api",
    "fisher_statistics": "rsavq.api",
    "RSAVQConfig": "rsavq.config",
    "ScalarConfig": "rsavq.config",
    "preset": "rsavq.config",
    "load_model": "rsavq.models",
    "load_quantized": "rsavq.serialization",
}


def __getattr__(name: str):
    """Lazy exports (`rsavq.quantize`, `rsavq.preset`, `rsavq.load_quantized`, ...)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rsavq' has no attribute {name!r}")
