"""The quantizer: a plain nn.Module that owns one encoding and rounds with it.

How a range is chosen lives in quantsim.observers (swappable); the grid math in quantsim.numerics.
A quantizer's encoding is (scale, offset) in AIMET's sign convention; state_dict, .to(device),
optimizers and DDP see ordinary parameters and buffers.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from . import numerics
from .observers import MinMaxObserver, NonFiniteError, make_observer


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
        self._enabled, self._learn = True, False
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
        """The offset the kernels use: -clamp(round_half_even(-offset), qmin, qmax) (batchnorm_math.md)."""
        return (-self._zero_point(self.offset.detach()).float()) + 0.0 if self.is_initialized() else None  # no -0.0

    def _zero_point(self, offset: torch.Tensor) -> torch.Tensor:
        """int32 zero point = clamp(round(-offset), qmin, qmax), exactly what torch's learnable kernels use."""
        return torch.round(-offset).clamp_(self.qmin, self.qmax).to(torch.int32)

    def get_min(self) -> torch.Tensor | None:
        if not self.is_initialized():
            return None
        return numerics.range_from_encoding(self.get_scale(), self.get_offset(), self.qmin, self.qmax)[0]

    def get_max(self) -> torch.Tensor | None:
        if not self.is_initialized():
            return None
        return numerics.range_from_encoding(self.get_scale(), self.get_offset(), self.qmin, self.qmax)[1]

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """A disabled quantizer passes its input through; its range parameters then take no gradient."""
        self._enabled = bool(value)
        self._update_requires_grad()

    @property
    def learn_ranges(self) -> bool:
        return self._learn

    @learn_ranges.setter
    def learn_ranges(self, value: bool) -> None:
        """Range learning: scale (and offset, if asymmetric) take LSQ gradients while the quantizer is enabled."""
        self._learn = bool(value)
        self._update_requires_grad()

    def _update_requires_grad(self) -> None:
        # Only parameters that get a gradient may require one: DistributedDataParallel waits for a gradient of
        # every parameter that requires one, and a disabled quantizer's never comes.
        learn = self._learn and self._enabled
        self.scale.requires_grad_(learn)
        self.offset.requires_grad_(learn and not self.symmetric)

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
        background = self.__dict__.get("_background")
        if background is not None and x.device.type == "cpu" and not isinstance(self.observer, MinMaxObserver):
            background.update(self, self._update_observer, self._channel_major(x.detach()))
        else:
            self._update_observer(self._channel_major(x.detach()))

    def _update_observer(self, x: torch.Tensor) -> None:
        try:
            self.observer.update(x)
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
        if self.channel_axis is None or self.channel_axis == 0:
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
            with torch.no_grad():
                self._follow(x)
        if not self._ready():
            raise RuntimeError(
                f"{self.name or 'quantizer'} has no encoding: it saw no data during compute_encodings "
                "(was this part of the model run by the calibration callback?)"
            )
        return self._quantize(x)

    # ----------------------------------------------------------------- following the weights (QAT)
    def _enc_key(self) -> tuple[int, int]:
        p = self._parameters  # (hot path: direct dict access, not nn.Module.__getattr__)
        return (p["scale"]._version, p["offset"]._version)

    def _ready(self) -> bool:
        """is_initialized() without a tensor read per call (cached until the flag buffer changes)."""
        flag = self._buffers["initialized"]
        key = (flag._version, flag.data_ptr())
        if self.__dict__.get("_ready_key") == key:
            return True
        if bool(flag):
            self.__dict__["_ready_key"] = key
            return True
        return False

    def _channel_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (or per-tensor) float32 (min, max) of x (NaN/Inf propagate; _set_range_fast raises)."""
        xc = self._channel_major(x)  # called under no_grad
        xc = xc.float() if xc.dtype != torch.float32 else xc
        if self.channel_axis is None:
            lo, hi = torch.amin(xc), torch.amax(xc)
        elif xc.dim() == 1:
            lo, hi = xc, xc
        else:  # amin + amax (torch's aminmax(dim=) is a scalar loop, ~30x slower), reducing without a reshape
            dims = tuple(range(1, xc.dim()))
            lo, hi = xc.amin(dim=dims), xc.amax(dim=dims)
        return lo, hi  # NaN/Inf propagate into the scale, which _set_range_fast checks

    def _follow(self, x: torch.Tensor) -> None:
        """Keep a param quantizer's encoding in step with its changing tensor: min-max exactly; histogram schemes by
        their per-channel clipping ratio (docs/batchnorm_math.md, "QAT numerics")."""
        version = (x.data_ptr(), x._version)
        minmax = self.fixed_range is not None or isinstance(self.observer, MinMaxObserver)
        if not self._ready():
            self.compute_from(x)  # first encoding: the full scheme
            self._seen_version = version
            if not minmax:
                self._record_ratio(x)
            return
        if version == self._seen_version:
            if not minmax and getattr(self, "_ratio_key", None) != self._enc_key():
                self._record_ratio(x)  # encoding just (re)computed from this very tensor, e.g. compute_encodings
            return
        if minmax:
            if self.fixed_range is not None:
                self.set_range(*self.fixed_range)
            else:
                self._set_range_fast(*self._channel_minmax(x), like=x)
                if self.symmetric:  # a symmetric min-max grid holds every element of x: no STE mask needed
                    self.__dict__["_covers_cache"] = ((self._enc_key(), version), True)
        elif getattr(self, "_ratio_key", None) == self._enc_key():
            lo, hi = self._channel_minmax(x)
            self._set_range_fast(lo.clamp(max=0) * self._ratio[0], hi.clamp(min=0) * self._ratio[1])
            self._ratio_key = self._enc_key()
        else:  # encoding set from elsewhere (set_encoding, load_state_dict) for an unknown tensor: run the scheme
            self.compute_from(x)
            self._record_ratio(x)
        self._seen_version = version

    def _set_range_fast(self, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor | None = None) -> None:
        """set_range in a few ops (a QAT step runs it for every weight), same encoding; raises on NaN/Inf (CPU).
        `like`: the tensor, to build its kernel params from the fresh scale."""
        unsigned = self.symmetric and self.unsigned_symmetric and bool((lo >= 0).all())
        qmin, qmax = numerics.grid(self.bitwidth, self.symmetric, self.strict_symmetric, unsigned)
        if self.symmetric and qmin < 0:
            # == encoding_from_range: clamping min to <= 0 and max to >= 0 first never changes this maximum
            scale, offset = torch.maximum(hi / qmax, lo / qmin).clamp_(min=numerics.SCALE_EPS), None
        else:
            scale, offset = numerics.encoding_from_range(lo, hi, qmin, qmax, self.symmetric)
        if scale.device.type == "cpu" and not math.isfinite(float(scale.sum())):  # no device sync elsewhere
            raise ValueError(f"{self.name or 'quantizer'}: tensor holds NaN or Inf; cannot follow it")
        if (qmin, qmax) != (self.qmin, self.qmax):
            self.qmin, self.qmax = qmin, qmax
        self.scale.copy_(scale.reshape(self.scale.shape))
        if offset is not None:
            self.offset.copy_(offset.reshape(self.offset.shape))
        elif self.__dict__.get("_zero_offset_key", (None, None))[1] != self.offset._version:
            self.offset.zero_()
        if not self._ready():
            self.initialized.fill_(True)
        if self.symmetric:  # lets _kparams skip reading the (zero) offset back
            self.__dict__["_zero_offset_key"] = self._enc_key()
            if like is not None:  # the kernel params of this encoding, from the fresh scale (no copy back)
                key = self._kp_key(*self._layout(like))
                self.__dict__["_kp_cache"] = _KernelParams(key, scale.reshape(self.scale.shape), None, qmin, qmax,
                                                           key[-2], key[-1])

    def _record_ratio(self, x: torch.Tensor) -> None:
        """Per-channel (grid min / tensor min, grid max / tensor max) of the current encoding for tensor x."""
        lo, hi = self._channel_minmax(x)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        gmin, gmax = self.get_min(), self.get_max()
        one = torch.ones_like(lo)
        r_lo = torch.where(lo < 0, gmin / torch.where(lo < 0, lo, one), one)
        r_hi = torch.where(hi > 0, gmax / torch.where(hi > 0, hi, one), one)
        self._ratio = (r_lo, r_hi)
        self._ratio_key = self._enc_key()

    # ----------------------------------------------------------------- fake quantization
    def _kernel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, int32 zero point) exactly as the kernels receive them (new tensors, detached)."""
        return self.scale.detach().abs().clamp(min=numerics.SCALE_EPS), self._zero_point(self.offset.detach())

    def _covers(self, x: torch.Tensor, kp: "_KernelParams") -> bool:
        """True when no element of x (a weight) is clamped, so its STE mask is all ones; exact (rounding is monotone,
        each channel's min and max decide), cached per (encoding, tensor version)."""
        key = (self._enc_key(), (x.data_ptr(), x._version))
        cached = self.__dict__.get("_covers_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            if kp.axis is None:
                lo, hi = x.amin(), x.amax()
            else:
                dims = tuple(d for d in range(x.dim()) if d != kp.axis)
                lo = x.amin(dim=dims, keepdim=True) if dims else x
                hi = x.amax(dim=dims, keepdim=True) if dims else x
            inv = kp.inv if x.dtype == torch.float32 else kp.inv.double()
            ok = bool(((lo * inv).round() >= kp.lo_q).all() & ((hi * inv).round() <= kp.hi_q).all())
        self.__dict__["_covers_cache"] = (key, ok)
        return ok

    def _kp_key(self, ndim: int, axis: int | None) -> tuple:
        scale, offset = self._parameters["scale"], self._parameters["offset"]
        return (scale._version, offset._version, scale.data_ptr(), offset.data_ptr(), self.qmin, self.qmax, ndim, axis)

    def _layout(self, x: torch.Tensor) -> tuple[int, int | None]:
        """(ndim, channel axis) of x as the kernels see it (grouped ConvTranspose weights: channel-major)."""
        grouped = self.groups > 1 and self.channel_axis == 1
        return x.dim(), None if self.channel_axis is None else (0 if grouped else self.channel_axis)

    def _kparams(self, ndim: int, axis: int | None) -> "_KernelParams":
        """Kernel inputs derived from the current encoding, cached until the encoding (or its device) changes."""
        key = self._kp_key(ndim, axis)
        kp = self.__dict__.get("_kp_cache")
        if kp is None or kp.key != key:
            if self.__dict__.get("_zero_offset_key") == key[:2]:  # scale written by _set_range_fast: > 0, offset 0
                kp = _KernelParams(key, self.scale.detach().clone(), None, self.qmin, self.qmax, ndim, axis)
            else:
                kp = _KernelParams(key, *self._kernel_params(), self.qmin, self.qmax, ndim, axis)
            self.__dict__["_kp_cache"] = kp
        return kp

    def _kparams_for(self, x: torch.Tensor) -> "_KernelParams":
        """The cached kernel params for fake-quantizing tensor x (layout as this quantizer sees it)."""
        return self._kparams(*self._layout(x))

    def _fake_quantize_fixed(self, x: torch.Tensor, kp: "_KernelParams") -> torch.Tensor:
        """Forward value of fake quantization with given kernel params (no autograd graph of its own)."""
        grouped = self.groups > 1 and self.channel_axis == 1
        xq = self._channel_major(x) if grouped else x
        y = _fake_quantize(xq, kp)
        return self._from_channel_major(y, x) if grouped else y

    def _quantize(self, x: torch.Tensor, clip: tuple[float | None, float | None] | None = None) -> torch.Tensor:
        """Fake-quantize x (clip=(lo, hi): clamp x first, as a fused ReLU/ReLU6 in front of this quantizer)."""
        grouped = self.groups > 1 and self.channel_axis == 1
        xq = self._channel_major(x) if grouped else x
        axis = None if self.channel_axis is None else (0 if grouped else self.channel_axis)
        if self.learn_ranges:
            if clip is not None:
                xq = torch.clamp(xq, clip[0], clip[1])
            scale = self.scale.abs().clamp(min=numerics.SCALE_EPS)
            y = numerics.fake_quantize_learnable(xq, scale, self.offset, self.qmin, self.qmax, axis)
        else:
            kp = self._kparams(xq.dim(), axis)
            if torch.is_grad_enabled() and xq.requires_grad:
                need_mask = clip is not None or not (self.follows_input and self._covers(xq, kp))
                y = _FakeQuantSTE.apply(xq, kp, need_mask, clip)
            else:
                y = _fake_quantize(xq, kp, clip)
        return self._from_channel_major(y, x) if grouped else y

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        sym = "strict-symmetric" if self.strict_symmetric else ("symmetric" if self.symmetric else "asymmetric")
        state = "" if self.enabled else ", disabled"
        return f"bw={self.bitwidth}, {sym}, {kind}, scheme={self._scheme}{state}"


# ===================================================================================================== kernels
# torch's fake-quant kernels are scalar loops (~15 ns per element on CPU); the same arithmetic written with
# vectorized elementwise ops is ~10x faster and bit-identical for float32: q = nearbyint(x * float32(1/scale))
# + zero_point, clamped to [qmin, qmax], x_hat = (q - zero_point) * scale (an exact integer times a float32
# scale, rounded once). Other dtypes (bf16/fp16 under autocast, float64) use torch's kernels.


class _KernelParams:
    """One encoding prepared for the kernels (flat scale / zero point for torch's, broadcast scale, 1/scale and
    rounding bounds for ours), built once per encoding and layout."""

    __slots__ = ("key", "flat_scale", "_zero_point", "qmin", "qmax", "axis", "scale", "inv", "lo_q", "hi_q",
                 "_clips", "_xclips")

    def __init__(self, key, scale, zero_point, qmin, qmax, ndim, axis):
        """zero_point: int32 tensor shaped like scale, or None for all zeros."""
        self.key, self.flat_scale, self._zero_point, self.qmin, self.qmax = key, scale, zero_point, qmin, qmax
        self.axis = None if axis is None else axis % max(ndim, 1)
        shape = () if axis is None else tuple(-1 if i == self.axis else 1 for i in range(ndim))
        self.scale = scale.reshape(shape)
        self.inv = torch.reciprocal(self.scale)  # float32 1/scale, as the kernels compute it
        if zero_point is None or (scale.device.type == "cpu" and not bool(zero_point.any())):
            self.lo_q, self.hi_q = float(qmin), float(qmax)  # scalar bounds take torch's fast clamp path
        else:
            zp = zero_point.to(torch.float32).reshape(shape)
            self.lo_q, self.hi_q = qmin - zp, qmax - zp  # bounds of round(x/scale) = q - zero_point
            if scale.device.type == "cpu" and axis is None:
                self.lo_q, self.hi_q = float(self.lo_q), float(self.hi_q)
        self._clips = {}
        self._xclips = {}

    @property
    def zero_point(self) -> torch.Tensor:
        if self._zero_point is None:
            self._zero_point = torch.zeros(self.flat_scale.shape, dtype=torch.int32, device=self.flat_scale.device)
        return self._zero_point

    def bounds(self, clip=None):
        """(a, b, test_lo, test_hi): x_hat = round(clamp(x * inv, a, b)) * scale; STE mask = [clamp(..) == x * inv]
        times [x > lo] / [x < hi] where flagged (docs/batchnorm_math.md, "QAT numerics")."""
        if clip not in self._clips:
            dev = self.inv.device
            if clip is None and isinstance(self.lo_q, float):  # the common weight case: plain Python numbers
                self._clips[clip] = (_round_threshold(self.lo_q, +1), _round_threshold(self.hi_q, -1), False, False)
                return self._clips[clip]
            lo_q, hi_q = (torch.as_tensor(t, dtype=torch.float32, device=dev) for t in (self.lo_q, self.hi_q))
            lo, hi = clip if clip is not None else (None, None)
            v_lo = None if lo is None else torch.full_like(self.inv, lo) * self.inv
            v_hi = None if hi is None else torch.full_like(self.inv, hi) * self.inv
            if v_lo is not None:  # round is monotone: round(max(x, lo) * inv) = max(round(x * inv), round(lo * inv))
                lo_q = torch.maximum(lo_q, torch.round(v_lo))
            if v_hi is not None:
                hi_q = torch.minimum(hi_q, torch.round(v_hi))
            # round_half_even(v) >= L <=> v >= L - 1/2 (L even) or v > L - 1/2 (L odd); <= H likewise
            a, b = lo_q - 0.5, hi_q + 0.5
            a = torch.where(torch.remainder(lo_q, 2) == 1, torch.nextafter(a, a + 1), a)
            b = torch.where(torch.remainder(hi_q, 2) == 1, torch.nextafter(b, b - 1), b)
            test_lo = test_hi = False
            if lo == 0.0:  # x > 0 <=> v > 0; tiny still rounds to max(lo_q, 0), so the values are unchanged
                a = torch.clamp(a, min=torch.finfo(torch.float32).tiny)
            elif v_lo is not None:
                test_lo = bool((v_lo >= a).any())  # else x <= lo already lands below a
            if v_hi is not None:
                test_hi = bool((v_hi <= b).any())
            if a.dim() == 0 and dev.type == "cpu":  # numbers take torch's fast clamp path
                a, b = float(a), float(b)
            self._clips[clip] = (a, b, test_lo, test_hi)
        return self._clips[clip]

    def x_bounds(self, clip=None):
        """(xa, xb) with mask = [xa <= x <= xb], x_hat = round(clamp(x, xa, xb) * inv) * scale (per tensor, with a
        clip: no separate clip tests); None unless that reproduces `bounds` exactly (checked once)."""
        if clip not in self._xclips:
            self._xclips[clip] = None
            a, b, _, _ = self.bounds(clip)
            if self.axis is None and isinstance(a, float):
                inv = float(self.inv)
                grid_a, grid_b, _, _ = self.bounds(None)
                xa, xb = _x_threshold(inv, grid_a, up=True), _x_threshold(inv, grid_b, up=False)
                lo, hi = clip if clip is not None else (None, None)
                if lo is not None:  # x > lo
                    xa = max(xa, float(np.nextafter(np.float32(lo), np.float32(np.inf))) if lo != 0.0
                             else float(np.finfo(np.float32).tiny))
                if hi is not None:  # x < hi
                    xb = min(xb, float(np.nextafter(np.float32(hi), np.float32(-np.inf))))
                inv32 = np.float32(inv)
                ends_ok = (np.round(np.float32(xa) * inv32) == np.round(np.float32(a))
                           and np.round(np.float32(xb) * inv32) == np.round(np.float32(b)))
                if xa <= xb and ends_ok:
                    self._xclips[clip] = (xa, xb)
        return self._xclips[clip]


def _ordered(f) -> int:
    """float32 -> int with the same order (both zeros -> 0)."""
    i = int(np.float32(f).view(np.int32))
    return i if i >= 0 else -(i + 2**31)


def _unordered(o: int) -> np.float32:
    return np.int32(o if o >= 0 else -o - 2**31).view(np.float32)


_MAX_ORD = _ordered(np.finfo(np.float32).max)


def _x_threshold(inv: float, t: float, up: bool) -> float:
    """up: the smallest float32 x with float32(x * inv) >= t, else the largest with <= t (binary search: inv > 0
    makes x -> x * inv monotone)."""
    inv32, t32 = np.float32(inv), np.float32(t)
    lo, hi = -_MAX_ORD, _MAX_ORD
    with np.errstate(over="ignore"):
        if up:
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if _unordered(mid) * inv32 >= t32 else (mid + 1, hi)
        else:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if _unordered(mid) * inv32 <= t32 else (lo, mid - 1)
    return float(_unordered(lo))


@functools.lru_cache(maxsize=1024)
def _round_threshold(q: float, side: int) -> float:
    """side=+1: the smallest float32 v with round_half_even(v) >= q; side=-1: the largest with <= q."""
    t = np.float32(q - 0.5 * side)  # exact for |q| < 2**23
    if int(q) % 2 == 1:  # the tie at q -/+ 1/2 rounds away from odd q
        t = np.nextafter(t, np.float32(np.inf * side))
    return float(t)


def _composite(x, kp: _KernelParams, clip=None, want_mask=False):
    """(x_hat, mask or None) with the kernels' arithmetic; clip=(lo, hi) clamps x first (mask adds lo < x < hi)."""
    a, b, test_lo, test_hi = kp.bounds(clip)
    if not want_mask:
        return torch.mul(x, kp.inv).clamp_(a, b).round_().mul_(kp.scale), None
    xb = kp.x_bounds(clip) if clip is not None else None
    if xb is not None:  # every condition as one range on x itself: no separate tests for the clip bounds
        c = torch.clamp(x, *xb)
        m = torch.eq(c, x, out=torch.empty_like(x))
        return c.mul_(kp.inv).round_().mul_(kp.scale), m.to(torch.bool)
    v = torch.mul(x, kp.inv)
    c = torch.clamp(v, a, b)
    m = torch.eq(c, v, out=v)  # 1.0 inside, 0.0 clipped (float32: the vectorized path); reuses v's memory
    if test_lo or test_hi:
        tmp = torch.empty_like(m)
        if test_lo:
            m.mul_(torch.gt(x, clip[0], out=tmp))
        if test_hi:
            m.mul_(torch.lt(x, clip[1], out=tmp))
    return c.round_().mul_(kp.scale), m.to(torch.bool)


def _fake_quantize(x, kp: _KernelParams, clip=None):
    if x.dtype == torch.float32:
        return _composite(x, kp, clip)[0]
    if clip is not None:
        x = torch.clamp(x, clip[0], clip[1])
    if kp.axis is None:
        return torch.fake_quantize_per_tensor_affine(x, kp.flat_scale.reshape(()), kp.zero_point.reshape(()),
                                                     kp.qmin, kp.qmax)
    return torch.fake_quantize_per_channel_affine(x, kp.flat_scale, kp.zero_point, kp.axis, kp.qmin, kp.qmax)


def _fake_quantize_with_mask(x, kp: _KernelParams, clip=None):
    """(x_hat, mask): mask marks elements whose integer fell in [qmin, qmax] (and lo < x < hi with a clip)."""
    if x.dtype == torch.float32:
        return _composite(x, kp, clip, want_mask=True)
    xin = x if clip is None else torch.clamp(x, clip[0], clip[1])
    if kp.axis is None:
        enabled = torch.ones(1, dtype=torch.long, device=x.device)
        y, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            xin, kp.flat_scale.reshape(()), kp.zero_point.reshape(()), enabled, kp.qmin, kp.qmax)
    else:
        y, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            xin, kp.flat_scale, kp.zero_point, kp.axis, kp.qmin, kp.qmax)
    if clip is not None:
        if clip[0] is not None:
            mask.logical_and_(x > clip[0])
        if clip[1] is not None:
            mask.logical_and_(x < clip[1])
    return y, mask


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quantize (after an optional fused clamp) with the straight-through gradient; keeps one bool mask,
    or none when nothing can be clamped (docs/batchnorm_math.md, "QAT numerics")."""

    @staticmethod
    def forward(ctx, x, kp, need_mask, clip):
        if not need_mask and clip is None:
            ctx.has_mask = False
            return _fake_quantize(x, kp)
        y, mask = _fake_quantize_with_mask(x, kp, clip)
        ctx.has_mask = True
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        if not ctx.has_mask:
            return grad, None, None, None
        (mask,) = ctx.saved_tensors
        return mask.view(torch.uint8).to(grad.dtype).mul_(grad), None, None, None  # uint8->float is the fast cast
