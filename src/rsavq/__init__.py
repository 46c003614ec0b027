"""rsavq: Riemannian sensitivity-aware vector quantization of large language models.

Importing the package has no side effects: heavy modules (transformers, datasets) load lazily.
"""

from rsavq.errors import DataError, ModelNotFoundError, RsavqError, UsageError

__version__ = "0.1.0"

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
