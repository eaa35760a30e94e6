"""Integer grids and encodings, AIMET v2 semantics (derivations in docs/math.md).

An encoding is (scale, offset) with AIMET's sign convention: offset = -zero_point::

    q     = clamp(round(x / scale) - offset, qmin, qmax)
    x_hat = (q + offset) * scale

Rounding is half-to-even (torch.round / the fused fake-quant kernels).
"""
from __future__ import annotations

import torch

from export.encodings import grid  # the grid is defined once, on the torch-free side (re-exported here)

__all__ = ["SCALE_EPS", "grid", "encoding_from_range", "range_from_encoding", "fake_quantize",
           "fake_quantize_learnable", "quantize"]

#: Smallest scale an encoding may have: an all-zero tensor still gets a valid (tiny) grid.
SCALE_EPS = float(torch.finfo(torch.float32).eps)


def encoding_from_range(
    min_: torch.Tensor, max_: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) for an observed range; the range is first widened to include 0.

    ::

        asymmetric: scale = (max-min)/(qmax-qmin), offset = round(min/scale) - qmin
        symmetric:  scale = max(max/qmax, min/qmin) (qmin < 0), offset = 0
                    on an unsigned grid (qmin == 0): scale = max/qmax, offset = 0
    """
    min_ = torch.as_tensor(min_, dtype=torch.float32).clamp(max=0.0)
    max_ = torch.as_tensor(max_, dtype=torch.float32).clamp(min=0.0)
    if symmetric:
        scale = max_ / qmax
        if qmin < 0:
            scale = torch.maximum(scale, min_ / qmin)
        scale = scale.clamp(min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((max_ - min_) / (qmax - qmin)).clamp(min=SCALE_EPS)
    offset = torch.round(min_ / scale) - qmin
    return scale, offset


def range_from_encoding(scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int):
    """(min, max) represented by an encoding: the values of the grid's two ends."""
    return (qmin + offset) * scale, (qmax + offset) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    """Quantize-dequantize with torch's fused kernels (straight-through gradient inside the range).

    `scale` and `offset` are float32 tensors (shape () or (C,)); torch takes zero_point = -offset.
    """
    zero_point = (-offset).to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis % x.dim(), qmin, qmax)


def fake_quantize_learnable(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> torch.Tensor:
    """Quantize-dequantize with LSQ gradients for scale and offset (torch's learnable kernels)."""
    zero_point = -offset
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1), qmin, qmax, 1.0
        )
    return torch._fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, axis % x.dim(), qmin, qmax, 1.0
    )


def quantize(x: torch.Tensor, scale, offset, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Integer values q (as float32) of x on the grid, rounded exactly as the fused kernels do.

    The kernels multiply by the float32 reciprocal of the scale (round(x * (1/scale))), which can differ
    from round(x / scale) by one step on ties; export and folding must reproduce the simulation.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32)
    offset = torch.as_tensor(offset, dtype=torch.float32)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    return torch.clamp(torch.round(x.float() * (1.0 / scale)) - offset, qmin, qmax)
