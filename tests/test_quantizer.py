"""The quantizer and the grid math, against hand computations and torch's own fake-quant kernels."""
import math

import pytest
import torch

from quantsim import numerics
from quantsim.quantizer import QuantizeDequantize


# ----------------------------------------------------------------------------- grids and encodings by hand
def test_grids():
    assert numerics.grid(8, symmetric=False) == (0, 255)
    assert numerics.grid(8, symmetric=True) == (-128, 127)
    assert numerics.grid(8, symmetric=True, strict=True) == (-127, 127)
    assert numerics.grid(8, symmetric=True, unsigned=True) == (0, 255)
    assert numerics.grid(4, symmetric=True) == (-8, 7)
    with pytest.raises(ValueError):
        numerics.grid(0, False)


def test_asymmetric_encoding_by_hand():
    scale, offset = numerics.encoding_from_range(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert offset.item() == round(-1 / (4 / 255))  # round(-63.75) = -64
    assert offset.item() == -64


def test_range_always_includes_zero():
    scale, offset = numerics.encoding_from_range(torch.tensor(1.0), torch.tensor(3.0), 0, 255, False)
    assert scale.item() == pytest.approx(3 / 255, rel=1e-7) and offset.item() == 0
    scale, offset = numerics.encoding_from_range(torch.tensor(-3.0), torch.tensor(-1.0), 0, 255, False)
    assert scale.item() == pytest.approx(3 / 255, rel=1e-7) and offset.item() == -255


def test_symmetric_encodings_by_hand():
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    s, o = numerics.encoding_from_range(lo, hi, -128, 127, True)
    assert s.item() == pytest.approx(max(3 / 127, 1 / 128), rel=1e-7) and o.item() == 0
    s, o = numerics.encoding_from_range(torch.tensor(-3.0), torch.tensor(1.0), -128, 127, True)
    assert s.item() == pytest.approx(3 / 128, rel=1e-7)  # max(1/127, -3/-128)
    s, o = numerics.encoding_from_range(torch.tensor(-3.0), torch.tensor(1.0), -127, 127, True)  # strict
    assert s.item() == pytest.approx(3 / 127, rel=1e-7)
    s, o = numerics.encoding_from_range(torch.tensor(0.0), torch.tensor(2.0), 0, 255, True)  # unsigned symmetric
    assert s.item() == pytest.approx(2 / 255, rel=1e-7) and o.item() == 0


def test_all_zero_range_gets_tiny_scale():
    s, o = numerics.encoding_from_range(torch.tensor(0.0), torch.tensor(0.0), 0, 255, False)
    assert s.item() == pytest.approx(numerics.SCALE_EPS) and o.item() == 0


# ----------------------------------------------------------------------------- fake-quant vs torch kernels
def _calibrated(x, **kw):
    shape = kw.pop("shape", ())
    q = QuantizeDequantize(shape, **kw)
    q.compute_from(x) if shape else (q.start_observing(), q(x), q.stop_observing())
    return q


@pytest.mark.parametrize("symmetric,strict", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bw", [4, 8])
def test_per_tensor_equals_torch_kernel_and_formula(symmetric, strict, bw):
    torch.manual_seed(0)
    x = torch.randn(64, 33) * 3 + 0.5
    q = _calibrated(x, bitwidth=bw, symmetric=symmetric, strict_symmetric=strict)
    scale, offset = q.get_scale(), q.get_offset()
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(-offset.item()), q.qmin, q.qmax)
    assert torch.equal(q(x), ref)
    # float64 hand formula: identical except where x/scale sits within float error of a rounding tie
    xs = x.double() / scale.double()
    hand = (torch.clamp(torch.round(xs) - offset.double(), q.qmin, q.qmax) + offset.double()) * scale.double()
    near_tie = (xs - xs.floor() - 0.5).abs() < 1e-4
    assert torch.allclose(q(x).double()[~near_tie], hand[~near_tie], atol=1e-6)
    # the encoding covers the data's range (min-max)
    assert q.get_min().item() <= x.min().item() + scale.item() and q.get_max().item() >= x.max().item() - scale.item()


def test_min_max_encoding_equals_hand_computation():
    x = torch.tensor([[-0.8, 0.2, 2.3], [1.1, -0.1, 0.0]])
    q = _calibrated(x, bitwidth=8, symmetric=False)
    scale = (2.3 - (-0.8)) / 255
    assert q.get_scale().item() == pytest.approx(scale, rel=1e-6)
    assert q.get_offset().item() == round(-0.8 / scale) == -66


def test_per_channel_conv_weight_equals_torch_kernel():
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 2, 16).view(-1, 1, 1, 1)
    q = _calibrated(w, shape=(16,), bitwidth=8, symmetric=True, channel_axis=0, follows_input=True)
    ref = torch.fake_quantize_per_channel_affine(w, q.get_scale(), (-q.get_offset()).int(), 0, -128, 127)
    assert torch.equal(q(w), ref)
    # each channel's scale is max(|max|/127, |min|/128) of that channel
    flat = w.reshape(16, -1)
    hand = torch.maximum(flat.amax(1).clamp(min=0) / 127, -flat.amin(1).clamp(max=0) / 128)
    assert torch.allclose(q.get_scale(), hand, rtol=1e-6)


def test_per_channel_axis1_conv_transpose_weight():
    torch.manual_seed(2)
    w = torch.randn(4, 6, 3, 3)  # ConvTranspose: (in, out, k, k), output channels on axis 1
    q = _calibrated(w, shape=(6,), bitwidth=8, symmetric=True, channel_axis=1, follows_input=True)
    ref = torch.fake_quantize_per_channel_affine(w, q.get_scale(), (-q.get_offset()).int(), 1, -128, 127)
    assert torch.equal(q(w), ref)


def test_grouped_conv_transpose_channels_are_output_channels():
    torch.manual_seed(3)
    groups, in_g, out_g = 2, 3, 4
    w = torch.randn(groups * in_g, out_g, 3, 3)
    w[in_g:, 1] *= 10  # output channel 1 of group 1 = output channel out_g + 1
    q = _calibrated(w, shape=(groups * out_g,), bitwidth=8, symmetric=True, channel_axis=1, follows_input=True,
                    groups=groups)
    y = q(w)
    scales = q.get_scale()
    for g in range(groups):  # reference: quantize each output channel's slice on its own
        for j in range(out_g):
            sl = w[g * in_g:(g + 1) * in_g, j]
            s = max(sl.max().item() / 127, -sl.min().item() / 128)
            assert scales[g * out_g + j].item() == pytest.approx(s, rel=1e-6)
            ref = torch.fake_quantize_per_tensor_affine(sl, scales[g * out_g + j].item(), 0, -128, 127)
            assert torch.equal(y[g * in_g:(g + 1) * in_g, j], ref)


# ----------------------------------------------------------------------------- gradients and state
def test_straight_through_gradient_hand_example():
    q = QuantizeDequantize((), bitwidth=8, symmetric=False)
    q.set_encoding(torch.tensor(0.1), torch.tensor(-10.0))  # grid covers [-1.0, 24.5]
    x = torch.tensor([-2.0, -1.0, 0.0, 0.33, 24.5, 30.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_param_quantizer_follows_weight_updates():
    w = torch.nn.Parameter(torch.randn(4, 3))
    q = QuantizeDequantize((4,), bitwidth=8, symmetric=True, channel_axis=0, follows_input=True)
    q(w)
    before = q.get_scale().clone()
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step changes the weight in place
    q(w)
    assert torch.allclose(q.get_scale(), before * 2, rtol=1e-6)
    q.set_encoding(before, freeze=True)
    with torch.no_grad():
        w.mul_(2.0)
    q(w)
    assert torch.equal(q.get_scale(), before)


def test_uninitialized_quantizer_names_itself():
    q = QuantizeDequantize((), name="layer1.relu.output_quantizers[0]")
    with pytest.raises(RuntimeError, match=r"layer1\.relu\.output_quantizers\[0\]"):
        q(torch.ones(2))


def test_nan_in_calibration_names_quantizer():
    q = QuantizeDequantize((), name="fc.input_quantizers[0]")
    q.start_observing()
    with pytest.raises(ValueError, match=r"fc\.input_quantizers\[0\]"):
        q(torch.tensor([1.0, float("nan")]))


def test_disabled_quantizer_passes_through():
    q = QuantizeDequantize(())
    q.enabled = False
    x = torch.randn(5)
    assert q(x) is x


def test_range_learning_keeps_min_below_max():
    q = QuantizeDequantize((), bitwidth=8, symmetric=False)
    q.set_encoding(torch.tensor(0.05), torch.tensor(-20.0))
    q.learn_ranges = True
    opt = torch.optim.SGD(q.parameters(), lr=10.0)
    x = torch.linspace(-1, 5, 101)
    for _ in range(3):
        opt.zero_grad()
        (-(q(x) ** 2).sum()).backward()  # pushes the scale hard in one direction
        opt.step()
    assert q.scale.grad is not None
    assert (q.get_min() < q.get_max()).all()
    assert math.isfinite(q.get_scale().item()) and q.get_scale().item() > 0


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(4)
    x = torch.randn(100)
    q = _calibrated(x, bitwidth=8, symmetric=False)
    q2 = QuantizeDequantize((), bitwidth=8, symmetric=False)
    q2.load_state_dict(q.state_dict())
    assert q2.is_initialized() and torch.equal(q2(x), q(x))
