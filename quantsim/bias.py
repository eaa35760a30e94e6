"""int32 bias as integer kernels add it: scale = input scale x weight scale, zero point 0 (docs/math.md, "Bias").

onnxruntime's QLinearConv/QGemm (like TFLite and QNN kernels) add the bias in the int32 accumulator, rounded to
the accumulator's grid. Simulating that rounding is what lets the simulation and onnxruntime agree to one LSB
through deep networks; the encoding is derived, never calibrated.
"""
from __future__ import annotations

import torch

from .quantizer import QuantizeDequantize

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class DerivedBiasQuantizer(QuantizeDequantize):
    """Bias on the int32 grid of (input quantizer scale) x (per-channel weight scale), straight-through gradient."""

    def __init__(self, channels: int, input_quantizer: QuantizeDequantize, weight_quantizer: QuantizeDequantize,
                 name: str = ""):
        super().__init__((channels,), 32, True, channel_axis=0, follows_input=True, name=name)
        self.qmin, self.qmax = INT32_MIN, INT32_MAX
        self.sources = (input_quantizer, weight_quantizer)  # a plain tuple: not submodules (owned elsewhere)

    def derive(self) -> bool:
        """Set scale = s_in * s_w (float32, as onnxruntime computes it); False while a source has no encoding."""
        q_in, q_w = self.sources
        if not (q_in.is_initialized() and q_w.is_initialized()):
            return False
        scale = (q_in.get_scale() * q_w.get_scale()).expand(self.scale.shape)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.offset.zero_()
            self.initialized.fill_(True)
        return True

    def compute_from(self, x: torch.Tensor) -> None:
        """Nothing to calibrate: the encoding follows the input and weight encodings at each forward."""
        self.derive()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_in, q_w = self.sources
        if not self.enabled or self._observing or not (q_in.enabled and q_w.enabled):
            return x
        if not self.derive():
            raise RuntimeError(f"{self.name}: the input or weight quantizer it derives from has no encoding yet")
        scale = self.scale.detach()
        b = torch.round(x.detach() * torch.reciprocal(scale)).clamp_(INT32_MIN, INT32_MAX) * scale
        return x + (b - x).detach()

    def extra_repr(self) -> str:
        return "int32 bias, scale = input scale x weight scale" + ("" if self.enabled else ", disabled")
