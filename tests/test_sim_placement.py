"""Capture + placement on a real model, for every preset and AIMET's own files, against tables derived by hand.

The model (tests/nets.py::Net) has conv/BN/relu, a depthwise conv, a functional residual add + relu with a
fanned-out block input, a Conv2d subclass, torch.cat, ConvTranspose, global pooling, flatten, Linear and a
multiply by a constant, inside nested Sequentials and a wrapper module.
"""
from pathlib import Path

import pytest
import torch

from quantsim import QuantizationSimModel
from quantsim.bias import DerivedBiasQuantizer

from nets import Net

AIMET = Path(__file__).parent / "data" / "aimet_configs"

# name -> (inputs quantized, output quantized, weight quantizer)   weight: "pc" per-channel, "pt" per-tensor, None
# Derivation (AIMET semantics):
# * model_input.is_input_quantized: only stem.0 (the op reading the model input) quantizes its input; every other
#   op reads a tensor that is already on a grid, so no input quantizers elsewhere.
# * Conv->BN is fused for quantization: the conv's output quantizer moves to the BN; [Conv, Relu] then matches
#   Conv->BN->Relu, so only the Relu output is quantized (stem, conv1/bn1/relu of each block).
# * the depthwise conv feeds the add alone, no supergroup [Conv, Add]: its output is quantized.
# * [Add, Relu] matches add -> relu_1 (the add's output has one consumer): only relu_1 is quantized.
# * padded (a Conv2d subclass), cat, up (ConvTranspose; its consumer is the pool, no Relu), pool, fc (its consumer
#   is the multiply), mul: outputs quantized. flatten moves data: no op of its own.
# * bias is never quantized; BN parameters of a fused BN are not quantized.
HAND = {
    "stem.0": ((True,), False, "pc"),
    "stem.1": ((False,), False, None),
    "stem.2": ((False,), True, None),
    "blocks.0.conv1": ((False,), False, "pc"),
    "blocks.0.bn1": ((False,), False, None),
    "blocks.0.relu": ((False,), True, None),
    "blocks.0.dw": ((False,), True, "pc"),
    "blocks.0.add": ((False, False), False, None),
    "blocks.0.relu_1": ((False,), True, None),
    "blocks.1.inner.conv1": ((False,), False, "pc"),
    "blocks.1.inner.bn1": ((False,), False, None),
    "blocks.1.inner.relu": ((False,), True, None),
    "blocks.1.inner.dw": ((False,), True, "pc"),
    "blocks.1.inner.add": ((False, False), False, None),
    "blocks.1.inner.relu_1": ((False,), True, None),
    "padded": ((False,), True, "pc"),
    "cat": ((False, False), True, None),
    "up": ((False,), True, "pc"),
    "pool": ((False,), True, None),
    "fc": ((False,), True, "pt"),
    "mul": ((False, False), True, None),
}


def _per_tensor(table):
    return {k: (i, o, "pt" if w else None) for k, (i, o, w) in table.items()}


EXPECTED = {
    "default": HAND,  # AIMET's per-channel default: Gemm (Linear) stays per-tensor
    str(AIMET / "default_config_per_channel.json"): HAND,
    str(AIMET / "default_config.json"): _per_tensor(HAND),
    "per_tensor": _per_tensor(HAND),
    str(AIMET / "htp_quantsim_config_v75.json"): HAND,  # same rules for this model; Gemm per-tensor there too
    "onnxruntime_cpu": {**HAND, "fc": ((False,), True, "pc")},  # ORT runs per-channel Gemm weights
}


def _actual(sim):
    out = {}
    for name, m in sim.quantized_modules():
        w = m.param_quantizers["weight"] if "weight" in m.param_quantizers else None
        kind = None if w is None else ("pc" if w.channel_axis is not None else "pt")
        outs = m.output_quantizers[0] is not None
        out[name] = (tuple(q is not None for q in m.input_quantizers), outs, kind)
        if "bias" in m.param_quantizers and m.param_quantizers["bias"] is not None:
            # no config here quantizes biases; only the int32 bias of integer kernels is simulated (onnxruntime_cpu)
            assert sim.int32_bias and isinstance(m.param_quantizers["bias"], DerivedBiasQuantizer), name
    return out


@pytest.mark.parametrize("config", list(EXPECTED), ids=lambda c: Path(c).name)
def test_placement_on_model_matches_hand_derivation(config):
    torch.manual_seed(0)
    sim = QuantizationSimModel(Net().eval(), config=config)
    actual = _actual(sim)
    expected = EXPECTED[config]
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name] == expected[name], name
    if config == "onnxruntime_cpu":  # layers with a bias, a quantized input and a quantized weight: int32 bias
        assert {n for n, m in sim.quantized_modules() if isinstance(m.param_quantizers["bias"] if "bias" in
                m.param_quantizers else None, DerivedBiasQuantizer)} == {"stem.0", "blocks.0.dw", "blocks.1.inner.dw",
                                                                         "padded", "up", "fc"}


def test_symmetry_and_bitwidths_follow_config():
    torch.manual_seed(0)
    sim = QuantizationSimModel(Net().eval(), default_param_bw=4, default_output_bw=16)
    for name, q in sim.named_quantizers():
        if "param_quantizers" in name:
            assert q.symmetric and q.bitwidth == 4 and (q.qmin, q.qmax) == (-8, 7), name
        else:
            assert not q.symmetric and q.bitwidth == 16 and (q.qmin, q.qmax) == (0, 65535), name
