"""export.qdq + export.runner: QDQ layout, onnxruntime integer kernels, and numerics against a numpy reference.

The reference is float64 numpy of the integer arithmetic (quantize input, integer accumulate, rescale, requantize);
onnxruntime's QDQ output must be within one LSB of the output encoding on >= 99.9% of the elements. Encodings are
computed by hand here (min/max -> scale/offset), not by the code under test.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from export import (
    Encodings,
    EncodingsError,
    QDQError,
    TensorEncoding,
    build_qdq,
    build_qdq_file,
    integer_kernel_report,
    run,
    write_encodings,
)
from export.runner import make_session

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------------------- encodings
def asym(name, lo, hi, bw=8):
    """AIMET asymmetric encoding of [lo, hi] (widened to include 0): scale=(hi-lo)/(2^b-1), offset=round(lo/scale)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (2**bw - 1))
    return TensorEncoding(name, bw, False, scale, int(np.round(lo / scale)), 0, 2**bw - 1)


def sym_act(name, absmax, bw=8):
    scale = np.float32(absmax / (2 ** (bw - 1) - 1))
    return TensorEncoding(name, bw, True, scale, 0, -(2 ** (bw - 1)), 2 ** (bw - 1) - 1)


def wsym(name, w, axis=0, bw=8):
    """Per-channel symmetric weight encoding: scale = absmax / (2^(b-1)-1) per output channel."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=red) / (2 ** (bw - 1) - 1)).astype(np.float32)
    return TensorEncoding(name, bw, True, scale, np.zeros(scale.shape, np.int64), -(2 ** (bw - 1)),
                          2 ** (bw - 1) - 1, axis)


# ------------------------------------------------------------------------------------------------------------ graphs
def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def rand(*shape, s=1.0):
    return (RNG.standard_normal(shape) * s).astype(np.float32)


# --------------------------------------------------------------------------------------------- numpy integer reference
def q_act(x, te):
    """onnx QuantizeLinear on the encoding's grid: round-half-even(x / scale) - offset, clamped (float64 math)."""
    return np.clip(np.rint(x.astype(np.float64) / np.float64(te.scale)) - int(te.offset), te.qmin, te.qmax)


def real(q, te):
    return (q + int(te.offset)) * np.float64(te.scale)


def q_weight(w, te):
    """Weight integers on the grid, computed the way the simulation does (float32 reciprocal multiply)."""
    shape = [1] * w.ndim
    shape[te.channel_axis] = -1
    inv = (np.float32(1) / te.scale).astype(np.float32).reshape(shape)
    return np.clip(np.rint((w * inv).astype(np.float32)), te.qmin, te.qmax).astype(np.int64)


def requant(acc_real, te_out):
    """Real value -> grid of the output encoding -> real (what a QLinear kernel + DequantizeLinear returns)."""
    return real(q_act(acc_real, te_out), te_out)


def conv_acc(qx, te_x, qw, te_w, bias, pad):
    """Integer conv: sum (q_x + offset_x) * q_w, + int32 bias, -> real with s_x * s_w[c] (float64)."""
    x = (qx + int(te_x.offset)).astype(np.int64)
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = qw.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))
    acc = np.einsum("nchwij,ocij->nohw", win, qw, dtype=np.int64)
    bscale = (np.float32(te_x.scale) * te_w.scale).astype(np.float32)
    if bias is not None:
        acc = acc + np.rint(bias.astype(np.float64) / bscale.astype(np.float64)).astype(np.int64)[None, :, None, None]
    return acc * bscale.astype(np.float64)[None, :, None, None]


def assert_within_one_lsb(out, ref, te_out, frac=0.999):
    lsb = float(te_out.scale)
    err = np.abs(out.astype(np.float64) - ref)
    ok = np.mean(err <= lsb * (1 + 1e-5))
    assert ok >= frac, f"only {ok:.5f} of elements within 1 LSB ({lsb}); max err {err.max()} ({err.max() / lsb} LSB)"


def all_integer(report):
    assert report["total"] > 0 and report["integer"] == report["total"], report["nodes"]


def nodes_of(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def dq_feeding(model, node_name, slot):
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[slot])


# ----------------------------------------------------------------------------------------------------------- cases
def conv_relu_case():
    w, b = rand(8, 3, 3, 3, s=0.3), rand(8, s=0.2)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    m = make_model(nodes, [vi("x", [2, 3, 12, 12])], [vi("y", [2, 8, 12, 12])], {"w": w, "b": b})
    enc = Encodings()
    enc.add_activation(asym("x", -2.5, 2.7))
    enc.add_activation(asym("y", 0.0, 3.5))  # Relu output: offset 0 -> onnxruntime folds the Relu into the Q
    enc.add_param(wsym("w", w, 0))
    return m, enc, {"w": w, "b": b}


def test_conv_relu_integer_and_numerics():
    m, enc, p = conv_relu_case()
    q = build_qdq(m, enc)
    assert [n.op_type for n in m.graph.node] == ["Conv", "Relu"], "the input model must not be modified"
    report = integer_kernel_report(q)
    all_integer(report)
    assert report["nodes"][0]["kernel"] == "QLinearConv" and report["nodes"][0]["name"] == "conv"
    x = rand(2, 3, 12, 12, s=1.2)
    out = run(q, x)[0]
    tx, ty, tw = enc.get("x"), enc.get("y"), enc.get("w")
    ref = requant(conv_acc(q_act(x, tx), tx, q_weight(p["w"], tw), tw, p["b"], 1), ty)
    assert_within_one_lsb(out, ref, ty)
    assert out.shape == (2, 8, 12, 12) and q.graph.output[0].name == "y"


def test_weights_and_bias_exact():
    m, enc, p = conv_relu_case()
    q = build_qdq(m, enc)
    tw, tx = enc.get("w"), enc.get("x")
    wdq = dq_feeding(q, "conv", 1)
    wq, ws, wz = (init(q, n) for n in wdq.input)
    assert wq.dtype == np.int8 and wz.dtype == np.int8 and not wz.any()
    np.testing.assert_array_equal(wq, q_weight(p["w"], tw))
    assert ws.dtype == np.float32 and np.array_equal(ws, tw.scale)
    assert next(a.i for a in wdq.attribute if a.name == "axis") == 0
    bdq = dq_feeding(q, "conv", 2)
    bq, bs, bz = (init(q, n) for n in bdq.input)
    assert bq.dtype == np.int32 and bz.dtype == np.int32 and not bz.any()
    expected_scale = np.float32(tx.scale) * tw.scale  # float32 product
    assert expected_scale.dtype == np.float32
    assert np.array_equal(bs.view(np.uint32), expected_scale.view(np.uint32))
    np.testing.assert_array_equal(bq, np.rint(p["b"].astype(np.float64) / bs.astype(np.float64)))
    # Activation Q: uint8 with zero point = -offset.
    qx = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert init(q, qx.input[2]).dtype == np.uint8 and int(init(q, qx.input[2])) == -int(tx.offset)
    assert float(init(q, qx.input[1])) == float(tx.scale)


def residual_case():
    w1, b1, w2, b2 = rand(8, 8, 3, 3, s=0.15), rand(8, s=0.1), rand(8, 8, 3, 3, s=0.15), rand(8, s=0.1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Add", ["c1", "c2"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", [2, 8, 10, 10])], [vi("y", [2, 8, 10, 10])],
                   {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    enc = Encodings()
    for name, lo, hi in [("x", -3, 3), ("c1", -4, 4.5), ("c2", -5, 4), ("y", -7, 8)]:
        enc.add_activation(asym(name, lo, hi))
    enc.add_param(wsym("w1", w1))
    enc.add_param(wsym("w2", w2))
    return m, enc, dict(w1=w1, b1=b1, w2=w2, b2=b2)


def test_residual_fan_out_one_q_per_tensor():
    m, enc, p = residual_case()
    q = build_qdq(m, enc)
    qs = [n for n in nodes_of(q, "QuantizeLinear") if n.input[0] == "c1"]
    assert len(qs) == 1, "one QuantizeLinear for the fanned-out tensor"
    dqs = [n for n in nodes_of(q, "DequantizeLinear") if n.input[0] == qs[0].output[0]]
    assert len(dqs) == 2, "one DequantizeLinear per consumer"
    consumers = {n.name for n in q.graph.node for d in dqs if d.output[0] in n.input}
    assert consumers == {"conv2", "add"}
    assert len(nodes_of(q, "QuantizeLinear")) == 4  # x, c1, c2, y
    report = integer_kernel_report(q)
    all_integer(report)
    assert report["optimized_op_counts"].get("com.microsoft.QLinearAdd") == 1
    x = rand(2, 8, 10, 10, s=1.0)
    out = run(q, x)[0]
    tx, t1, t2, ty = (enc.get(n) for n in ("x", "c1", "c2", "y"))
    c1 = requant(conv_acc(q_act(x, tx), tx, q_weight(p["w1"], enc.get("w1")), enc.get("w1"), p["b1"], 1), t1)
    c2 = requant(conv_acc(q_act(c1, t1), t1, q_weight(p["w2"], enc.get("w2")), enc.get("w2"), p["b2"], 1), t2)
    ref = requant(c1 + c2, ty)
    assert_within_one_lsb(out, ref, ty)


@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm(trans_b):
    w, b = rand(10, 16, s=0.3), rand(10, s=0.5)
    wt = w if trans_b else np.ascontiguousarray(w.T)
    m = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b)],
                   [vi("x", [6, 16])], [vi("y", [6, 10])], {"w": wt, "b": b})
    enc = Encodings()
    enc.add_activation(asym("x", -3, 3))
    enc.add_activation(asym("y", -6, 5))
    enc.add_param(wsym("w", wt, 0 if trans_b else 1))
    q = build_qdq(m, enc)
    report = integer_kernel_report(q)
    all_integer(report)
    assert report["nodes"][0]["kernel"] == "QGemm"
    x = rand(6, 16, s=1.2)
    tx, ty, tw = enc.get("x"), enc.get("y"), enc.get("w")
    qw = q_weight(wt, tw)
    qw_nk = qw if trans_b else qw.T
    bscale = (np.float32(tx.scale) * tw.scale).astype(np.float64)
    acc = (q_act(x, tx) + int(tx.offset)) @ qw_nk.T + np.rint(b / bscale)
    assert_within_one_lsb(run(q, x)[0], requant(acc * bscale, ty), ty)


@pytest.mark.parametrize("with_output_encoding", [True, False])
def test_matmul(with_output_encoding):
    w = rand(16, 12, s=0.3)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [vi("x", [2, 5, 16])], [vi("y", [2, 5, 12])], {"w": w})
    enc = Encodings()
    enc.add_activation(asym("x", -2, 3))
    enc.add_param(wsym("w", w, 1))
    if with_output_encoding:
        enc.add_activation(asym("y", -5, 5))
    q = build_qdq(m, enc)
    report = integer_kernel_report(q)
    all_integer(report)
    assert report["nodes"][0]["kernel"] == ("QLinearMatMul" if with_output_encoding else "MatMulIntegerToFloat")
    x = rand(2, 5, 16)
    tx, tw = enc.get("x"), enc.get("w")
    acc = ((q_act(x, tx) + int(tx.offset)) @ q_weight(w, tw)) * np.float64(tx.scale) * tw.scale.astype(np.float64)
    out = run(q, x)[0]
    if with_output_encoding:
        assert_within_one_lsb(out, requant(acc, enc.get("y")), enc.get("y"))
    else:
        np.testing.assert_allclose(out, acc, rtol=1e-5, atol=1e-5)


def test_matmul_bias_add():
    """PyTorch Linear on 3-D input exports MatMul + Add(bias); onnxruntime fuses the QDQ group into QGemm."""
    w, b = rand(16, 8, s=0.3), rand(8, s=0.5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    m = make_model(nodes, [vi("x", [2, 3, 16])], [vi("y", [2, 3, 8])], {"w": w, "b": b})
    enc = Encodings(activations={"x": asym("x", -2, 2), "y": asym("y", -4, 4)}, params={"w": wsym("w", w, 1)})
    q = build_qdq(m, enc)
    report = integer_kernel_report(q)
    all_integer(report)
    x = rand(2, 3, 16)
    tx, tw, ty = enc.get("x"), enc.get("w"), enc.get("y")
    acc = ((q_act(x, tx) + int(tx.offset)) @ q_weight(w, tw)) * np.float64(tx.scale) * tw.scale.astype(np.float64)
    assert_within_one_lsb(run(q, x)[0], requant(acc + b, ty), ty)


def test_matmul_two_activations():
    m = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                   [vi("a", [3, 4, 8]), vi("b", [3, 8, 5])], [vi("y", [3, 4, 5])], {})
    enc = Encodings()
    for name, lo, hi in [("a", -2, 2), ("b", -1, 3), ("y", -6, 6)]:
        enc.add_activation(asym(name, lo, hi))
    q = build_qdq(m, enc)
    all_integer(integer_kernel_report(q))
    a, b = rand(3, 4, 8), rand(3, 8, 5)
    ta, tb, ty = enc.get("a"), enc.get("b"), enc.get("y")
    ref = requant(real(q_act(a, ta), ta) @ real(q_act(b, tb), tb), ty)
    assert_within_one_lsb(run(q, {"a": a, "b": b})[0], ref, ty)


def concat_pool_case():
    w1, w2 = rand(4, 3, 3, 3, s=0.3), rand(4, 3, 1, 1, s=0.3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
             helper.make_node("AveragePool", ["c"], ["p"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["y"], name="gap")]
    m = make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", [2, 8, 1, 1])], {"w1": w1, "w2": w2})
    enc = Encodings()
    for name, lo, hi in [("x", -2, 2), ("a", -3, 3), ("b", -2, 2.5), ("c", -3, 3), ("p", -2, 2), ("y", -1, 1)]:
        enc.add_activation(asym(name, lo, hi))
    enc.add_param(wsym("w1", w1))
    enc.add_param(wsym("w2", w2))
    return m, enc, {"w1": w1, "w2": w2}


def test_concat_and_pools():
    m, enc, p = concat_pool_case()
    q = build_qdq(m, enc)
    report = integer_kernel_report(q)
    all_integer(report)
    ops = report["optimized_op_counts"]
    for op in ("com.microsoft.QLinearConcat", "com.microsoft.QLinearAveragePool",
               "com.microsoft.QLinearGlobalAveragePool"):
        assert ops.get(op) == 1, ops
    assert not any(k in ops for k in ("Conv", "Concat", "AveragePool", "GlobalAveragePool"))
    x = rand(2, 3, 8, 8)
    t = {n: enc.get(n) for n in ("x", "a", "b", "c", "p", "y")}
    qx = q_act(x, t["x"])
    a = requant(conv_acc(qx, t["x"], q_weight(p["w1"], enc.get("w1")), enc.get("w1"), None, 1), t["a"])
    b = requant(conv_acc(qx, t["x"], q_weight(p["w2"], enc.get("w2")), enc.get("w2"), None, 0), t["b"])
    c = requant(np.concatenate([a, b], axis=1), t["c"])
    pooled = requant(c.reshape(2, 8, 4, 2, 4, 2).mean(axis=(3, 5)), t["p"])
    ref = requant(pooled.mean(axis=(2, 3), keepdims=True), t["y"])
    assert_within_one_lsb(run(q, x)[0], ref, t["y"])


def cnn_case(act_kind="asym"):
    """conv-relu-conv-relu-GAP-flatten-gemm; act_kind 'sym' makes the conv inputs symmetric signed."""
    w1, b1, w2, b2 = rand(8, 3, 3, 3, s=0.3), rand(8, s=0.1), rand(16, 8, 3, 3, s=0.12), rand(16, s=0.1)
    wf, bf = rand(5, 16, s=0.4), rand(5, s=0.1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    m = make_model(nodes, [vi("x", [4, 3, 16, 16])], [vi("y", [4, 5])],
                   dict(w1=w1, b1=b1, w2=w2, b2=b2, wf=wf, bf=bf))
    enc = Encodings()
    enc.add_activation(sym_act("x", 3.0) if act_kind == "sym" else asym("x", -3, 3))
    enc.add_activation(asym("r1", 0, 2.0))
    enc.add_activation(asym("r2", 0, 2.5))
    enc.add_activation(asym("g", 0, 1.5))  # Flatten's output gets g's encoding by propagation
    enc.add_activation(asym("y", -4, 4))
    for name, w in (("w1", w1), ("w2", w2), ("wf", wf)):
        enc.add_param(wsym(name, w, 0))
    return m, enc, dict(w1=w1, b1=b1, w2=w2, b2=b2, wf=wf, bf=bf)


def cnn_reference(x, enc, p):
    e = enc.get
    r1 = conv_acc(q_act(x, e("x")), e("x"), q_weight(p["w1"], e("w1")), e("w1"), p["b1"], 1)[:, :, ::2, ::2]
    r1 = requant(r1, e("r1"))
    r2 = requant(conv_acc(q_act(r1, e("r1")), e("r1"), q_weight(p["w2"], e("w2")), e("w2"), p["b2"], 1), e("r2"))
    g = requant(r2.mean(axis=(2, 3)), e("g"))
    tg, tw = e("g"), e("wf")
    bscale = (np.float32(tg.scale) * tw.scale).astype(np.float64)
    acc = (q_act(g, tg) + int(tg.offset)) @ q_weight(p["wf"], tw).T + np.rint(p["bf"] / bscale)
    return requant(acc * bscale, e("y"))


def test_two_layer_cnn():
    m, enc, p = cnn_case()
    q = build_qdq(m, enc)
    report = integer_kernel_report(q)
    all_integer(report)
    assert report["by_op_type"] == {"Conv": {"total": 2, "integer": 2}, "Gemm": {"total": 1, "integer": 1}}
    x = rand(4, 3, 16, 16)
    assert_within_one_lsb(run(q, x)[0], cnn_reference(x, enc, p), enc.get("y"))
    # ORT_ENABLE_ALL (NHWC layout transform) must be reported the same.
    assert integer_kernel_report(q, optimization="all")["integer"] == 3


def test_float_model_reports_float():
    m, _, _ = cnn_case()
    report = integer_kernel_report(m)
    assert report["total"] == 3 and report["integer"] == 0


def test_symmetric_activation_shifted_to_uint8():
    """A signed symmetric 8-bit activation is emitted as uint8 with zero point 128: same grid, fused on x86."""
    m, enc, p = cnn_case("sym")
    q = build_qdq(m, enc)
    qx = next(n for n in nodes_of(q, "QuantizeLinear") if n.input[0] == "x")
    zp = init(q, qx.input[2])
    assert zp.dtype == np.uint8 and int(zp) == 128
    all_integer(integer_kernel_report(q))
    x = rand(4, 3, 16, 16)
    assert_within_one_lsb(run(q, x)[0], cnn_reference(x, enc, p), enc.get("y"))


def test_int8_activations_option():
    m, enc, p = cnn_case("sym")
    q = build_qdq(m, enc, int8_activations=True)
    qx = next(n for n in nodes_of(q, "QuantizeLinear") if n.input[0] == "x")
    assert init(q, qx.input[2]).dtype == np.int8
    # x's QuantizeLinear has one consumer, so onnxruntime's QDQS8ToU8Transformer rewrites it to uint8 and fuses.
    assert integer_kernel_report(q)["integer"] == 3
    x = rand(4, 3, 16, 16)
    out = run(q, x)[0]
    assert_within_one_lsb(out, cnn_reference(x, enc, p), enc.get("y"))


def test_int8_activations_with_fan_out_block_fusion():
    """Why symmetric activations default to uint8 + zero point 128: onnxruntime's QDQS8ToU8Transformer only converts
    a QuantizeLinear with a single consumer, so int8 tensors that fan out keep Conv/Add from fusing."""
    m, enc, _ = residual_case()
    for name in ("x", "c1", "c2", "y"):
        enc.activations[name] = sym_act(name, 5.0)
    assert integer_kernel_report(build_qdq(m, enc))["integer"] == 2
    assert integer_kernel_report(build_qdq(m, enc, int8_activations=True))["integer"] == 0


def test_4bit_weights_stored_in_int8():
    m, enc, p = conv_relu_case()
    enc.params["w"] = wsym("w", p["w"], 0, bw=4)
    q = build_qdq(m, enc)
    wq = init(q, dq_feeding(q, "conv", 1).input[0])
    assert wq.dtype == np.int8 and wq.min() >= -8 and wq.max() <= 7
    all_integer(integer_kernel_report(q))
    x = rand(2, 3, 12, 12)
    tx, ty, tw = enc.get("x"), enc.get("y"), enc.get("w")
    ref = requant(conv_acc(q_act(x, tx), tx, q_weight(p["w"], tw), tw, p["b"], 1), ty)
    assert_within_one_lsb(run(q, x)[0], ref, ty)


def test_16bit_activation_needs_opt_in():
    m, enc, p = conv_relu_case()
    enc.activations["y"] = asym("y", 0.0, 3.5, bw=16)
    with pytest.raises(QDQError, match="'y' has a 16-bit encoding") as info:
        build_qdq(m, enc)
    assert info.value.tensor == "y"
    q = build_qdq(m, enc, allow_16bit=True)
    assert any(o.version >= 21 for o in q.opset_import if o.domain == "")
    ty = enc.get("y")
    x = rand(2, 3, 12, 12)
    tx, tw = enc.get("x"), enc.get("w")
    ref = requant(conv_acc(q_act(x, tx), tx, q_weight(p["w"], tw), tw, p["b"], 1), ty)
    assert_within_one_lsb(run(q, x)[0], ref, ty)
    assert integer_kernel_report(q)["integer"] == 0  # no 16-bit integer Conv on the CPU provider


@pytest.mark.parametrize("case, match, node, tensor", [
    ("op", "op type 'Sin' is not supported", "sin", None),
    ("weight", "weight 'w' has no param encoding", "conv", "w"),
    ("conv_out", "output 'y' has no encoding", "conv", "y"),
    ("input", "input 'x' has no activation encoding", "conv", "x"),
    ("bits", "'x' has a 4-bit encoding", None, "x"),
    ("strict", "strict symmetric grid", None, "x"),
    ("per_channel_act", "per-channel encoding", None, "x"),
])
def test_errors_name_node_or_tensor(case, match, node, tensor):
    w = rand(4, 3, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)]
    outputs = [vi("y", [1, 4, 6, 6])]
    if case == "op":
        nodes.append(helper.make_node("Sin", ["y"], ["z"], name="sin"))
        outputs = [vi("z", [1, 4, 6, 6])]
    m = make_model(nodes, [vi("x", [1, 3, 6, 6])], outputs, {"w": w})
    enc = Encodings()
    enc.add_activation(asym("x", -1, 1))
    enc.add_activation(asym("y", -1, 1))
    enc.add_param(wsym("w", w))
    if case == "weight":
        del enc.params["w"]
    elif case == "conv_out":
        del enc.activations["y"]
    elif case == "input":
        del enc.activations["x"]
    elif case == "bits":
        enc.activations["x"] = asym("x", -1, 1, bw=4)
    elif case == "strict":
        enc.activations["x"] = TensorEncoding.create("x", 0.01, 0, 8, True, strict=True)
    elif case == "per_channel_act":
        enc.activations["x"] = TensorEncoding.create("x", [0.01, 0.02, 0.03], 0, 8, True, channel_axis=1)
    with pytest.raises(QDQError, match=match) as info:
        build_qdq(m, enc)
    if node:
        assert info.value.node == node and f"'{node}'" in str(info.value)
    if tensor:
        assert info.value.tensor == tensor


def test_allow_float_ops_and_encoding_errors():
    w = rand(4, 3, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4),
             helper.make_node("Sin", ["y"], ["z"], name="sin")]
    m = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("z", [1, 4, 6, 6])], {"w": w})
    enc = Encodings(activations={"x": asym("x", -1, 1), "y": asym("y", -1, 1)}, params={"w": wsym("w", w)})
    q = build_qdq(m, enc, allow_float_ops=("Sin",))
    assert integer_kernel_report(q)["integer"] == 1
    enc.add_activation(asym("nowhere", -1, 1))
    with pytest.raises(EncodingsError, match="nowhere: tensor not found"):
        build_qdq(m, enc)


def test_aimet_pair_files_and_opset_upgrade(tmp_path):
    """An AIMET-style pair on disk (opset 11 model, 0.6.1 file with ONNX tensor/initializer names)."""
    m, enc, p = cnn_case()
    m11 = make_model(list(m.graph.node), list(m.graph.input), list(m.graph.output),
                     {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}, opset=11)
    model_path, enc_path, out_path = tmp_path / "model.onnx", tmp_path / "model.encodings", tmp_path / "m_qdq.onnx"
    onnx.save(m11, model_path)
    write_encodings(enc, enc_path, "0.6.1")
    q = build_qdq_file(model_path, enc_path, out_path)
    assert out_path.exists() and [o.version for o in q.opset_import if o.domain == ""] == [13]
    all_integer(integer_kernel_report(str(out_path)))
    x = rand(4, 3, 16, 16)
    assert_within_one_lsb(run(str(out_path), x)[0], cnn_reference(x, enc, p), enc.get("y"))


def test_build_file_unwritable_leaves_nothing(tmp_path):
    m, enc, _ = conv_relu_case()
    model_path = tmp_path / "m.onnx"
    onnx.save(m, model_path)
    (tmp_path / "blocker").write_text("not a directory")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OSError):
        build_qdq_file(model_path, enc, tmp_path / "blocker" / "out.onnx")
    with pytest.raises(OSError):
        build_qdq_file(model_path, enc, tmp_path)  # a directory
    assert sorted(os.listdir(tmp_path)) == before


def test_runner_batch_and_threads():
    m, enc, _ = conv_relu_case()
    q = build_qdq(m, enc)
    dyn = onnx.ModelProto()
    dyn.CopyFrom(q)
    dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    dyn.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    x = rand(5, 3, 12, 12)
    whole = run(dyn, x, threads=2)[0]
    chunked = run(dyn, {"x": x}, threads=1, batch=2)[0]
    np.testing.assert_array_equal(whole, chunked)
    sess = make_session(dyn, threads=2)
    assert sess.get_session_options().intra_op_num_threads == 2
    opts = make_session(dyn, config={"session.intra_op.allow_spinning": "0"}).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="missing model inputs"):
        run(dyn, {"nope": x})
