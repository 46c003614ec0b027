"""rsavq: Riemannian sensitivity-aware vector quantization of large language models.

Importing the package has no side effects: heavy modules (transformers, datasets) load lazily.
"""

from rsavq.errors import DataError, ModelNotFoundError, RsavqError, UsageError

__version__ = "0.1.0"

__all__ = ["DataError", "ModelNotFoundError", "RsavqError", "UsageError", "__version__"]
