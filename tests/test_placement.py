"""Placement on hand-made OpGraphs (no torch); every expected placement is written out by hand from the rules."""
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantsim.config import ConfigError, NodePlacement, QuantSpec, find_supergroups, load_config, place
from quantsim.ir import MODEL_INPUT, OpGraph, OpNode

AIMET = Path(__file__).parent / "data" / "aimet_configs"
X0, X1 = f"{MODEL_INPUT}0", f"{MODEL_INPUT}1"

A8 = QuantSpec(8, symmetric=False)                     # asymmetric activation
S8 = QuantSpec(8, symmetric=True)                      # symmetric activation
W8 = QuantSpec(8, symmetric=True)                      # symmetric per-tensor weight
W8PC = QuantSpec(8, symmetric=True, per_channel=True)  # symmetric per-channel weight


def N(name, op, inputs=(), params=(), out=False):
    return OpNode(name, op, tuple(inputs), tuple(params), out)


def P(inputs, output, **params):
    return NodePlacement(tuple(inputs), (output,), params)


def G(*nodes):
    return OpGraph(list(nodes))


@dataclass(frozen=True)
class DwNode(OpNode):
    """An OpNode flagged depthwise (graph capture knows groups == in_channels)."""

    depthwise: bool = True


def cfg(name):
    return load_config(AIMET / name if name.endswith(".json") else name)


def variant(base, **op_type):
    """A preset with extra op_type entries (JSON booleans)."""
    d = load_config(base).to_dict()
    d["op_type"].update(op_type)
    return d


# ----------------------------------------------------------------------------- conv -> bn -> relu

CONV_BN_RELU = G(N("conv", "Conv", [X0], ["weight", "bias"]),
                 N("bn", "BatchNormalization", ["conv"], ["weight", "bias"]),
                 N("relu", "Relu", ["bn"], out=True))


def conv_bn_relu_expected(weight):
    return {
        # input: model input quantized; output: moved to BN by the fold, then dropped by [Conv, Relu]
        "conv": P([A8], None, weight=weight, bias=None),
        # folded into conv: no input, no params, and its (taken-over) output is inside the supergroup
        "bn": P([None], None, weight=None, bias=None),
        "relu": P([None], A8),
    }


@pytest.mark.parametrize("config, weight", [
    ("default", W8PC), ("onnxruntime_cpu", W8PC), ("per_tensor", W8),
    ("default_config.json", W8),               # AIMET: per_channel False, [Conv, Relu]
    ("default_config_per_channel.json", W8PC),
    ("htp_quantsim_config_v75.json", W8PC),    # [Conv, Relu] and [Conv, BatchNormalization, Relu] both listed
    ("htp_quantsim_config_v69.json", W8PC),
])
def test_conv_bn_relu(config, weight):
    assert place(CONV_BN_RELU, cfg(config)) == conv_bn_relu_expected(weight)


def test_bn_fanout_blocks_supergroup():
    g = G(N("conv", "Conv", [X0], ["weight"]), N("bn", "BatchNormalization", ["conv"], ["weight", "bias"]),
          N("relu", "Relu", ["bn"], out=True), N("sig", "Sigmoid", ["bn"], out=True))
    assert place(g, cfg("default")) == {
        "conv": P([A8], None, weight=W8PC),                       # fold still applies (conv feeds only bn)
        "bn": P([None], A8, weight=None, bias=None),             # bn output feeds two ops: no [Conv, Relu]
        "relu": P([None], A8),
        "sig": P([None], A8),
    }


def test_fanout_and_model_output_block_supergroup():
    g = G(N("conv", "Conv", [X0], ["weight"]), N("relu", "Relu", ["conv"], out=True),
          N("sig", "Sigmoid", ["conv"], out=True),
          N("conv2", "Conv", [X1], ["weight"], out=True), N("relu2", "Relu", ["conv2"], out=True))
    assert place(g, cfg("default")) == {
        "conv": P([A8], A8, weight=W8PC),    # two consumers: the tensor must exist quantized
        "relu": P([None], A8),
        "sig": P([None], A8),
        "conv2": P([A8], A8, weight=W8PC),   # a model output is materialised: not fused into relu2
        "relu2": P([None], A8),
    }


# ----------------------------------------------------------------------------- depthwise, transposed, linear


def test_depthwise_conv():
    dw = G(DwNode("dw", "Conv", (X0,), ("weight", "bias")), N("clip", "Clip", ["dw"], out=True))
    # AIMET never starts a supergroup at a depthwise conv: both outputs quantized; weight still per channel
    assert place(dw, cfg("default")) == {"dw": P([A8], A8, weight=W8PC, bias=None), "clip": P([None], A8)}
    plain = G(N("dw", "Conv", [X0], ["weight", "bias"]), N("clip", "Clip", ["dw"], out=True))
    assert place(plain, cfg("default")) == {"dw": P([A8], None, weight=W8PC, bias=None), "clip": P([None], A8)}


CONVT_RELU = G(N("up", "ConvTranspose", [X0], ["weight", "bias"]), N("relu", "Relu", ["up"], out=True))


@pytest.mark.parametrize("config, up", [
    ("default", P([A8], None, weight=W8PC, bias=None)),
    ("per_tensor", P([A8], None, weight=W8, bias=None)),
    ("onnxruntime_cpu", P([A8], None, weight=W8PC, bias=None)),
    ("default_config.json", P([A8], A8, weight=W8, bias=None)),   # this AIMET file has no [ConvTranspose, Relu]
    ("htp_quantsim_config_v75.json", P([A8], None, weight=W8PC, bias=None)),
])
def test_conv_transpose(config, up):
    assert place(CONVT_RELU, cfg(config)) == {"up": up, "relu": P([None], A8)}


LINEAR = G(N("fc1", "Gemm", [X0], ["weight", "bias"]), N("relu", "Relu", ["fc1"]),
           N("fc2", "Gemm", ["relu"], ["weight", "bias"], out=True))


@pytest.mark.parametrize("config, w", [
    ("default", W8),            # AIMET's per-channel config keeps Gemm per tensor
    ("per_tensor", W8),
    ("onnxruntime_cpu", W8PC),  # ORT: per-channel Linear weights
    ("htp_quantsim_config_v75.json", W8),
])
def test_linear(config, w):
    assert place(LINEAR, cfg(config)) == {
        "fc1": P([A8], None, weight=w, bias=None),   # [Gemm, Relu]
        "relu": P([None], A8),
        "fc2": P([None], A8, weight=w, bias=None),
    }


# ----------------------------------------------------------------------------- residual, concat, matmul

RESIDUAL = G(N("conv1", "Conv", [X0], ["weight"]), N("relu1", "Relu", ["conv1"]),
             N("conv2", "Conv", ["relu1"], ["weight"]), N("add", "Add", ["conv2", "relu1"]),
             N("relu2", "Relu", ["add"], out=True))


@pytest.mark.parametrize("config", ["default", "onnxruntime_cpu", "default_config_per_channel.json",
                                    "htp_quantsim_config_v75.json"])
def test_residual_add(config):
    assert place(RESIDUAL, cfg(config)) == {
        "conv1": P([A8], None, weight=W8PC),   # [Conv, Relu]
        "relu1": P([None], A8),                # fans out to conv2 and add (allowed at a chain's end)
        "conv2": P([None], A8, weight=W8PC),   # no [Conv, Add] supergroup
        "add": P([None, None], None),          # [Add, Relu]
        "relu2": P([None], A8),
    }


def test_concat():
    g = G(N("c1", "Conv", [X0], ["weight"]), N("c2", "Conv", [X0], ["weight"]), N("cat", "Concat", ["c1", "c2"]),
          N("c3", "Conv", ["cat"], ["weight"], out=True))
    assert place(g, cfg("default")) == {
        "c1": P([A8], A8, weight=W8PC),    # each consumer of a model input gets its own input quantizer
        "c2": P([A8], A8, weight=W8PC),
        "cat": P([None, None], A8),        # Concat requantizes (not grid preserving)
        "c3": P([None], A8, weight=W8PC),
    }


ATTENTION = G(N("q", "Gemm", [X0], ["weight", "bias"]), N("k", "Gemm", [X0], ["weight", "bias"]),
              N("qk", "MatMul", ["q", "k"]), N("sm", "Softmax", ["qk"]), N("av", "MatMul", ["sm", X1]),
              N("proj", "MatMul", ["av"], ["weight"], out=True))


@pytest.mark.parametrize("config, w, sm", [
    ("default", W8, A8),
    ("onnxruntime_cpu", W8PC, QuantSpec(8, False, encoding_min_max=(0.0, 255 / 256))),  # ORT QLinearSoftmax
    ("htp_quantsim_config_v75.json", W8, QuantSpec(8, False, encoding_min_max=(0.0, 1.0))),
])
def test_matmul(config, w, sm):
    assert place(ATTENTION, cfg(config)) == {
        "q": P([A8], A8, weight=w, bias=None),
        "k": P([A8], A8, weight=w, bias=None),
        "qk": P([None, None], A8),        # activation x activation: no params
        "sm": P([None], sm),
        "av": P([None, A8], A8),          # second operand is a model input
        "proj": P([None], A8, weight=w),  # MatMul with a weight (per channel only where the config allows)
    }


# ----------------------------------------------------------------------------- model inputs/outputs, unknown ops


GRID = G(N("pool", "MaxPool", [X0]), N("conv", "Conv", ["pool"], ["weight"]),
         N("reshape", "Reshape", ["conv"], out=True))


def test_model_input_and_grid_preserving_ops():
    assert place(GRID, cfg("default")) == {
        "pool": P([A8], None),               # model input quantized at its consumer; MaxPool keeps that grid
        "conv": P([None], A8, weight=W8PC),
        "reshape": P([None], None),          # grid preserving: the model output carries conv's grid
    }
    with_output = load_config("default").to_dict()
    with_output["model_output"] = {"is_output_quantized": "True"}
    assert place(GRID, with_output)["reshape"] == P([None], A8)
    named = variant("default", MaxPool={"is_output_quantized": True})  # naming the type turns the rule off
    assert place(GRID, named)["pool"] == P([A8], A8)
    no_inputs = load_config("default").to_dict()
    no_inputs["model_input"] = {}
    assert place(GRID, no_inputs)["pool"] == P([None], None)


def test_unknown_ops_get_nothing():
    g = G(N("conv", "Conv", [X0], ["weight"]), N("odd", "", ["conv"], ["weight"]),
          N("relu", "Relu", ["odd"], out=True), N("odd2", "", [X1, None], out=True))
    assert place(g, cfg("default")) == {
        "conv": P([A8], A8, weight=W8PC),   # its only consumer is unknown: no supergroup
        "odd": P([None], None, weight=None),
        "relu": P([None], A8),
        "odd2": P([None, None], None),
    }


def test_embedding_indices_are_not_quantized():
    g = G(N("emb", "Gather", [X0], ["weight"]), N("fc", "Gemm", ["emb"], ["weight"], out=True))
    assert place(g, cfg("default")) == {
        "emb": P([None], None, weight=W8),  # indices input; output keeps the weight's grid; Gather weight per tensor
        "fc": P([None], A8, weight=W8),
    }


# ----------------------------------------------------------------------------- op_type rules


def test_input_quantizers_avoid_double_quantization():
    config = variant("default", Conv={"is_input_quantized": True})
    g = G(N("relu0", "Relu", [X0]), N("conv_a", "Conv", ["relu0"], ["weight"]),
          N("odd", "", [X0]), N("conv_b", "Conv", ["odd"], ["weight"]),
          N("pool", "MaxPool", ["relu0"]), N("conv_c", "Conv", ["pool"], ["weight"]),
          N("conv_d", "Conv", [X0], ["weight"]), N("cat", "Concat", ["conv_a", "conv_b", "conv_c", "conv_d"], out=True))
    assert place(g, config) == {
        "relu0": P([A8], A8),
        "conv_a": P([None], A8, weight=W8PC),   # producer output already quantized
        "odd": P([None], None),
        "conv_b": P([A8], A8, weight=W8PC),     # producer (unknown op) left it float
        "pool": P([None], None),
        "conv_c": P([None], A8, weight=W8PC),   # MaxPool output still on relu0's grid
        "conv_d": P([A8], A8, weight=W8PC),
        "cat": P([None] * 4, A8),
    }


def test_op_level_symmetric_reaches_neighbour_tensors():
    g = G(N("conv", "Conv", [X0], ["weight"]), N("tanh", "Tanh", ["conv"]), N("fc", "Gemm", ["tanh"], ["weight"]),
          N("out", "Sigmoid", ["fc"], out=True))
    assert place(g, variant("default", Tanh={"is_symmetric": True})) == {
        "conv": P([A8], S8, weight=W8PC),   # tanh's input tensor is conv's output
        "tanh": P([None], S8),
        "fc": P([None], A8, weight=W8),
        "out": P([None], A8),
    }
    with pytest.raises(ConfigError, match=r"op_type\.Gemm\.is_symmetric: conflicts with op_type\.Tanh"):
        place(g, variant("default", Tanh={"is_symmetric": True}, Gemm={"is_symmetric": False}))


def test_strict_and_unsigned_only_on_symmetric_specs():
    d = load_config("default").to_dict()
    d["defaults"]["strict_symmetric"] = "True"
    d["defaults"]["unsigned_symmetric"] = "True"
    g = G(N("conv", "Conv", [X0], ["weight"]), N("sig", "Sigmoid", ["conv"], out=True))
    strict_w = QuantSpec(8, True, per_channel=True, strict_symmetric=True, unsigned_symmetric=True)
    assert place(g, d) == {"conv": P([A8], A8, weight=strict_w), "sig": P([None], A8)}


def test_bitwidths_come_from_arguments():
    p = place(CONV_BN_RELU, "default", default_param_bw=4, default_output_bw=16)
    assert p["conv"].params["weight"] == QuantSpec(4, True, per_channel=True)
    assert p["conv"].inputs == (QuantSpec(16, False),) and p["relu"].outputs == (QuantSpec(16, False),)
    with pytest.raises(ValueError):
        place(CONV_BN_RELU, "default", default_output_bw=0)


# ----------------------------------------------------------------------------- an HTP config end to end

HTP = G(N("conv", "Conv", [X0], ["weight", "bias"]), N("bn", "BatchNormalization", ["conv"], ["weight", "bias"]),
        N("hsw", "HardSwish", ["bn"]), N("gn", "GroupNormalization", ["hsw"], ["weight", "bias"]),
        N("tr", "Transpose", ["gn"]), N("ln", "LayerNormalization", ["tr"], ["weight", "bias"]),
        N("sig", "Sigmoid", ["ln"]), N("emb", "Gather", [X1], ["weight"]), N("add", "Add", ["sig", "emb"], out=True))


def test_htp_v75():
    assert place(HTP, cfg("htp_quantsim_config_v75.json")) == {
        "conv": P([A8], None, weight=W8PC, bias=None),        # [Conv, HardSwish] over the folded conv+bn
        "bn": P([None], None, weight=None, bias=None),
        "hsw": P([None], A8),
        "gn": P([None], A8, weight=W8, bias=W8),              # per_channel False; op-level bias is_quantized True
        "tr": P([None], None),                                # Transpose: is_output_quantized False
        "ln": P([None], A8, weight=QuantSpec(8, False), bias=None),  # op-level weight is_symmetric False
        "sig": P([None], QuantSpec(8, False, encoding_min_max=(0.0, 1.0))),
        "emb": P([None], None, weight=W8),                    # Gather: output off, per_channel False
        "add": P([None, None], A8),
    }


@pytest.mark.parametrize("config", ["default", "default_config_per_channel.json"])
def test_same_graph_default(config):
    assert place(HTP, cfg(config)) == {
        "conv": P([A8], None, weight=W8PC, bias=None),
        "bn": P([None], A8, weight=None, bias=None),          # no [Conv, HardSwish]: the folded output stays
        "hsw": P([None], A8),
        "gn": P([None], A8, weight=W8, bias=None),            # per channel is only for conv/linear weights
        "tr": P([None], None),                                # grid preserving
        "ln": P([None], A8, weight=W8, bias=None),
        "sig": P([None], A8),
        "emb": P([None], None, weight=W8),
        "add": P([None, None], A8),
    }


# ----------------------------------------------------------------------------- supported_kernels


def test_supported_kernels_only_when_enforced():
    config = {
        "defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True", "is_symmetric": "True"},
                     "supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "int"},
                                            "param": {"bitwidth": 8, "dtype": "int"}}]},
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {"LayerNormalization": {"supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "float"},
                                                                  "param": {"bitwidth": 16, "dtype": "float"}}]},
                    "Softmax": {"supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "float"}}]}},
        "supergroups": [], "model_input": {"is_input_quantized": "True"}, "model_output": {}}
    g = G(N("fc", "Gemm", [X0], ["weight", "bias"]), N("ln", "LayerNormalization", ["fc"], ["weight", "bias"]),
          N("sm", "Softmax", ["ln"]), N("fc2", "Gemm", ["sm"], ["weight"], out=True))
    assert place(g, config) == {  # AIMET's default: the lists are recorded, bit-widths come from the arguments
        "fc": P([A8], A8, weight=W8, bias=None), "ln": P([None], A8, weight=W8, bias=None),
        "sm": P([None], A8), "fc2": P([None], A8, weight=W8)}
    A16, F16 = QuantSpec(16, False), QuantSpec(16, False, dtype="float")
    assert place(g, config, enforce_supported_kernels=True) == {
        "fc": P([A16], A16, weight=W8, bias=None),    # defaults' first kernel: a16 / w8
        # LayerNorm has no a16/w8 kernel: params fp16; output fp16 as its consumer (Softmax) runs fp16 too
        "ln": P([None], F16, weight=QuantSpec(16, True, dtype="float"), bias=None),
        "sm": P([None], A16),                         # its consumer (Gemm) is int: output requantized to int16
        "fc2": P([None], A16, weight=W8),
    }


# ----------------------------------------------------------------------------- the matcher itself


def test_supergroup_matcher_on_chains():
    g = G(N("c", "Conv", [X0], ["weight"]), N("b", "BatchNormalization", ["c"]), N("r", "Relu", ["b"]),
          N("a", "Add", ["r", X1]), N("r2", "Relu", ["a"], out=True))
    # [Conv, BN, Relu] never matches a folded BN (AIMET ignores it); [Conv, Relu] does, through it
    assert find_supergroups(g, [("Conv", "BatchNormalization", "Relu")]) == []
    assert find_supergroups(g, [("Conv", "Relu"), ("Add", "Relu")]) == [("c", "r"), ("a", "r2")]
    assert find_supergroups(g, [("Conv", "Relu", "Add", "Relu")]) == [("c", "r", "a", "r2")]
    unfolded = G(N("a", "Add", [X0, X1]), N("b", "BatchNormalization", ["a"]), N("r", "Relu", ["b"], out=True))
    assert find_supergroups(unfolded, [("Add", "BatchNormalization", "Relu")]) == [("a", "b", "r")]


def test_place_is_pure_and_deterministic():
    before = list(RESIDUAL)
    config = load_config("default")
    assert place(RESIDUAL, config) == place(RESIDUAL, config) == place(RESIDUAL, "default")
    assert list(RESIDUAL) == before and load_config("default") == config


def test_depthwise_supergroup_rule_is_lifted_for_onnxruntime_target():
    """AIMET: a depthwise conv never starts [Conv, Clip]; the onnxruntime_cpu preset (hw_version ORT_CPU) fuses it."""
    g = OpGraph([
        OpNode("dw", "Conv", (f"{MODEL_INPUT}0",), ("weight",), depthwise=True),
        OpNode("bn", "BatchNormalization", ("dw",), ("weight", "bias")),
        OpNode("relu6", "Clip", ("bn",), (), is_model_output=True),
    ])
    aimet = place(g, load_config("default"))  # AIMET rule: only Conv->BN fused, so BN and Clip outputs both quantized
    assert aimet["bn"].outputs[0] is not None and aimet["relu6"].outputs[0] is not None
    ort = place(g, load_config("onnxruntime_cpu"))  # Conv->BN->Clip fused: one quantizer at the end
    assert ort["dw"].outputs[0] is None and ort["bn"].outputs[0] is None and ort["relu6"].outputs[0] is not None
