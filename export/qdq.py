"""Float ONNX model + encodings -> QDQ ONNX model that onnxruntime's CPU provider fuses into integer kernels.

Layout (details and the onnxruntime rules behind it in docs/export.md): one QuantizeLinear per encoded activation,
one DequantizeLinear per consuming input, pre-quantized int8/uint8 weights + DequantizeLinear, int32 bias with
scale = input_scale * weight_scale. An op the builder cannot make integer raises QDQError naming the node.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .encodings import (
    Encodings,
    TensorEncoding,
    atomic_write,
    param_channel_axis,
    quantize_array,
    read_encodings,
    validate,
)

__all__ = ["QDQError", "QDQOptions", "build_qdq", "build_qdq_file", "COMPUTE_OPS"]

#: Ops with weights that become QLinearConv / QGemm / QLinearMatMul / MatMulIntegerToFloat.
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
#: Two-input ops onnxruntime turns into QLinearAdd / QLinearMul (com.microsoft) when fully Q/DQ'd.
BINARY_OPS = ("Add", "Mul")
#: Variadic: QLinearConcat.
VARIADIC_OPS = ("Concat",)
#: One-input ops with a QLinear* contrib kernel (UnaryReplaceWithQLinear in onnxruntime).
UNARY_OPS = ("AveragePool", "GlobalAveragePool", "Sigmoid", "Softmax", "LeakyRelu")
#: Data-movement ops: the output has the input's grid (an encoding missing on the output is propagated) and
#: onnxruntime drops the DQ/Q pair around them when both carry the same parameters.
PASSTHROUGH_OPS = (
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Identity", "Slice", "Expand", "Tile",
    "Gather", "Split",
)
#: Cheap ops allowed to run in float between a DQ and a Q (onnxruntime folds Relu/Clip into the preceding Q).
FLOAT_OK_OPS = ("Relu", "Clip", "Resize", "Shape", "Size", "Cast", "ConstantOfShape", "Constant", "Dropout")

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class QDQError(ValueError):
    """The float model cannot be expressed as an integer QDQ graph; `node`/`tensor` name the culprit."""

    def __init__(self, message: str, node: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.node = node
        self.tensor = tensor


@dataclass
class QDQOptions:
    """Choices for encodings that have more than one ONNX form (see docs/export.md).

    int8_activations: emit symmetric signed 8-bit activations as int8 (zero point 0). Default False emits them as
        uint8 with zero point 128 — the same grid shifted by 128, bit-exact — because onnxruntime on x86 only fuses
        Conv/MatMul with uint8 activations unless the session sets session.qdq_is_int8_allowed=1.
    allow_16bit: emit 16-bit activations/weights as (u)int16 Q/DQ (opset 21). Numerically exact, but onnxruntime's
        CPU provider has no 16-bit integer Conv/MatMul kernels, so those ops run in float. Off: a clear error.

    allow_float_ops: op types allowed to stay float although the builder cannot make them integer.
    """

    int8_activations: bool = False
    allow_16bit: bool = False
    allow_float_ops: tuple[str, ...] = ()


@dataclass
class _ActQ:
    """How an activation encoding is written: storage dtype, scale, zero point and the shift from the sim's grid."""

    onnx_type: int
    np_type: type
    scale: np.ndarray
    zero_point: np.ndarray
    shift: int
    enc: TensorEncoding


@dataclass
class _Plan:
    names: set = field(default_factory=set)
    initializers: list = field(default_factory=list)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes holding a tensor/float/int(s) into initializers, so weights are found in one place."""
    g = model.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.output and not n.domain:
            a = n.attribute[0]
            value = None
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(a), dtype=np.float32)
            elif a.name in ("value_int", "value_ints"):
                value = np.asarray(helper.get_attribute_value(a), dtype=np.int64)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, n.output[0]))
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    current = _opset(model)
    if current >= minimum:
        return model
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, minimum)
    except Exception as e:  # noqa: BLE001 - report any converter failure the same way
        raise QDQError(f"model opset {current} < {minimum} and onnx's version converter failed: {e}") from None
    return converted


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort
        inferred = model
    types = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


class _Builder:
    def __init__(self, model: onnx.ModelProto, enc: Encodings, opts: QDQOptions):
        self.model = model
        self.enc = enc
        self.opts = opts
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.graph_outputs = {o.name for o in g.output}
        self.types = _elem_types(model)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.plan = _Plan()
        for n in g.node:
            self.plan.names.update(x for x in list(n.input) + list(n.output) if x)
            if n.name:
                self.plan.names.add(n.name)
        self.plan.names.update(self.inits)
        self.plan.names.update(self.graph_inputs)
        self.plan.names.update(self.graph_outputs)
        self.act: dict[str, TensorEncoding] = {}
        self._const_cache: dict[str, np.ndarray] = {}
        self.uses_16bit = False
        self.float_nodes: set[str] = set()  # nodes made by rewrites that run in float between a DQ and a Q

    # -- helpers -------------------------------------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self.inits

    def const(self, name: str) -> np.ndarray:
        if name not in self._const_cache:
            self._const_cache[name] = numpy_helper.to_array(self.inits[name])
        return self._const_cache[name]

    def is_float(self, name: str) -> bool:
        t = self.types.get(name)
        return t is None or t in _FLOAT_TYPES

    def node_label(self, node) -> str:
        return f"node '{node.name or node.output[0]}' ({node.op_type})"

    # -- encodings -----------------------------------------------------------------------------------------------------
    def resolve_activation_encodings(self) -> None:
        """Encodings of non-constant tensors: from the file, then propagated forward through data-movement ops."""
        for name in self.graph_inputs:
            te = self.enc.get(name)
            if te is not None:
                self.act[name] = te
        for node in self.model.graph.node:
            for o in node.output:
                te = self.enc.get(o)
                if o and te is not None:
                    self.act[o] = te
            if node.op_type in PASSTHROUGH_OPS and node.input and node.input[0] in self.act:
                src = self.act[node.input[0]]
                for o in node.output:
                    if o and o not in self.act and self.is_float(o):
                        self.act[o] = src.with_name(o)

    def act_q(self, te: TensorEncoding, where: str) -> _ActQ:
        """The ONNX form of an activation encoding, or QDQError explaining why there is none."""
        if te.is_float:
            raise QDQError(f"{where}: tensor '{te.name}' has a float{te.bitwidth} encoding; only integer encodings "
                           "can be exported", tensor=te.name)
        if te.per_channel:
            raise QDQError(f"{where}: activation '{te.name}' has a per-channel encoding; onnxruntime's integer "
                           "kernels take per-tensor activation scales", tensor=te.name)
        kind, b = te.kind, te.bitwidth
        if kind == "strict":
            raise QDQError(f"{where}: activation '{te.name}' uses a strict symmetric grid [{te.qmin}, {te.qmax}], "
                           "which QuantizeLinear cannot saturate to", tensor=te.name)
        if b == 8:
            if kind == "signed":
                if self.opts.int8_activations:
                    return _ActQ(TensorProto.INT8, np.int8, te.scale, np.array(0, np.int8), 0, te)
                return _ActQ(TensorProto.UINT8, np.uint8, te.scale, np.array(128, np.uint8), 128, te)
            return _ActQ(TensorProto.UINT8, np.uint8, te.scale, np.array(-int(te.offset), np.uint8), 0, te)
        if b == 16 and self.opts.allow_16bit:
            self.uses_16bit = True
            if kind == "signed":
                return _ActQ(TensorProto.INT16, np.int16, te.scale, np.array(0, np.int16), 0, te)
            return _ActQ(TensorProto.UINT16, np.uint16, te.scale, np.array(-int(te.offset), np.uint16), 0, te)
        hint = " (pass allow_16bit=True / --allow-16bit to emit int16 Q/DQ)" if b == 16 else ""
        raise QDQError(f"{where}: activation '{te.name}' has a {b}-bit encoding; only 8-bit activations map to "
                       f"onnxruntime integer kernels{hint}", tensor=te.name)

    def weight_form(self, te: TensorEncoding, where: str) -> tuple[int, type]:
        """Storage type of a pre-quantized weight: any grid of <= 8 bits fits int8/uint8 exactly."""
        if te.is_float:
            raise QDQError(f"{where}: weight '{te.name}' has a float{te.bitwidth} encoding", tensor=te.name)
        signed = te.qmin < 0
        if te.bitwidth <= 8:
            return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
        if te.bitwidth == 16 and self.opts.allow_16bit:
            self.uses_16bit = True
            return (TensorProto.INT16, np.int16) if signed else (TensorProto.UINT16, np.uint16)
        raise QDQError(f"{where}: weight '{te.name}' has a {te.bitwidth}-bit encoding; weights of up to 8 bits are "
                       "stored as int8/uint8 (16 with allow_16bit)", tensor=te.name)

    # -- checks --------------------------------------------------------------------------------------------------------
    def needs_q(self, name: str) -> bool:
        return name in self.act and bool(self.consumers.get(name) or name in self.graph_outputs)

    def has_act(self, name: str) -> bool:
        return name in self.act or (self.is_const(name) and self.enc.get(name) is not None)

    def epilogue(self, node) -> onnx.NodeProto | None:
        """The Relu/Clip whose quantized output onnxruntime folds into `node` (supergroup Conv+Relu), if any."""
        out = node.output[0]
        cons = self.consumers.get(out, [])
        if out in self.act or out in self.graph_outputs or len(cons) != 1:
            return None
        nxt, _ = cons[0]
        if nxt.op_type not in ("Relu", "Clip") or nxt.output[0] not in self.act:
            return None
        return nxt

    def check_epilogue(self, node, clip) -> None:
        te = self.act[clip.output[0]]
        aq = self.act_q(te, self.node_label(clip))
        info = np.iinfo(aq.np_type)
        zp, scale = int(aq.zero_point), float(aq.scale)
        if clip.op_type == "Relu":
            ok = zp == info.min
        else:
            lo, hi = self.clip_bounds(clip)
            ok = (lo is None or int(np.rint(lo / scale)) + zp <= info.min) and (
                hi is None or int(np.rint(hi / scale)) + zp >= info.max)
        if not ok:
            raise QDQError(
                f"{self.node_label(node)}: its output has no encoding and the following {clip.op_type} "
                f"'{clip.name}' is not made redundant by the next QuantizeLinear (zero point {zp}), so onnxruntime "
                f"cannot fuse it; add an encoding for '{node.output[0]}'", node=node.name, tensor=node.output[0])

    def clip_bounds(self, clip):
        lo = hi = None
        if len(clip.input) > 1 and clip.input[1]:
            lo = float(self.const(clip.input[1])) if self.is_const(clip.input[1]) else None
        if len(clip.input) > 2 and clip.input[2]:
            hi = float(self.const(clip.input[2])) if self.is_const(clip.input[2]) else None
        if len(clip.input) == 1:
            lo, hi = _attr(clip, "min"), _attr(clip, "max")
        return lo, hi

    def check_node(self, node) -> None:
        op, label = node.op_type, self.node_label(node)
        data_outputs = [o for o in node.output if o]
        if data_outputs and not any(self.is_float(o) for o in data_outputs):
            return  # shape arithmetic on int64 tensors
        if node.name and node.name in self.float_nodes:
            return
        if op in COMPUTE_OPS:
            self.check_compute(node)
        elif op in BINARY_OPS:
            ins = [x for x in node.input if x]
            const_plain = [x for x in ins if self.is_const(x) and self.enc.get(x) is None]
            others = [x for x in ins if x not in const_plain]
            if const_plain and others and all(not self.has_act(x) and self.from_float_output(x) for x in others):
                return  # float bias/scale epilogue of MatMulIntegerToFloat / QGemm with float output
            for x in const_plain:
                if self.is_float(x) and self.const(x).size == 1:  # e.g. attention's 1/sqrt(d): exact on a 1-step grid
                    self.enc.activations[x] = exact_scalar_encoding(x, float(self.const(x).reshape(-1)[0]))
            for x in ins:
                if not self.has_act(x):
                    raise QDQError(f"{label}: input '{x}' has no encoding; {op} needs all inputs and its output "
                                   "quantized to become QLinear" + op, node=node.name, tensor=x)
            self.need_output_or_epilogue(node)
        elif op in VARIADIC_OPS or op in UNARY_OPS:
            for x in ([node.input[0]] if op in UNARY_OPS else [x for x in node.input if x]):
                if not self.has_act(x):
                    raise QDQError(f"{label}: input '{x}' has no encoding", node=node.name, tensor=x)
            self.need_output(node)
        elif op in PASSTHROUGH_OPS or op in FLOAT_OK_OPS or op in self.opts.allow_float_ops:
            return
        else:
            raise QDQError(
                f"{label}: op type {op!r} is not supported by the QDQ builder (it would run in float); fold or "
                "remove it, or allow it explicitly with allow_float_ops", node=node.name)

    def from_float_output(self, name: str) -> bool:
        """True if `name` is the unencoded output of a Gemm/MatMul (an integer kernel with float output)."""
        p = self.producer.get(name)
        return p is not None and p.op_type in ("Gemm", "MatMul") and name not in self.act

    def need_output_or_epilogue(self, node) -> None:
        """The output is encoded, or its only consumer is a Relu/Clip with an encoded output that the Q makes redundant
        (onnxruntime's ClipQuantFusion removes it, e.g. Add -> Relu -> Q becomes QLinearAdd)."""
        if node.output[0] in self.act:
            return
        clip = self.epilogue(node)
        if clip is None:
            self.need_output(node)
        else:
            self.check_epilogue(node, clip)

    def need_output(self, node) -> None:
        if node.output[0] not in self.act:
            raise QDQError(f"{self.node_label(node)}: output '{node.output[0]}' has no encoding", node=node.name,
                           tensor=node.output[0])

    def check_compute(self, node) -> None:
        op, label = node.op_type, self.node_label(node)
        x = node.input[0]
        if self.is_const(x) or not self.has_act(x):
            raise QDQError(f"{label}: input '{x}' has no activation encoding", node=node.name, tensor=x)
        self.act_q(self.act[x], label)
        w = node.input[1]
        if self.is_const(w):
            te = self.enc.get(w)
            if te is None:
                raise QDQError(f"{label}: weight '{w}' has no param encoding", node=node.name, tensor=w)
            self.weight_form(te, label)
            self.weight_axis(node, te)
        elif op == "Conv":
            raise QDQError(f"{label}: weight '{w}' is not a constant", node=node.name, tensor=w)
        elif not self.has_act(w):
            raise QDQError(f"{label}: input '{w}' has no activation encoding", node=node.name, tensor=w)
        if len(node.input) > 2 and node.input[2]:
            b = node.input[2]
            if not self.is_const(b):
                raise QDQError(f"{label}: bias '{b}' is not a constant", node=node.name, tensor=b)
            if not self.is_const(w):
                raise QDQError(f"{label}: a bias needs a constant weight", node=node.name, tensor=b)
            if op == "Gemm" and float(_attr(node, "beta", 1.0)) != 1.0:
                raise QDQError(f"{label}: QGemm needs beta == 1 with a bias", node=node.name)
        if node.output[0] in self.act:
            self.act_q(self.act[node.output[0]], label)
            return
        clip = self.epilogue(node)
        if clip is not None:
            self.check_epilogue(node, clip)
            return
        if op == "Conv":
            raise QDQError(f"{label}: output '{node.output[0]}' has no encoding (nor a Relu/Clip with one), so it "
                           "cannot become QLinearConv", node=node.name, tensor=node.output[0])
        # Gemm / MatMul without an output encoding: QGemm with float output / MatMulIntegerToFloat.

    def weight_axis(self, node, te: TensorEncoding) -> int | None:
        w = node.input[1]
        shape = self.const(w).shape
        if not te.per_channel:
            return None
        expected = param_channel_axis(node, 1, len(shape))
        axis = te.channel_axis if te.channel_axis is not None else expected
        if axis is None or not -len(shape) <= axis < len(shape):
            raise QDQError(f"{self.node_label(node)}: cannot tell the channel axis of '{w}'", node=node.name, tensor=w)
        axis %= len(shape)
        if shape[axis] != te.scale.size:
            raise QDQError(f"{self.node_label(node)}: '{w}' has {te.scale.size} channel scales but dim {shape[axis]} "
                           f"on axis {axis}", node=node.name, tensor=w)
        if expected is not None and axis != expected % len(shape):
            raise QDQError(f"{self.node_label(node)}: '{w}' is quantized along axis {axis}; onnxruntime's integer "
                           f"{node.op_type} needs per-output-channel scales (axis {expected})", node=node.name, tensor=w)
        return axis

    # -- emission ------------------------------------------------------------------------------------------------------
    def q_params(self, base: str, aq: _ActQ) -> tuple[str, str]:
        s = self.plan.init(f"{base}_scale", np.asarray(aq.scale, np.float32).reshape(()))
        z = self.plan.init(f"{base}_zero_point", np.asarray(aq.zero_point).astype(aq.np_type).reshape(()))
        return s, z

    def build(self) -> onnx.ModelProto:
        g = self.model.graph
        self.resolve_activation_encodings()
        for node in g.node:
            self.check_node(node)

        new_nodes: list[onnx.NodeProto] = []
        q_out: dict[str, tuple[str, str, str]] = {}  # tensor -> (quantized name, scale, zero point)
        dq_count: dict[str, int] = {}

        def emit_q(tensor: str, src: str) -> None:
            aq = self.act_q(self.act[tensor], f"tensor '{tensor}'")
            s, z = self.q_params(tensor, aq)
            qname = self.plan.fresh(f"{tensor}_quantized")
            new_nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [qname],
                                              name=self.plan.fresh(f"{tensor}_QuantizeLinear")))
            q_out[tensor] = (qname, s, z)
            if tensor in self.graph_outputs:
                new_nodes.append(helper.make_node("DequantizeLinear", [qname, s, z], [tensor],
                                                  name=self.plan.fresh(f"{tensor}_DequantizeLinear")))

        def emit_dq(base: str, inputs: list[str], axis: int | None = None) -> str:
            k = dq_count.get(base, 0)
            dq_count[base] = k + 1
            out = self.plan.fresh(f"{base}_dequantized")
            attrs = {} if axis is None else {"axis": int(axis)}
            new_nodes.append(helper.make_node("DequantizeLinear", inputs, [out],
                                              name=self.plan.fresh(f"{base}_DequantizeLinear"), **attrs))
            return out

        quantized_weights: dict[tuple, tuple[str, str, str, int | None]] = {}

        def weight_dq(node, w: str) -> str:
            te = self.enc.get(w)
            label = self.node_label(node)
            onnx_t, np_t = self.weight_form(te, label)
            axis = self.weight_axis(node, te)
            key = (w, axis)
            if key not in quantized_weights:
                q = quantize_array(self.const(w), te.scale, te.offset, te.qmin, te.qmax, axis)
                qn = self.plan.init(f"{w}_quantized", q.astype(np_t))
                sn = self.plan.init(f"{w}_scale", te.scale.astype(np.float32))
                zn = self.plan.init(f"{w}_zero_point", (-te.offset).astype(np_t))
                quantized_weights[key] = (qn, sn, zn, axis)
            qn, sn, zn, axis = quantized_weights[key]
            return emit_dq(w, [qn, sn, zn], axis)

        def bias_dq(node, b: str) -> str:
            x_te = self.act[node.input[0]]
            w_te = self.enc.get(node.input[1])
            w_axis = self.weight_axis(node, w_te)
            bias = self.const(b).astype(np.float64)
            n_out = self.const(node.input[1]).shape[w_axis if w_axis is not None else
                                                    (param_channel_axis(node, 1, self.const(node.input[1]).ndim) or 0)]
            if bias.size == 1 and n_out != 1:
                bias = np.full(n_out, float(bias.reshape(-1)[0]))
            bias = bias.reshape(-1)
            b_scale = (np.float32(x_te.scale) * w_te.scale.astype(np.float32)).astype(np.float32)
            if b_scale.ndim == 1 and b_scale.size != bias.size:
                raise QDQError(f"{self.node_label(node)}: bias '{b}' has {bias.size} values for {b_scale.size} "
                               "channels", node=node.name, tensor=b)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                q = np.rint(bias / b_scale.astype(np.float64))
            q = np.clip(np.nan_to_num(q, nan=0.0, posinf=_INT32_MAX, neginf=_INT32_MIN), _INT32_MIN, _INT32_MAX)
            qn = self.plan.init(f"{b}_quantized", q.astype(np.int32))
            sn = self.plan.init(f"{b}_scale", b_scale)
            zn = self.plan.init(f"{b}_zero_point", np.zeros(b_scale.shape, np.int32))
            return emit_dq(b, [qn, sn, zn], 0 if b_scale.ndim == 1 else None)

        def const_act_dq(name: str, where: str) -> str:
            te = self.enc.get(name)
            aq = self.act_q(te, where)
            q = quantize_array(self.const(name), te.scale, te.offset, te.qmin, te.qmax) + aq.shift
            qn = self.plan.init(f"{name}_quantized", q.astype(aq.np_type))
            s, z = self.q_params(name, aq)
            return emit_dq(name, [qn, s, z])

        for name in self.graph_inputs:
            if name in self.act and self.consumers.get(name):
                emit_q(name, name)

        for orig in g.node:
            node = copy.deepcopy(orig)
            weight_slots = set()
            if node.op_type in COMPUTE_OPS and len(node.input) > 1 and self.is_const(node.input[1]):
                weight_slots = {1, 2}
            for i, name in enumerate(list(node.input)):
                if not name:
                    continue
                if i in weight_slots:
                    node.input[i] = weight_dq(orig, name) if i == 1 else bias_dq(orig, name)
                elif name in q_out:
                    qname, s, z = q_out[name]
                    node.input[i] = emit_dq(name, [qname, s, z])
                elif self.is_const(name) and self.enc.get(name) is not None and self.is_float(name):
                    node.input[i] = const_act_dq(name, self.node_label(orig))
            pending = []
            for j, o in enumerate(node.output):
                if o and self.needs_q(o):
                    src = o
                    if o in self.graph_outputs:
                        src = self.plan.fresh(f"{o}_float")
                        node.output[j] = src
                    pending.append((o, src))
            new_nodes.append(node)
            for o, src in pending:
                emit_q(o, src)

        still_used = {x for n in new_nodes for x in n.input if x}
        dropped = {i.name for i in g.initializer if i.name not in still_used}
        kept = [i for i in g.initializer if i.name not in dropped]
        del g.initializer[:]
        g.initializer.extend(kept + self.plan.initializers)
        inputs = [i for i in g.input if i.name not in dropped]
        del g.input[:]
        g.input.extend(inputs)
        del g.node[:]
        g.node.extend(new_nodes)
        # value_info entries would describe the renamed float tensors wrongly: drop them.
        del g.value_info[:]
        return self.model


def exact_scalar_encoding(name: str, value: float) -> TensorEncoding:
    """An 8-bit asymmetric encoding on which the scalar `value` is exact: scale |value|, q = 1 (or 0 with offset -1)."""
    v = float(np.float32(value))
    if not np.isfinite(v):
        raise QDQError(f"constant '{name}' is not finite ({v})", tensor=name)
    if v == 0.0:
        return TensorEncoding(name, 8, False, np.float32(1.0), 0, 0, 255)
    return TensorEncoding(name, 8, False, np.float32(abs(v)), 0 if v > 0 else -1, 0, 255)


def _rank_map(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort
        inferred = model
    ranks = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


def fold_bn_into_grid(q: np.ndarray, te: TensorEncoding, k: np.ndarray, axis: int, where: str = "folding a BatchNorm",
                      node: str | None = None):
    """(q_new, offset_new, scale_new, saturated): integer weights q (on te's grid, channels on `axis`) times the
    BatchNorm scales k, keeping every integer: channel c's scale becomes s_c |k_c| float32 and a negative k_c moves
    into the integers (symmetric: negated, -qmin saturating to qmax, counted in `saturated`; asymmetric: mirrored
    on the grid with the offset). A zero k_c zeroes the channel. quantsim.emulation reproduces folded layers with it.
    A scale that comes out 0 or not finite raises QDQError(f"{where} gives a weight scale ...", node=node).
    """
    n_out = q.shape[axis]
    s = np.broadcast_to(te.scale.astype(np.float64), (n_out,)) if te.per_channel else np.full(n_out, float(te.scale))
    o = np.broadcast_to(te.offset, (n_out,)).astype(np.int64) if te.per_channel else np.full(n_out, int(te.offset))
    shape = [1] * q.ndim
    shape[axis] = n_out
    neg = (k < 0).reshape(shape)
    zero = (k == 0).reshape(shape)
    o_b = o.reshape(shape)
    if te.symmetric:
        flipped = -q
        saturated = int(np.count_nonzero(neg & (flipped > te.qmax)))
        q_new = np.where(neg, np.clip(flipped, te.qmin, te.qmax), q)
        o_new = np.zeros(n_out, np.int64)
    else:
        saturated = 0
        q_new = np.where(neg, te.qmin + te.qmax - q, q)
        o_new = np.where(k < 0, -(te.qmin + te.qmax) - o, o)
    q_new = np.where(zero, -o_b, q_new)
    scale = np.where(k == 0, s, s * np.abs(k)).astype(np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise QDQError(f"{where} gives a weight scale that is 0 or not finite", node=node)
    return q_new, o_new, scale, saturated


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, c) float64 of an inference BatchNorm y = k x + c, from its float32 parameters and float32 epsilon."""
    gamma, beta, mean, var = (np.asarray(v, np.float32).astype(np.float64).reshape(-1) for v in (gamma, beta, mean, var))
    k = gamma / np.sqrt(var + float(np.float32(eps)))
    return k, beta - mean * k


def _fold_bn_into_layer(g, layer, bn, te: TensorEncoding, w: np.ndarray, k: np.ndarray, c: np.ndarray,
                        axis: int, plan: _Plan, enc: Encodings) -> None:
    """Conv/Gemm -> BN becomes one Conv/Gemm whose weight keeps its integer values (fold_bn_into_grid) and whose
    bias absorbs BN."""
    n_out = w.shape[axis]
    shape = [1] * w.ndim
    shape[axis] = n_out
    q = quantize_array(w, te.scale, te.offset, te.qmin, te.qmax, axis if te.per_channel else None)
    q_new, o_new, scale, clipped = fold_bn_into_grid(q, te, k, axis, f"{bn.name}: folding it into '{layer.name}'",
                                                     node=bn.name)
    if clipped:
        warnings.warn(f"{bn.name}: folding a negative BatchNorm scale into '{layer.input[1]}' saturates "
                      f"{clipped} weight(s) at {te.qmin} to {te.qmax} (one step off)", stacklevel=4)
    w_new = ((q_new + o_new.reshape(shape)).astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    w_name = plan.init(f"{layer.input[1]}_bn_folded", w_new)
    enc.params[w_name] = TensorEncoding(w_name, te.bitwidth, te.symmetric, scale, o_new, te.qmin, te.qmax, axis)
    bias = np.zeros(n_out, np.float64)
    if len(layer.input) > 2 and layer.input[2]:
        b = numpy_helper.to_array(next(i for i in g.initializer if i.name == layer.input[2])).astype(np.float64)
        bias = np.broadcast_to(b.reshape(-1), (n_out,)) if b.size in (1, n_out) else None
        if bias is None:
            raise QDQError(f"{layer.name}: bias of {b.size} values for {n_out} channels", node=layer.name)
    b_name = plan.init(f"{layer.name or layer.output[0]}_bias_bn_folded", (bias * k + c).astype(np.float32))
    layer.input[1] = w_name
    if len(layer.input) > 2:
        layer.input[2] = b_name
    else:
        layer.input.append(b_name)
    layer.output[0] = bn.output[0]


def _rewrite_batchnorms(model: onnx.ModelProto, enc: Encodings) -> set[str]:
    """BatchNormalization (inference form) -> folded into the Conv/Gemm before it when that layer's output feeds only
    the BN, has no encoding and its weight has one; otherwise Mul + Add with float constants that run between the
    BN input's DQ and its output's Q (names returned). The float model and the encodings file keep the BN."""
    g = model.graph
    if not any(n.op_type == "BatchNormalization" for n in g.node):
        return set()
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output if o}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            if x:
                readers[x] = readers.get(x, 0) + 1
    plan = _Plan()
    plan.names.update(x for n in g.node for x in list(n.input) + list(n.output) + [n.name] if x)
    plan.names.update(inits)
    ranks = _rank_map(model)
    float_nodes: set[str] = set()
    new_nodes = []
    for node in g.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        label = f"node '{node.name or node.output[0]}' (BatchNormalization)"
        if any(o for o in node.output[1:]) or int(_attr(node, "training_mode", 0)):
            raise QDQError(f"{label}: training-mode BatchNormalization cannot be exported", node=node.name)
        x = node.input[0]
        params = list(node.input[1:5])
        if any(p not in inits for p in params):
            raise QDQError(f"{label}: scale/bias/mean/var must be constants", node=node.name)
        k, c = bn_scale_shift(*(numpy_helper.to_array(inits[p]) for p in params), float(_attr(node, "epsilon", 1e-5)))
        layer = producer.get(x)
        te = enc.get(layer.input[1]) if layer is not None and len(layer.input) > 1 else None
        axis = None
        if layer is not None and layer.op_type == "Conv":
            axis = 0
        elif layer is not None and layer.op_type == "Gemm" and float(_attr(layer, "alpha", 1.0)) == 1.0 \
                and float(_attr(layer, "beta", 1.0)) == 1.0:
            axis = 0 if int(_attr(layer, "transB", 0)) else 1
        foldable = (axis is not None and readers.get(x, 0) == 1 and x not in outputs and enc.get(x) is None
                    and layer.input[1] in inits and te is not None and not te.is_float
                    and (not te.per_channel or te.channel_axis in (None, axis))
                    and (len(layer.input) < 3 or not layer.input[2] or layer.input[2] in inits))
        if foldable:
            w = numpy_helper.to_array(inits[layer.input[1]]).astype(np.float32)
            foldable = w.shape[axis] == k.size
        if foldable:
            _fold_bn_into_layer(g, layer, node, te, w, k, c, axis, plan, enc)
            continue
        rank = ranks.get(x)
        if rank is None or rank < 2:
            raise QDQError(f"{label}: cannot fold it into a preceding Conv/Gemm and the rank of its input '{x}' is "
                           "unknown", node=node.name, tensor=x)
        shape = (k.size,) + (1,) * (rank - 2)
        k_name = plan.init(f"{node.name or node.output[0]}_scale", k.astype(np.float32).reshape(shape))
        c_name = plan.init(f"{node.name or node.output[0]}_shift", c.astype(np.float32).reshape(shape))
        mid = plan.fresh(f"{node.output[0]}_scaled")
        mul = helper.make_node("Mul", [x, k_name], [mid], name=plan.fresh(f"{node.name or 'bn'}/Mul"))
        add = helper.make_node("Add", [mid, c_name], [node.output[0]], name=plan.fresh(f"{node.name or 'bn'}/Add"))
        float_nodes.update((mul.name, add.name))
        new_nodes.extend([mul, add])
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(plan.initializers)
    return float_nodes


def build_qdq(float_model: onnx.ModelProto, enc: Encodings, options: QDQOptions | None = None,
              **kwargs) -> onnx.ModelProto:
    """A QDQ model of `float_model` with the encodings of `enc` (the input model is not modified).

    Keyword arguments override fields of `options` (int8_activations, allow_16bit, allow_float_ops).
    Raises EncodingsError when an encoding does not fit the graph, QDQError when a node cannot become integer.
    """
    opts = copy.copy(options) if options is not None else QDQOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(opts, k, tuple(v) if k == "allow_float_ops" else v)
    model = copy.deepcopy(float_model)
    _constants_to_initializers(model)
    if _opset(model) == 0:
        raise QDQError("model has no default-domain opset import")
    model = _ensure_opset(model, 13)
    enc = copy.copy(enc)
    enc.activations, enc.params = dict(enc.activations), dict(enc.params)
    enc.assign_params(model)
    validate(enc, model)
    float_nodes = _rewrite_batchnorms(model, enc)
    builder = _Builder(model, enc, opts)
    builder.float_nodes = float_nodes
    out = builder.build()
    if builder.uses_16bit and _opset(out) < 21:
        for o in out.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 21
    # The lowest IR version the opsets need: models from a newer onnx package still load in older runtimes.
    out.ir_version = max(7, helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True))
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # pragma: no cover - a builder bug, not a user error
        raise QDQError(f"the generated QDQ model does not pass onnx.checker: {e}") from None
    return out


def build_qdq_file(model_path, encodings, out_path, options: QDQOptions | None = None, **kwargs) -> onnx.ModelProto:
    """Path-based `build_qdq`: reads the model and encodings (path or Encodings), writes out_path atomically."""
    model = onnx.load(os.fspath(model_path))
    enc = encodings if isinstance(encodings, Encodings) else read_encodings(encodings, model)
    qdq = build_qdq(model, enc, options, **kwargs)
    atomic_write(out_path, qdq.SerializeToString())
    return qdq

