"""QAT on sim.model: straight-through and LSQ gradients against hand computations, BatchNorm behaviour during
training, weight encodings following the weights, and the fast kernels against torch's own fake-quant kernels."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsim import QuantizationSimModel, freeze_bn_stats, reestimate_bn_stats, unfreeze_bn_stats
from quantsim.quantizer import QuantizeDequantize, _fake_quantize, _fake_quantize_with_mask, _KernelParams


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ConvBNReLU(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = act()
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn2(self.conv2(self.act(self.bn(self.conv(x)))))


def calibrated(model, *args, n=2, shape=(8, 3, 6, 6), **kwargs):
    sim = QuantizationSimModel(model, *args, **kwargs)
    sim.compute_encodings([torch.randn(shape) for _ in range(n)], progress=False)
    return sim


# ============================================================================ straight-through estimator


def test_ste_hand_example_through_linear_layer():
    """y = FQ_out(FQ_in(x) @ FQ_w(W)^T + b): gradients pass only where each quantizer's value was in range."""
    sim = QuantizationSimModel(nn.Sequential(nn.Linear(3, 2)), config="per_tensor")
    lin = sim.model[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.30, -0.62, 9.0], [1.1, 0.2, -0.35]]))
        lin.bias.copy_(torch.tensor([0.05, -0.1]))
    lin.input_quantizers[0].set_encoding(torch.tensor(0.1), torch.tensor(-10.0))   # grid [-1.0, 24.5]
    lin.param_quantizers["weight"].set_encoding(torch.tensor(0.25), freeze=True)    # grid [-32.0, 31.75] * ...
    lin.param_quantizers["weight"].set_encoding(torch.tensor(0.05), freeze=True)    # ... [-6.4, 6.35]: 9.0 clipped
    lin.output_quantizers[0].set_encoding(torch.tensor(0.02), torch.tensor(-100.0))  # grid [-2.0, 3.1]
    x = torch.tensor([[-2.0, 0.33, 1.04], [0.52, 30.0, -0.71]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (sim.model(x) * g).sum().backward()

    # hand computation (float64, no torch quantization code)
    def fq(v, s, o, lo, hi):
        q = min(max(round(v / s) - o, lo), hi)
        return (q + o) * s, lo <= round(v / s) - o <= hi

    xs = [[-2.0, 0.33, 1.04], [0.52, 30.0, -0.71]]
    ws = [[0.30, -0.62, 9.0], [1.1, 0.2, -0.35]]
    xq = [[fq(v, 0.1, -10, 0, 255) for v in row] for row in xs]
    wq = [[fq(v, 0.05, 0, -128, 127) for v in row] for row in ws]
    gx = [[0.0] * 3 for _ in range(2)]
    gw = [[0.0] * 3 for _ in range(2)]
    for n in range(2):
        for j in range(2):
            pre = sum(xq[n][i][0] * wq[j][i][0] for i in range(3)) + [0.05, -0.1][j]
            _, out_in = fq(pre, 0.02, -100, 0, 255)
            go = g[n, j].item() * out_in
            for i in range(3):
                gx[n][i] += go * wq[j][i][0] * xq[n][i][1]
                gw[j][i] += go * xq[n][i][0] * wq[j][i][1]
    torch.testing.assert_close(x.grad, torch.tensor(gx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, torch.tensor(gw), atol=1e-5, rtol=1e-5)
    assert x.grad[0, 0] == 0 and x.grad[1, 1] == 0  # clipped inputs
    assert lin.weight.grad[0, 2] == 0  # clipped weight 9.0


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_qat_step_matches_torch_reference_bit_for_bit(act):
    """Forward values and every gradient of a conv-BN-act-conv-BN sim in train mode equal a reference built from
    torch's own fake-quant kernels, BN in train mode and the activation (fused kernels, recomputed weights)."""
    sim = calibrated(ConvBNReLU(act))
    m = sim.model.train()
    ref = copy.deepcopy(m)  # same parameters and buffers
    x = torch.randn(8, 3, 6, 6) * 2
    y = m(x)
    y.square().sum().backward()

    def fq(q, t):
        s, o = q.get_scale(), q.get_offset()
        if q.channel_axis is None:
            return torch.fake_quantize_per_tensor_affine(t, s, (-o).int(), q.qmin, q.qmax)
        return torch.fake_quantize_per_channel_affine(t, s, (-o).int(), q.channel_axis, q.qmin, q.qmax)

    xr = x.clone().requires_grad_()
    c, bn, a, c2, bn2 = ref.conv, ref.bn, ref.act, ref.conv2, ref.bn2
    h = F.conv2d(fq(m.conv.input_quantizers[0], xr), fq(m.conv.param_quantizers["weight"], c.weight), None, 1, 1)
    h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    h = fq(m.act.output_quantizers[0], F.relu(h) if act is nn.ReLU else F.relu6(h))
    h = F.conv2d(h, fq(m.conv2.param_quantizers["weight"], c2.weight), c2.bias)
    h = F.batch_norm(h, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, True, bn2.momentum, bn2.eps)
    yr = fq(m.bn2.output_quantizers[0], h)
    yr.square().sum().backward()
    assert torch.equal(y, yr)
    for (name, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, pr.grad), name
    for (name, b), (_, br) in zip(m.named_buffers(), ref.named_buffers()):
        if "running" in name:  # BN running statistics updated identically (F.batch_norm does not count batches)
            assert torch.equal(b, br), name


def test_fake_quantized_weight_is_not_kept_for_backward():
    """The conv's saved weight is recomputed in backward: a forward keeps far less than a weight copy alive."""
    sim = calibrated(nn.Sequential(nn.Conv2d(3, 256, 3), nn.ReLU(), nn.Conv2d(256, 256, 3)), shape=(1, 3, 6, 6))
    w_bytes = sim.model[2].weight.numel() * 4
    m = sim.model.train()
    m(torch.randn(1, 3, 6, 6))  # encodings follow the weights; nothing to compare yet
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # outer hooks see what inner ones keep
        y = m(torch.randn(1, 3, 6, 6))
    assert y.requires_grad
    assert max(kept, default=0) < w_bytes / 4  # activations only (the hooks inside replace the weights)
    y.sum().backward()
    assert m[2].weight.grad is not None and m[2].weight.grad.abs().sum() > 0


def test_weight_modified_between_forward_and_backward_raises():
    sim = calibrated(nn.Sequential(nn.Conv2d(3, 4, 3)))
    m = sim.model.train()
    y = m(torch.randn(2, 3, 6, 6))
    with torch.no_grad():
        m[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


# ============================================================================ range learning (LSQ)


def lsq_reference(x, s, o, qmin, qmax, g):
    """float64 LSQ gradients (docs/math.md, "Range learning") of sum(g * x_hat) w.r.t. scale and offset."""
    ds = do = 0.0
    gx = []
    for xi, gi in zip(x, g):
        v = xi / s
        q = round(v) - o
        if q < qmin:
            ds, do = ds + gi * (qmin + o), do + gi * s
            gx.append(0.0)
        elif q > qmax:
            ds, do = ds + gi * (qmax + o), do + gi * s
            gx.append(0.0)
        else:
            ds += gi * (round(v) - v)
            gx.append(gi)
    return ds, do, gx


@pytest.mark.parametrize("per_channel", [False, True])
def test_range_learning_gradients_match_float64_lsq(per_channel):
    x = [-1.37, -0.21, 0.013, 0.49, 0.77, 1.91, 2.6, 3.3]
    g = [0.7, -1.1, 0.3, 2.0, -0.4, 1.3, 0.9, -2.2]
    s, o = 0.0125, -77.0  # grid [-0.9625, 2.225]: both ends clip
    shape = (1,) if per_channel else ()
    q = QuantizeDequantize(shape, bitwidth=8, symmetric=False, channel_axis=0 if per_channel else None)
    q.set_encoding(torch.full(shape, s), torch.full(shape, o))
    q.learn_ranges = True
    assert q.scale.requires_grad and q.offset.requires_grad
    xt = torch.tensor(x).view(1, -1) if per_channel else torch.tensor(x)
    xt.requires_grad_()
    (q(xt) * torch.tensor(g).view_as(xt)).sum().backward()
    ds, do, gx = lsq_reference(x, s, o, 0, 255, g)
    assert q.scale.grad.sum().item() == pytest.approx(ds, rel=1e-4, abs=1e-6)
    assert q.offset.grad.sum().item() == pytest.approx(do, rel=1e-5)
    assert xt.grad.view(-1).tolist() == pytest.approx(gx)


@pytest.mark.parametrize("offset, used", [(-2.5, -2.0), (-3.5, -4.0), (0.4, 0.0), (5.0, 0.0), (-300.0, -255.0),
                                          (-77.0, -77.0)])
def test_get_offset_is_the_zero_point_the_learnable_kernels_use(offset, used):
    """torch rounds the float zero point half-to-even and clamps it to [qmin, qmax]; export must write that."""
    for shape, axis in (((), None), ((1,), 0)):
        q = QuantizeDequantize(shape, bitwidth=8, symmetric=False, channel_axis=axis)
        q.set_encoding(torch.full(shape, 0.5), torch.full(shape, offset))
        q.learn_ranges = True
        x = torch.tensor([-1000.0, 1000.0]).view((-1,) if axis is None else (1, -1))
        y = q(x).view(-1)
        assert y[0].item() / 0.5 == used  # the low end of the grid: (qmin + offset_used) * scale
        assert q.get_offset().view(-1).item() == used
        q.learn_ranges = False  # the non-learnable path uses the same zero point
        assert torch.equal(q(x).view(-1), y.detach())


def test_range_learning_scheme_trains_activation_ranges_min_below_max():
    sim = calibrated(ConvBNReLU(), quant_scheme="training_range_learning_with_tf_init")
    act_q = sim.model.act.output_quantizers[0]
    assert act_q.learn_ranges and act_q.scale.requires_grad
    before = act_q.scale.detach().clone()
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.05)
    sim.model.train()
    for _ in range(3):
        opt.zero_grad()
        sim.model(torch.randn(8, 3, 6, 6)).square().sum().backward()
        opt.step()
    assert not torch.equal(act_q.scale.detach(), before)
    for _, q in sim.named_quantizers():
        assert (q.get_min() < q.get_max()).all()


# ============================================================================ without range learning


def test_no_quantizer_gradients_and_weight_encodings_follow_weights():
    sim = calibrated(ConvBNReLU())
    m = sim.model.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    wq = m.conv.param_quantizers["weight"]
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(8, 3, 6, 6)).square().sum().backward()
        opt.step()
    for _, q in sim.named_quantizers():
        assert not q.scale.requires_grad and q.scale.grad is None and q.offset.grad is None
    m(torch.randn(1, 3, 6, 6))  # the next forward sees the stepped weights
    w = m.conv.weight.detach().flatten(1)
    expected = torch.maximum(w.amax(1) / 127, w.amin(1) / -128)  # symmetric per-channel min-max
    assert torch.equal(wq.get_scale(), expected)


def test_histogram_scheme_follows_weights_with_its_clipping_ratio():
    """tf_enhanced weights: the scheme runs once; each step keeps its per-channel clip ratio (no histogram)."""
    sim = calibrated(ConvBNReLU(), quant_scheme="tf_enhanced")
    m = sim.model.train()
    wq = m.conv.param_quantizers["weight"]

    def ratio():
        w = m.conv.weight.detach().flatten(1)
        return wq.get_scale() / torch.maximum(w.amax(1) / 127, w.amin(1) / -128)

    m(torch.randn(2, 3, 6, 6))
    r0 = ratio()
    assert not torch.allclose(r0, torch.ones(4))  # the scheme clips (or widens) differently per channel
    with torch.no_grad():
        m.conv.weight.mul_(torch.linspace(0.5, 2.0, 4).view(-1, 1, 1, 1))  # an "optimizer step"
    m(torch.randn(2, 3, 6, 6))
    torch.testing.assert_close(ratio(), r0, rtol=1e-5, atol=0)


# ============================================================================ BatchNorm during QAT


def test_batchnorm_stays_real_in_train_mode():
    sim = calibrated(ConvBNReLU())
    m = sim.model
    assert isinstance(m.bn, nn.BatchNorm2d) and m.conv.output_quantizers[0] is None
    assert m.bn.output_quantizers[0] is None and m.act.output_quantizers[0] is not None  # after the supergroup
    assert m.bn2.output_quantizers[0] is not None  # conv2-bn2 has no activation: the BN carries it
    wq = m.conv.param_quantizers["weight"]
    inputs = []
    m.bn.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone()))
    mean0 = m.bn.running_mean.clone()
    m.train()
    m(torch.randn(8, 3, 6, 6))
    h = inputs[-1]
    # the conv used the *unfolded* weight's own per-channel grid
    w = m.conv.weight.detach().flatten(1)
    assert torch.equal(wq.get_scale(), torch.maximum(w.amax(1) / 127, w.amin(1) / -128))
    # batch statistics normalised this batch and moved the running mean by momentum
    torch.testing.assert_close(m.bn.running_mean, 0.9 * mean0 + 0.1 * h.mean((0, 2, 3)))
    assert m.bn.num_batches_tracked.item() == 1


def test_frozen_bn_statistics_do_not_move_during_a_training_step():
    sim = calibrated(ConvBNReLU())
    m = sim.model.train()
    freeze_bn_stats(m)
    stats = {n: b.clone() for n, b in m.named_buffers() if "running" in n or "num_batches" in n}
    gamma = m.bn.weight.detach().clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    m(torch.randn(8, 3, 6, 6)).square().sum().backward()
    opt.step()
    for n, b in m.named_buffers():
        if n in stats:
            assert torch.equal(b, stats[n]), n
    assert not torch.equal(m.bn.weight.detach(), gamma)  # gamma still trains
    unfreeze_bn_stats(m)
    m(torch.randn(8, 3, 6, 6))
    assert not torch.equal(m.bn.running_mean, stats["bn.running_mean"])


def test_batch_size_one_no_grad_and_bf16_autocast():
    sim = calibrated(ConvBNReLU())
    m = sim.model
    m.eval()
    with torch.no_grad():
        y1 = m(torch.randn(1, 3, 6, 6))
    assert y1.shape == (1, 2, 6, 6)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(4, 3, 6, 6))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert torch.isfinite(m.conv.weight.grad).all() and m.conv.weight.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.eval()(torch.randn(1, 3, 6, 6))


def test_reestimate_bn_stats_on_sim_after_qat_matches_float64_reference():
    """Re-estimation on sim.model: quantizers active, BN layers in train mode, pooled float64 statistics."""
    sim = calibrated(ConvBNReLU())
    m = sim.model.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(8, 3, 6, 6)).square().sum().backward()
        opt.step()
    m.eval()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    captured = {"bn": [], "bn2": []}
    ref = copy.deepcopy(m)
    for name in captured:
        ref.get_submodule(name).train()
        ref.get_submodule(name).register_forward_pre_hook(lambda mod, a, n=name: captured[n].append(a[0].double()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    reestimate_bn_stats(m, batches, progress=False)
    assert not m.training and not m.bn.training
    for name, xs in captured.items():
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)
        bn = m.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), x.var(1), rtol=1e-5, atol=1e-6)


# ============================================================================ the fast kernels


def _kp(scale, zp, qmin, qmax, ndim, axis):
    return _KernelParams(None, scale, zp, qmin, qmax, ndim, axis)


@pytest.mark.parametrize("qmin, qmax", [(0, 255), (-128, 127), (-127, 127), (-8, 7), (0, 15)])
def test_fast_kernels_equal_torch_kernels_bit_for_bit(qmin, qmax):
    """Values and STE masks equal torch's fake-quant kernels, also on exact rounding ties and with a clamp."""
    gen = torch.Generator().manual_seed(qmax)
    for _ in range(20):
        s = torch.rand((), generator=gen) * 0.1 + 1e-4
        zp = torch.randint(qmin, qmax + 1, (), generator=gen).int() if qmin == 0 else torch.tensor(0).int()
        k = torch.randint(-300, 300, (500,), generator=gen).float()
        x = torch.cat([torch.randn(500, generator=gen) * s * 60, (k + 0.5) * s, k * s])
        ref, mref = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, float(s), int(zp), qmin, qmax)
        y, mask = _fake_quantize_with_mask(x, _kp(s, zp, qmin, qmax, 1, None))
        assert torch.equal(y, ref) and torch.equal(mask, mref)
        for clip in ((0.0, None), (0.0, float(s) * 40), (float(s) * -3.3, float(s) * 7.5), (None, float(s) * 1e4)):
            xc = x.clamp(*clip)
            ref, mref = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(xc, float(s), int(zp), qmin, qmax)
            mref = mref & (x > (clip[0] if clip[0] is not None else -math.inf))
            mref = mref & (x < (clip[1] if clip[1] is not None else math.inf))
            y, mask = _fake_quantize_with_mask(x, _kp(s, zp, qmin, qmax, 1, None), clip)
            assert torch.equal(y, ref) and torch.equal(mask, mref)
        sc = torch.rand(6, generator=gen) * 0.1 + 1e-4
        zc = torch.randint(qmin, qmax + 1, (6,), generator=gen).int() if qmin == 0 else torch.zeros(6).int()
        w = torch.randn(5, 6, 7, generator=gen) * sc.view(1, -1, 1) * 60
        ref, mref = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(w, sc, zc, 1, qmin, qmax)
        assert torch.equal(_fake_quantize(w, _kp(sc, zc, qmin, qmax, 3, 1)), ref)
        y, mask = _fake_quantize_with_mask(w, _kp(sc, zc, qmin, qmax, 3, 1))
        assert torch.equal(y, ref) and torch.equal(mask, mref)
        wb = w.bfloat16()  # other dtypes go to torch's kernels
        ref = torch.fake_quantize_per_channel_affine(wb, sc, zc, 1, qmin, qmax)
        assert torch.equal(_fake_quantize(wb, _kp(sc, zc, qmin, qmax, 3, 1)), ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_recomputed_weight_equals_learnable_kernel_output(per_channel):
    """Backward recomputes the fake-quantized weight with the fast kernels: under range learning it must equal
    what torch's learnable kernel produced in forward (same scale, same rounded zero point)."""
    shape, axis = ((6,), 0) if per_channel else ((), None)
    q = QuantizeDequantize(shape, bitwidth=4, symmetric=False, channel_axis=axis, follows_input=True)
    w = torch.randn(6, 3, 3, 3)
    q.set_encoding(torch.rand(shape) * 0.2 + 0.05, torch.round(torch.rand(shape) * -15) - 0.5)  # ties in zp
    q.learn_ranges = True
    assert torch.equal(q._fake_quantize_fixed(w, q._kparams_for(w)), q(w).detach())
