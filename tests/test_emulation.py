"""sim.emulate_onnxruntime(): the sim computes what onnxruntime's integer kernels compute, checked against onnxruntime
itself (single kernels on random data, then whole exported models, end to end and layer by layer)."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from quantsim import QuantizationSimModel
from quantsim.batchnorm import fold_all_batch_norms_to_scale
from quantsim.emulation import qlinear_add, quantize_linear
from quantsim.exporter import ExportError, onnxruntime_fidelity
from quantsim.models import mobilenet_v2


def _session(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _scalar(name, dtype, v):
    return helper.make_tensor(name, dtype, [], [v])


def test_qlinear_add_matches_onnxruntime():
    """DQ -> Add -> Q becomes QLinearAdd; its float32 expression (two fmas, a contracted constant) is reproduced on
    every element for random scales and zero points (a plain float formula misses a few per million)."""
    rng = np.random.default_rng(0)
    vi = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None]) for n in ("A", "B", "C")]
    mismatches = 0
    for _ in range(12):
        sa, sb, sc = (np.float32(rng.uniform(0.005, 0.1)) for _ in range(3))
        za, zb, zc = (int(rng.integers(0, 256)) for _ in range(3))
        inits = [_scalar("sa", TensorProto.FLOAT, sa), _scalar("sb", TensorProto.FLOAT, sb),
                 _scalar("sc", TensorProto.FLOAT, sc), _scalar("za", TensorProto.UINT8, za),
                 _scalar("zb", TensorProto.UINT8, zb), _scalar("zc", TensorProto.UINT8, zc)]
        nodes = [helper.make_node("DequantizeLinear", ["A", "sa", "za"], ["a"]),
                 helper.make_node("DequantizeLinear", ["B", "sb", "zb"], ["b"]),
                 helper.make_node("Add", ["a", "b"], ["c"]),
                 helper.make_node("QuantizeLinear", ["c", "sc", "zc"], ["C"])]
        sess = _session(nodes, vi[:2], vi[2:], inits)
        a = rng.integers(0, 256, 200_000).astype(np.uint8)
        b = rng.integers(0, 256, 200_000).astype(np.uint8)
        want = sess.run(None, {"A": a, "B": b})[0]
        got = qlinear_add(torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64)),
                          float(sa), za, float(sb), zb, float(sc), zc, 0, 255)
        mismatches += int((got.numpy().astype(np.int64) != want).sum())
    assert mismatches == 0


def test_quantize_linear_matches_onnxruntime_on_ties():
    """QuantizeLinear divides by the scale (the fused fake-quant kernels multiply by its reciprocal): on values
    next to rounding ties the emulation follows onnxruntime."""
    rng = np.random.default_rng(1)
    scale, zp = np.float32(0.0371), 17
    k = rng.integers(-40, 40, 100_000).astype(np.float32)
    x = ((k + np.float32(0.5)) * scale).astype(np.float32)  # ties, as float32 rounds them
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]),
          helper.make_tensor_value_info("q", TensorProto.UINT8, [None])]
    sess = _session([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], vi[:1], vi[1:],
                    [_scalar("s", TensorProto.FLOAT, scale), _scalar("z", TensorProto.UINT8, zp)])
    want = sess.run(None, {"x": x})[0].astype(np.int64)
    got = quantize_linear(torch.from_numpy(x), torch.tensor(scale), zp, 0, 255).numpy().astype(np.int64) + zp
    assert np.array_equal(got, want)


class Deep(nn.Module):
    """Conv/ReLU6, depthwise, linear bottleneck, residual Add, a conv with a long reduction (float64 path),
    global average pool and Linear: every emulated kernel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1), nn.BatchNorm2d(16))
        self.wide = nn.Sequential(nn.Conv2d(16, 512, 3, padding=1), nn.ReLU())
        self.long = nn.Sequential(nn.Conv2d(512, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.pool(self.long(self.wide(x)))
        return self.fc(torch.flatten(x, 1))


def _folded_sim(model, x, fold: bool = True):
    sim = QuantizationSimModel(model.eval(), "onnxruntime_cpu", dummy_input=x[:1])
    sim.compute_encodings([x], progress=False)
    if fold:
        fold_all_batch_norms_to_scale(sim)
    return sim


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_unfolded"])
@pytest.mark.parametrize("arch", ["deep", "mobilenet_v2"])
def test_emulated_sim_equals_onnxruntime_bit_for_bit(tmp_path, arch, fold):
    """Random networks amplify one-element rounding differences through depth (docs/export.md); emulated, the sim's
    outputs equal onnxruntime's int8 outputs exactly, end to end and at every quantized tensor. With BN unfolded in
    the sim, the emulation folds it into the layer as the QDQ builder does."""
    torch.manual_seed(0)
    if arch == "deep":
        model, x = Deep(), torch.randn(16, 1, 16, 16)
    else:
        model, x = mobilenet_v2(10, in_channels=1, width_mult=0.35, small_input=True), torch.randn(16, 1, 32, 32)
    sim = _folded_sim(model, x, fold)
    paths = sim.export(tmp_path, arch, x[:1])
    e2e = onnxruntime_fidelity(sim, paths.qdq, x, emulate=True)
    per_layer = onnxruntime_fidelity(sim, paths.qdq, x[:4], teacher_forced=True, emulate=True)
    rep = e2e["emulation"]
    assert not rep.skipped, rep.skipped
    n_conv = sum(isinstance(m, nn.Conv2d) for m in sim.model.modules())
    assert len(rep.emulated) >= n_conv + 2  # convs, the Linear, the residual add(s), the pool
    assert e2e["exact"] == 1.0, {k: v for k, v in e2e.items() if k != "tensors"}
    bad = {t: v for t, v in per_layer["tensors"].items() if v["exact"] < 1.0}
    assert per_layer["exact"] == 1.0 and len(per_layer["tensors"]) >= n_conv, bad


def test_long_reductions_take_the_float64_path_and_stay_exact():
    """A 3x3 conv over 512 channels can exceed 2^24 in its partial sums: float32 would round them; the emulation
    switches to float64 there. Its result equals an int64 reference convolution."""
    from quantsim.emulation import plan

    torch.manual_seed(0)
    model = Deep()
    with torch.no_grad():
        model.wide[0].weight.uniform_(0.5, 1.0)  # large positive inputs and weights: long integer sums
        model.long[0].weight.uniform_(0.5, 1.0)
    x = torch.rand(2, 1, 16, 16)
    sim = _folded_sim(model, x)
    site = plan(sim)[0]["long.0"]
    cap = {}
    conv = sim.model.long[0]
    conv.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].clone()))
    sim.model.long[1].register_forward_hook(lambda m, a, out: cap.__setitem__("y", out.clone()))
    with sim.emulate_onnxruntime():
        sim.model(x)
    got = cap["y"]
    q_in = site.inputs[0][0]
    kx = torch.round(cap["x"].double() / q_in.get_scale().double()).long()
    w_q = conv.param_quantizers["weight"]
    with torch.no_grad():
        kw = torch.round(w_q(conv.weight).double() / w_q.get_scale().double().reshape(-1, 1, 1, 1)).long()
    acc = torch.nn.functional.conv2d(kx.double(), kw.double(), padding=1)  # float64 exact for these sizes
    assert float(acc.abs().max()) > 2**24  # this case needs the float64 path
    # int64 reference of the accumulator via unfold + integer matmul
    cols = torch.nn.functional.unfold(kx.double(), 3, padding=1).long()  # (N, C*9, L)
    ref = torch.einsum("ok,nkl->nol", kw.flatten(1), cols).reshape(acc.shape)
    assert torch.equal(acc.long(), ref)
    s_y = site.target.get_scale()
    b_scale = (q_in.get_scale() * w_q.get_scale()).float()
    qb = torch.round(conv.bias.double() / b_scale.double())
    mult = ((q_in.get_scale() * w_q.get_scale()) / s_y).float()
    y = (ref.double() + qb.reshape(1, -1, 1, 1)).float() * mult.reshape(1, -1, 1, 1)
    zp = int(-site.target.get_offset())
    want = y.clamp(site.target.qmin - zp, site.target.qmax - zp).round() * s_y
    assert torch.equal(got, torch.relu(want))


def test_skips_are_reported_and_everything_is_restored(tmp_path):
    torch.manual_seed(0)
    model, x = Deep(), torch.randn(4, 1, 16, 16)
    sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=x[:1])
    sim.compute_encodings([x], progress=False)
    sim.model.fc.param_quantizers["weight"].enabled = False  # a float weight: no integer kernel to emulate
    sim.model.train()
    with torch.no_grad():
        before = sim.model.eval()(x)
    sim.model.train()
    own_forward = [m for m in sim.model.modules() if "forward" in vars(m)]  # the root runs the traced graph
    with sim.emulate_onnxruntime() as rep:
        assert not sim.model.training and not torch.is_grad_enabled()
        assert "weight" in rep.skipped["fc"] and list(rep.skipped) == ["fc"]
        assert "stem.0" in rep.emulated and "wide.0" in rep.emulated  # BN unfolded: folded on the fly
        with pytest.raises(ExportError, match="emulate_onnxruntime"):
            sim.export(tmp_path, "m", x[:1])
        with pytest.raises(RuntimeError, match="nest"):
            with sim.emulate_onnxruntime():
                pass
    assert sim.model.training and torch.is_grad_enabled()
    assert [m for m in sim.model.modules() if "forward" in vars(m)] == own_forward
    assert not any("forward" in vars(q) for _, q in sim.named_quantizers())
    assert not list(tmp_path.iterdir())
    with torch.no_grad():
        assert torch.equal(sim.model.eval()(x), before)
