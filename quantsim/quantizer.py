"""The quantizer: a plain nn.Module that owns one encoding and rounds with it.

How a range is chosen lives in quantsim.observers (swappable); the grid math in quantsim.numerics.
A quantizer's encoding is (scale, offset) in AIMET's sign convention; state_dict, .to(device),
optimizers and DDP see ordinary parameters and buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from . import numerics
from .observers import NonFiniteError, make_observer


class QuantizeDequantize(nn.Module):
    """Fake-quantizer: x -> (clamp(round(x/scale) - offset, qmin, qmax) + offset) * scale.

    shape: () for per-tensor, (C,) for per-channel along `channel_axis`.
    Param quantizers (`follows_input=True`) recompute their encoding from the tensor they see whenever it
    changed (tracked by the tensor's version counter), unless frozen or learning their range.
    """

    def __init__(
        self,
        shape: tuple[int, ...] = (),
        bitwidth: int = 8,
        symmetric: bool = False,
        *,
        channel_axis: int | None = None,
        strict_symmetric: bool = False,
        unsigned_symmetric: bool = False,
        scheme: str = "min_max",
        follows_input: bool = False,
        groups: int = 1,
        dtype: str = "int",
        fixed_range: tuple[float, float] | None = None,
        name: str = "",
    ):
        super().__init__()
        if (channel_axis is None) != (len(shape) == 0):
            raise ValueError("per-channel quantizers need a channel_axis and a 1-d shape; per-tensor neither")
        self.bitwidth = int(bitwidth)
        self.symmetric = bool(symmetric)
        self.strict_symmetric = bool(strict_symmetric)
        self.unsigned_symmetric = bool(unsigned_symmetric)
        self.channel_axis = channel_axis
        self.groups = int(groups)
        self.dtype = dtype
        self.fixed_range = fixed_range
        self.follows_input = follows_input
        self.enabled = True
        self.frozen = False
        self.name = name
        self.qmin, self.qmax = numerics.grid(self.bitwidth, self.symmetric, self.strict_symmetric)
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.register_buffer("initialized", torch.tensor(False))
        self._scheme = scheme
        self.observer = make_observer(scheme, 0 if channel_axis is not None else None)
        self._observing = False
        self._seen_version: tuple[int, int] | None = None

    # ----------------------------------------------------------------- encoding access (AIMET names)
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def get_scale(self) -> torch.Tensor | None:
        return self.scale.detach().abs().clamp(min=numerics.SCALE_EPS) if self.is_initialized() else None

    def get_offset(self) -> torch.Tensor | None:
        return torch.round(self.offset.detach()) if self.is_initialized() else None

    def get_min(self) -> torch.Tensor | None:
        if not self.is_initialized():
            return None
        return numerics.range_from_encoding(self.get_scale(), self.get_offset(), self.qmin, self.qmax)[0]

    def get_max(self) -> torch.Tensor | None:
        if not self.is_initialized():
            return None
        return numerics.range_from_encoding(self.get_scale(), self.get_offset(), self.qmin, self.qmax)[1]

    @property
    def learn_ranges(self) -> bool:
        return self.scale.requires_grad

    @learn_ranges.setter
    def learn_ranges(self, value: bool) -> None:
        """Range learning: scale (and offset, if asymmetric) take LSQ gradients."""
        self.scale.requires_grad_(bool(value))
        self.offset.requires_grad_(bool(value) and not self.symmetric)

    def set_encoding(self, scale: torch.Tensor, offset: torch.Tensor | None = None, *, freeze: bool = False):
        """Set the encoding directly (load, folding); `freeze` stops a param quantizer from recomputing it."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        offset = torch.zeros_like(scale) if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        if scale.shape != self.scale.shape or offset.shape != self.offset.shape:
            raise ValueError(f"{self.name}: encoding shape {tuple(scale.shape)} does not fit {tuple(self.scale.shape)}")
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(f"{self.name}: scale must be finite and > 0")
        with torch.no_grad():
            self.scale.copy_(scale)
            self.offset.copy_(offset)
            self.initialized.fill_(True)
        self.frozen = self.frozen or freeze

    def set_range(self, min_: torch.Tensor, max_: torch.Tensor) -> None:
        """Encoding from a (min, max) range, on this quantizer's grid (unsigned if allowed and min >= 0)."""
        min_ = torch.as_tensor(min_, dtype=torch.float32, device=self.scale.device)
        max_ = torch.as_tensor(max_, dtype=torch.float32, device=self.scale.device)
        unsigned = self.symmetric and self.unsigned_symmetric and bool((min_ >= 0).all())
        self.qmin, self.qmax = numerics.grid(self.bitwidth, self.symmetric, self.strict_symmetric, unsigned)
        self.set_encoding(*numerics.encoding_from_range(min_, max_, self.qmin, self.qmax, self.symmetric))

    @property
    def is_unsigned_grid(self) -> bool:
        return self.symmetric and self.qmin == 0

    # ----------------------------------------------------------------- calibration
    def start_observing(self) -> None:
        self.observer.reset()
        self._observing = True

    def stop_observing(self) -> bool:
        """Finish calibration: set the encoding from the statistics; False if no data was seen."""
        self._observing = False
        if self.fixed_range is not None:
            self.set_range(*self.fixed_range)
            return True
        if self.observer.num_batches == 0:
            return False
        lo, _ = self.observer.observed_range()
        unsigned = self.symmetric and self.unsigned_symmetric and bool((lo >= 0).all())
        qmin, qmax = numerics.grid(self.bitwidth, self.symmetric, self.strict_symmetric, unsigned)
        self.set_range(*self.observer.compute_range(qmin, qmax, self.symmetric))
        self.observer.reset()
        return True

    def _observe(self, x: torch.Tensor) -> None:
        try:
            self.observer.update(self._channel_major(x.detach()))
        except NonFiniteError as e:
            raise ValueError(f"{self.name or 'quantizer'}: {e}") from None

    def compute_from(self, x: torch.Tensor) -> None:
        """Encoding from one tensor (a weight): observe it alone and set the result."""
        self.observer.reset()
        self._observe(x)
        self._observing = True
        self.stop_observing()
        self._seen_version = (x.data_ptr(), x._version)

    def set_scheme(self, scheme: str, **kwargs) -> None:
        self._scheme = scheme
        self.observer = make_observer(scheme, 0 if self.channel_axis is not None else None, **kwargs)

    # ----------------------------------------------------------------- forward
    def _channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """View with channels on axis 0 (grouped ConvTranspose weights interleave groups on axis 0)."""
        if self.channel_axis is None:
            return x
        if self.groups > 1 and self.channel_axis == 1:
            g = self.groups
            in_g, out_g, rest = x.shape[0] // g, x.shape[1], x.shape[2:]
            return x.reshape(g, in_g, out_g, *rest).transpose(1, 2).reshape(g * out_g, in_g, *rest)
        return x.movedim(self.channel_axis, 0)

    def _from_channel_major(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.groups > 1 and self.channel_axis == 1:
            g = self.groups
            in_g, out_g = like.shape[0] // g, like.shape[1]
            y = y.reshape(g, out_g, in_g, *like.shape[2:]).transpose(1, 2)
            return y.reshape(like.shape)
        return y.movedim(0, self.channel_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self._observing:
            self._observe(x)
            return x
        if self.dtype == "float":
            return x.to(torch.float16).to(x.dtype) if self.bitwidth == 16 else x.to(torch.bfloat16).to(x.dtype)
        if self.follows_input and not self.frozen and not self.learn_ranges:
            version = (x.data_ptr(), x._version)
            if version != self._seen_version or not self.is_initialized():
                with torch.no_grad():
                    self.compute_from(x)
        if not self.is_initialized():
            raise RuntimeError(
                f"{self.name or 'quantizer'} has no encoding: it saw no data during compute_encodings "
                "(was this part of the model run by the calibration callback?)"
            )
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        grouped = self.groups > 1 and self.channel_axis == 1
        xq = self._channel_major(x) if grouped else x
        axis = None if self.channel_axis is None else (0 if grouped else self.channel_axis)
        scale = self.scale.abs().clamp(min=numerics.SCALE_EPS)
        if self.learn_ranges:
            y = numerics.fake_quantize_learnable(xq, scale, self.offset, self.qmin, self.qmax, axis)
        else:
            y = numerics.fake_quantize(xq, scale, self.offset, self.qmin, self.qmax, axis)
        return self._from_channel_major(y, x) if grouped else y

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        sym = "strict-symmetric" if self.strict_symmetric else ("symmetric" if self.symmetric else "asymmetric")
        state = "" if self.enabled else ", disabled"
        return f"bw={self.bitwidth}, {sym}, {kind}, scheme={self._scheme}{state}"
