"""quantsim: AIMET-compatible quantization simulation, QAT, BatchNorm re-estimation and int8 ONNX export."""
from .config import ConfigError, load_config
from .quantizer import QuantizeDequantize
from .sim import QuantizationSimModel, QuantScheme

__all__ = ["QuantizationSimModel", "QuantScheme", "QuantizeDequantize", "ConfigError", "load_config"]
__version__ = "0.1.0"
