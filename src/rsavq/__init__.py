"""rsavq: Riemannian sensitivity-aware vector quantization of large language models.

Importing the package registers `quant_method = "rsavq"` with transformers (so that
`AutoModelForCausalLM.from_pretrained(quantized_dir)` works); nothing else runs at import, and the
other heavy modules (datasets, lm-eval) load lazily.
"""

from rsavq.errors import DataError, ModelNotFoundError, RsavqError, UsageError

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    from rsavq.integrations.transformers import register

    register()


_register_with_transformers()

__all__ = [
    "DataError",
    "ModelNotFoundError",
    "RSAVQConfig",
    "RsavqError",
    "UsageError",
    "__version__",
    "load_quantized",
]


def __getattr__(name: str):
    """Lazy exports: `rsavq.load_quantized`, `rsavq.RSAVQConfig` (no heavy import at start)."""
    if name == "load_quantized":
        from rsavq.serialization import load_quantized

        return load_quantized
    if name == "RSAVQConfig":
        from rsavq.config import RSAVQConfig

        return RSAVQConfig
    raise AttributeError(f"module 'rsavq' has no attribute {name!r}")
