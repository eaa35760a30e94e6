"""QuantizationSimModel end to end: capture, quantizer insertion, calibration, numerics, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsim import QuantizationSimModel, QuantScheme
from quantsim import nn as qnn

from nets import Net


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def test_attribute_paths_and_quantizer_slots(net):
    sim = QuantizationSimModel(net)
    conv = sim.model.blocks[0].conv1
    assert isinstance(conv, nn.Conv2d) and hasattr(conv, "param_quantizers")
    assert conv.param_quantizers["weight"].channel_axis == 0
    assert conv.param_quantizers["weight"].symmetric
    assert sim.model.blocks[1].inner.dw.param_quantizers["weight"].scale.shape == (8,)
    assert sim.model.up.param_quantizers["weight"].channel_axis == 1
    # AIMET's per-channel default config keeps Gemm (Linear) weights per-tensor; onnxruntime_cpu is per-channel
    assert sim.model.fc.param_quantizers["weight"].channel_axis is None
    ort = QuantizationSimModel(net, config="onnxruntime_cpu")
    assert ort.model.fc.param_quantizers["weight"].channel_axis == 0
    # the original model is untouched (in_place=False)
    assert not hasattr(net.blocks[0].conv1, "param_quantizers")
    names = dict(sim.named_quantizers())
    assert "blocks.0.conv1.param_quantizers['weight']" in names
    for q in names.values():
        assert q.bitwidth == 8


def test_functional_ops_become_quantized_modules(net):
    sim = QuantizationSimModel(net)
    mods = dict(sim.model.named_modules())
    adds = [n for n, m in mods.items() if isinstance(m, qnn.Add)]
    cats = [n for n, m in mods.items() if isinstance(m, qnn.Concat)]
    muls = [n for n, m in mods.items() if isinstance(m, qnn.Mul)]
    assert sorted(adds) == ["blocks.0.add", "blocks.1.inner.add"]  # placed in the scope where the op was called
    assert cats == ["cat"] and muls == ["mul"]
    assert mods["cat"].output_quantizers[0] is not None
    # the functional relu after the add ends the [Add, Relu] supergroup: the add's output is not quantized
    assert mods["blocks.0.add"].output_quantizers[0] is None
    assert mods["blocks.0.relu_1"].output_quantizers[0] is not None


def test_conv_bn_relu_fused_for_quantization(net):
    sim = QuantizationSimModel(net)
    b = sim.model.blocks[0]
    assert b.conv1.output_quantizers[0] is None  # moved after BN ...
    assert b.bn1.output_quantizers[0] is None  # ... and after the relu that ends the supergroup
    assert b.relu.output_quantizers[0] is not None
    assert sim.model.stem[0].output_quantizers[0] is None and sim.model.stem[2].output_quantizers[0] is not None
    assert sim.model.stem[0].input_quantizers[0] is not None  # model input quantized


def test_disabled_quantizers_reproduce_float_model(net):
    sim = QuantizationSimModel(net)
    for _, q in sim.named_quantizers():
        q.enabled = False
    x = _data(1)[0]
    assert torch.equal(sim.model(x), net(x))  # same forward, subclass forward kept (reflect padding)


def test_subclass_forward_is_kept(net):
    sim = QuantizationSimModel(net)
    sim.compute_encodings(_data(2))
    x = torch.randn(2, 8, 6, 6)
    pq = sim.model.padded.param_quantizers["weight"]
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), pq(net.padded.weight), net.padded.bias)
    for q in sim.model.padded.output_quantizers:
        if q is not None:
            ref = q(ref)
    out = sim.model.padded(x)
    assert out.shape == (2, 8, 6, 6) and torch.equal(out, ref)


def test_linear_numerics_match_torch_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    sim = QuantizationSimModel(model, config="per_tensor")
    data = [torch.randn(16, 6) for _ in range(3)]
    sim.compute_encodings(data)
    fc = sim.model[0]
    x = torch.randn(5, 6)
    # independent reference from torch's kernels and min-max encodings computed by hand in the test
    allx = torch.cat(data)
    lo, hi = min(allx.min().item(), 0.0), max(allx.max().item(), 0.0)
    s_in = (hi - lo) / 255
    o_in = round(lo / s_in)
    assert fc.input_quantizers[0].get_scale().item() == pytest.approx(s_in, rel=1e-6)
    assert fc.input_quantizers[0].get_offset().item() == o_in
    w = model[0].weight
    s_w = max(w.max().item() / 127, -w.min().item() / 128)
    assert fc.param_quantizers["weight"].get_scale().item() == pytest.approx(s_w, rel=1e-6)
    xq = torch.fake_quantize_per_tensor_affine(x, fc.input_quantizers[0].get_scale().item(), -o_in, 0, 255)
    wq = torch.fake_quantize_per_tensor_affine(w, fc.param_quantizers["weight"].get_scale().item(), 0, -128, 127)
    y = F.linear(xq, wq, model[0].bias)
    oq = fc.output_quantizers[0]
    ref = torch.fake_quantize_per_tensor_affine(y, oq.get_scale().item(), int(-oq.get_offset().item()), 0, 255)
    assert torch.equal(sim.model(x), ref)


@pytest.mark.parametrize("scheme", ["min_max", "tf_enhanced", "percentile", "mse", QuantScheme.post_training_tf])
def test_compute_encodings_all_schemes(net, scheme):
    sim = QuantizationSimModel(net, quant_scheme=scheme)
    sim.compute_encodings(_data(2))
    for name, q in sim.named_quantizers():
        assert q.is_initialized(), name
        assert (q.get_min() <= 0).all() and (q.get_max() >= 0).all()
    x = _data(1, seed=5)[0]
    y, ref = sim.model(x), net(x)
    assert y.shape == ref.shape
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.1, f"{scheme}: W8A8 output too far from float ({rel:.3f})"


def test_callback_and_args_and_modes_restored(net):
    sim = QuantizationSimModel(net, config_file="default")  # AIMET's keyword
    sim.model.train()
    calls = []

    def callback(model, args):
        calls.append(args)
        assert not model.training and not torch.is_grad_enabled()
        for x in _data(args):
            model(x)

    sim.compute_encodings(callback, 2)
    assert calls == [2] and sim.model.training and sim.model.stem[1].training


def test_loader_with_tuples_and_num_batches(net):
    sim = QuantizationSimModel(net)
    seen = []
    data = [(x, torch.zeros(8)) for x in _data(5)]
    orig = sim.model.stem[0].input_quantizers[0]._observe

    def spy(x):
        seen.append(1)
        orig(x)

    sim.model.stem[0].input_quantizers[0]._observe = spy
    sim.compute_encodings(data, num_batches=3)
    assert len(seen) == 3


def test_errors(net):
    sim = QuantizationSimModel(net)
    with pytest.raises(ValueError, match="no batches"):
        sim.compute_encodings([])
    bad = _data(1)[0]
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"stem\.0\.input_quantizers\[0\]"):
        sim.compute_encodings([bad])
    with pytest.raises(ValueError, match="quant_scheme"):
        QuantizationSimModel(net, quant_scheme="tf_enhancd")
    with pytest.raises(TypeError):
        QuantizationSimModel("not a model")


def test_branch_without_data_errors_at_forward():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x, head: int = 0):
            return self.a(x) if head == 0 else self.b(x)

    torch.manual_seed(0)
    m = TwoHeads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = QuantizationSimModel(m)  # `head` drives Python control flow: fx specialises or falls back
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sim.compute_encodings(lambda model: model(torch.randn(3, 4)))
    with pytest.raises(RuntimeError, match=r"^b\.|\bb\.(input|output)_quantizers"):
        sim.model(torch.randn(3, 4), 1)


def test_untraceable_submodule_falls_back_with_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return self.conv(x)
            return -self.conv(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 3, 1)
            self.dyn = Dynamic()

        def forward(self, x):
            return self.dyn(self.head(x))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"'dyn'"):
        sim = QuantizationSimModel(Outer())
    assert sim.model.dyn.conv.param_quantizers["weight"] is not None
    assert sim.model.head.param_quantizers["weight"] is not None
    sim.compute_encodings([torch.randn(2, 3, 4, 4)])
    assert sim.model(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    assert "dyn" in str(sim)


def test_reused_module_with_parameters_is_a_clear_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))

        def forward(self, x):
            return self.block(self.block(x))

    with pytest.raises(ValueError, match=r"module 'block\.0' \(Conv2d\) is called 2 times.*deepcopy"):
        QuantizationSimModel(Twice())


def test_reused_stateless_modules_get_one_quantizer_per_call():
    class Scale(nn.Module):  # not a known layer, no state
        def forward(self, x):
            return x * 0.5

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.act, self.scale = nn.ReLU(), Scale()

        def forward(self, x):
            return self.scale(self.act(self.b(self.scale(self.act(self.a(x))))))

    torch.manual_seed(0)
    m = M().eval()
    sim = QuantizationSimModel(m)
    x = torch.randn(4, 3, 5, 5)
    sim.compute_encodings([x])
    relus = [n for n, mod in sim.model.named_modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 2  # the second call got its own copy
    # with quantizers disabled the sim is the float model, so the copies compute what the shared module did
    for _, q in sim.named_quantizers():
        q.enabled = False
    torch.testing.assert_close(sim.model(x), m(x), rtol=0, atol=0)


def test_summary_lists_layers_and_float_ops(net):
    sim = QuantizationSimModel(net)
    text = str(sim)
    for name in ["stem.0", "blocks.0.conv1", "blocks.1.inner.dw", "up", "fc", "cat", "blocks.0.add"]:
        assert name in text
    assert "Conv" in text and "Gemm" in text


def test_standalone_batchnorm_is_simulated():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    model = nn.Sequential(bn, nn.Tanh())
    sim = QuantizationSimModel(model, config="per_tensor")
    data = [torch.randn(32, 4) for _ in range(2)]
    sim.compute_encodings(data)
    q_bn = sim.model[0]
    x = torch.randn(8, 4)
    xq = q_bn.input_quantizers[0](x) if q_bn.input_quantizers[0] is not None else x
    y = (xq - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * q_bn.param_quantizers["weight"](bn.weight) \
        if q_bn.param_quantizers["weight"] is not None else (xq - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
    y = y + bn.bias
    if q_bn.output_quantizers[0] is not None:
        y = q_bn.output_quantizers[0](y)
    assert torch.allclose(sim.model[0](x), y, atol=1e-5)
    assert q_bn.output_quantizers[0] is not None  # standalone BN keeps its own output quantizer
