"""quantsim: AIMET-compatible quantization simulation, QAT, BatchNorm re-estimation and int8 ONNX export."""
from .config import ConfigError, load_config
from .quantizer import QuantizeDequantize
from .sim import QuantizationSimModel, QuantScheme
from .batchnorm import (fold_all_batch_norms, fold_all_batch_norms_to_scale, freeze_bn_stats, reestimate_and_fold,
                        reestimate_bn_stats, unfreeze_bn_stats)

__all__ = ["QuantizationSimModel", "QuantScheme", "QuantizeDequantize", "ConfigError", "load_config",
           "reestimate_bn_stats", "freeze_bn_stats", "unfreeze_bn_stats", "fold_all_batch_norms",
           "fold_all_batch_norms_to_scale", "reestimate_and_fold"]
__version__ = "0.1.0"
