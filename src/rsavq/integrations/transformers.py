"""transformers integration: `quant_method = "rsavq"` for `AutoModelForCausalLM.from_pretrained`.

`register()` (called by `import rsavq`) adds a quantization config class and an `HfQuantizer` to
transformers' registries. Loading then builds `VQLinear` modules from the config's per-layer specs
on the meta device, before transformers loads the packed tensors into them; `save_pretrained`
writes the same tensors and the config back.
"""

from __future__ import annotations

import logging

from rsavq.config import QUANT_METHOD

logger = logging.getLogger(__name__)
_REGISTERED = False


def register() -> bool:
    """Register rsavq with transformers once; False when transformers is not importable."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import (
            HfQuantizer,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    from rsavq.serialization import check_format_version

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:  # registered by another copy of this module
        _REGISTERED = True
        return True

    @register_quantization_config(QUANT_METHOD)
    class RsavqConfig(QuantizationConfigMixin):
        """`quantization_config` of an rsavq checkpoint (`serialization.quantization_config`)."""

        def __init__(self, format_version=None, config=None, layers=None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.config = config or {}
            self.layers = layers or {}
            check_format_version(format_version, "the checkpoint")

    @register_quantizer(QUANT_METHOD)
    class RsavqHfQuantizer(HfQuantizer):
        """Loads pre-quantized rsavq checkpoints (quantizing happens in `rsavq quantize`)."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            from rsavq.serialization import replace_linears

            replace_linears(model, self.quantization_config.layers)

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        def is_serializable(self, safe_serialization=None) -> bool:
            return True

    _REGISTERED = True
    return True
