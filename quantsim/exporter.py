"""Export a QuantizationSimModel (float ONNX + AIMET encodings + QDQ ONNX + safetensors state) and load it back.

Tensor naming: during torch.onnx export every enabled quantizer emits a marker node carrying its name; the markers are
then removed and tell exactly which ONNX tensor each quantizer quantizes (docs/export.md, "From a
QuantizationSimModel"). The torch-free `export` package writes the encodings files and builds the QDQ model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from export import qdq as _qdq
from export._files import write_all as _write_all
from export.encodings import Encodings, EncodingsError, TensorEncoding, dump_encodings, read_encodings
from export.qdq import QDQError, QDQOptions, build_qdq

from .distributed import on_rank_zero, resolve_group
from .qmodule import QuantizationMixin
from .quantizer import QuantizeDequantize
from .utils import eval_mode

__all__ = [
    "ExportError",
    "ExportPaths",
    "OnnxExport",
    "export",
    "export_onnx",
    "load_encodings",
    "save_state",
    "load_state",
    "quantizer_encoding",
    "onnxruntime_fidelity",
    "MARKER_DOMAIN",
    "DEFAULT_OPSET",
]

#: Custom domain of the marker nodes (never left in an exported file).
MARKER_DOMAIN = "quantsim"
MARKER_OP = "QuantizerMarker"
#: Opset of the exported float graph: 20 keeps GELU one `Gelu` node (lower opsets decompose it into Erf/Mul/Add,
#: whose intermediate tensors have no encoding) and LayerNorm one `LayerNormalization` (>= 17).
DEFAULT_OPSET = 20
_STATE_FORMAT = "quantsim.state/1"


class ExportError(ValueError):
    """The sim cannot be exported as asked; `module` names the module (or quantizer) at fault when known."""

    def __init__(self, message: str, module: str | None = None):
        super().__init__(message)
        self.module = module


@dataclass(frozen=True)
class ExportPaths:
    """Paths written by `export`; `float_ops` lists op types left in float between a DQ and a Q (as simulated)."""

    onnx: str
    encodings: str
    qdq: str | None
    safetensors: str
    float_ops: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[str]:
        return iter(p for p in (self.onnx, self.encodings, self.qdq, self.safetensors) if p)


@dataclass
class OnnxExport:
    """A float ONNX graph of the sim and which quantizer owns each encoded tensor."""

    model: onnx.ModelProto
    activations: dict[str, str]          # ONNX tensor -> quantizer name
    params: dict[str, str]               # initializer -> quantizer name
    param_axes: dict[str, int | None] = field(default_factory=dict)   # initializer -> ONNX channel axis
    encodings: Encodings | None = None
    node_modules: dict[str, str] = field(default_factory=dict)         # ONNX node name -> module path

    def owner(self, tensor: str) -> str | None:
        return self.activations.get(tensor) or self.params.get(tensor)


# ===================================================================================================== quantizers


def _quantizers(sim) -> dict[str, tuple[nn.Module, str, str, QuantizeDequantize]]:
    """name -> (module, module path, slot, quantizer) for every quantizer of the sim."""
    out = {}
    for mname, module in sim.model.named_modules():
        if isinstance(module, QuantizationMixin):
            for slot, q in module.quantizers():
                out[f"{mname}.{slot}"] = (module, mname, slot, q)
    return out


def _param_name(slot: str) -> str | None:
    m = re.fullmatch(r"param_quantizers\['(.+)'\]", slot)
    return m.group(1) if m else None


def quantizer_encoding(q: QuantizeDequantize, tensor: str, channel_axis: int | None = None,
                       key: str = "") -> TensorEncoding:
    """The TensorEncoding of a quantizer for ONNX tensor `tensor` (float encodings for dtype "float")."""
    if q.dtype == "float":
        return TensorEncoding.float_encoding(tensor, q.bitwidth)
    if not q.is_initialized():
        raise ExportError(f"{key or q.name}: quantizer has no encoding (run compute_encodings or load_encodings)",
                          key or q.name)
    scale = q.get_scale().detach().float().cpu().numpy().astype(np.float32)
    offset = np.rint(q.get_offset().detach().float().cpu().numpy()).astype(np.int64)  # what the kernels use
    axis = channel_axis if scale.ndim == 1 else None
    return TensorEncoding(tensor, q.bitwidth, q.symmetric, scale, offset, q.qmin, q.qmax, axis)


# ======================================================================================================= markers


class _Marker(torch.autograd.Function):
    """Identity in torch; a `quantsim::QuantizerMarker(key)` node in the TorchScript ONNX export."""

    @staticmethod
    def forward(ctx, x, key):  # noqa: D401 - torch API
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, key_s=key)
        out.setType(x.type())
        return out


def _marker_forward(key: str):
    def forward(x, *args, **kwargs):
        return _Marker.apply(x, key) if isinstance(x, torch.Tensor) else x

    return forward


def _sync_param_quantizers(sim) -> None:
    """Run each enabled param quantizer on its parameter as the next forward would (recomputes stale encodings)."""
    with torch.no_grad():
        for _, (module, _, slot, q) in _quantizers(sim).items():
            pname = _param_name(slot)
            if pname is None or not q.enabled:
                continue
            p = module._parameters.get(pname)
            if p is not None:
                q(p)


def _identity_forward(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def _marked(sim, mapping_only: bool, identity: bool = False):
    """Every enabled quantizer emits a marker (identity: does nothing); quantized params hold their fake-quantized
    values unless mapping_only."""
    swapped: list[tuple[nn.Module, str, Any]] = []
    patched: list[QuantizeDequantize] = []
    try:
        with torch.no_grad():
            for key, (module, _, slot, q) in _quantizers(sim).items():
                if not q.enabled:
                    continue
                pname = _param_name(slot)
                if pname is not None:
                    p = module._parameters.get(pname)
                    if p is None:
                        continue
                    value = p.detach() if mapping_only else q(p).detach()
                    swapped.append((module, pname, p))
                    module._parameters[pname] = nn.Parameter(value.clone(), requires_grad=False)
                q.forward = _identity_forward if identity else _marker_forward(key)
                patched.append(q)
        yield
    finally:
        for q in patched:
            q.__dict__.pop("forward", None)
        for module, pname, p in reversed(swapped):
            module._parameters[pname] = p


@contextlib.contextmanager
def _full_scope_names():
    """Name ONNX nodes after full module paths ('/layer1.0.conv1/Conv'), not torch's last attribute ('/conv1/Conv').

    The sim's forward calls leaf modules from the root (a flattened fx graph), so torch's default names are ambiguous.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as ts_utils
    except ImportError:  # pragma: no cover - other torch layouts: default names
        yield
        return
    original = getattr(ts_utils, "_setup_trace_module_map", None)
    if original is None:  # pragma: no cover
        yield
        return

    def setup(model, export_modules_as_functions):
        result = original(model, export_modules_as_functions)
        torch.jit._trace._trace_module_map = {
            m: torch._C._jit_onnx_create_full_scope_name(torch.typename(type(m)), n)
            for n, m in model.named_modules()
        }
        return result

    ts_utils._setup_trace_module_map = setup
    try:
        yield
    finally:
        ts_utils._setup_trace_module_map = original


# ================================================================================================ graph surgery


def _is_marker(node) -> bool:
    return node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP


def _marker_key(node) -> str:
    for a in node.attribute:
        if a.name == "key":
            return a.s.decode()
    raise ExportError(f"marker node {node.name} has no key")  # pragma: no cover


def _replace_input(graph, old: str, new: str) -> None:
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def _rename_tensor(graph, old: str, new: str) -> None:
    """Rename a node output (and all its uses)."""
    for n in graph.node:
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
    _replace_input(graph, old, new)


def _remove_node(graph, node) -> None:
    for i, n in enumerate(graph.node):
        if n is node:
            del graph.node[i]
            return


def _undo_initializer_dedup(model: onnx.ModelProto) -> None:
    """torch.onnx shares equal-valued parameters through Identity nodes: give each its own initializer again."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    for node in list(g.node):
        if node.op_type == "Identity" and not node.domain and node.input[0] in inits and node.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            _remove_node(g, node)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _strip_markers(model: onnx.ModelProto, param_keys: set[str], quantizer_module: dict[str, str]):
    """Remove marker nodes; return (tensor -> activation quantizer, initializer -> param quantizer).

    Structural rules (independent of encoding values, so export and reload derive the same names): markers of one
    quantizer on a tensor that nothing else reads collapse onto that tensor; otherwise (other readers see the
    unquantized value, another quantizer already owns the tensor, or several quantizers read it) each quantizer gets
    an Identity node whose output carries its encoding.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    names = {x for n in g.node for x in list(n.input) + list(n.output)} | inits | outputs | graph_inputs
    acts: dict[str, str] = {}
    params: dict[str, str] = {}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in names:
            name = f"{base}_{k}"
            k += 1
        names.add(name)
        return name

    while True:
        markers = [n for n in g.node if _is_marker(n)]
        if not markers:
            break
        x = markers[0].input[0]
        group = [n for n in markers if n.input[0] == x]
        keys = [_marker_key(n) for n in group]
        others = [n for n in g.node if x in n.input and not _is_marker(n)]
        ys = [n.output[0] for n in group]
        is_param = [k in param_keys for k in keys]
        if any(is_param):
            key = keys[is_param.index(True)]
            if not all(is_param) or len(set(keys)) != 1 or others or x not in inits or x in params:
                raise ExportError(f"{quantizer_module.get(key, key)}: parameter '{x}' is also read unquantized or by "
                                  f"another quantizer ({sorted(set(keys))}); ONNX cannot give one initializer two "
                                  "encodings", quantizer_module.get(key, key))
            if any(y in outputs for y in ys):
                raise ExportError(f"{key}: a quantized parameter is a model output", quantizer_module.get(key, key))
            for n, y in zip(group, ys):
                _remove_node(g, n)
                _replace_input(g, y, x)
            params[x] = key
            continue
        collapse = len(set(keys)) == 1 and not others and x not in acts and x not in outputs
        target = x
        out_ys = [y for y in ys if y in outputs]
        if collapse and out_ys:
            if len(out_ys) > 1 or x in graph_inputs or x in inits:
                collapse = False
            else:
                target = out_ys[0]
        if collapse:
            for n in group:
                _remove_node(g, n)
            if target != x:
                for y in ys:
                    if y != target:
                        _replace_input(g, y, x)
                _rename_tensor(g, x, target)
            else:
                for y in ys:
                    _replace_input(g, y, x)
            acts[target] = keys[0]
            continue
        # Identity per quantizer: its output is the quantized tensor only that quantizer's consumers read.
        for key in dict.fromkeys(keys):
            mine = [(n, y) for n, y, k in zip(group, ys, keys) if k == key]
            out_name = next((y for _, y in mine if y in outputs), None) or fresh(key)
            first = mine[0][0]
            pos = next(i for i, n in enumerate(g.node) if n is first)
            ident = helper.make_node("Identity", [x], [out_name], name=fresh(f"/{quantizer_module.get(key, key)}/"
                                                                               f"{key}/Identity"))
            g.node.insert(pos, ident)
            for n, y in mine:
                _remove_node(g, n)
                if y != out_name:
                    _replace_input(g, y, out_name)
            acts[out_name] = key
    return acts, params


def _fold_param_transposes(model: onnx.ModelProto, params: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Transpose(param) nodes (nn.Linear on 3-D inputs -> MatMul(x, W^T)): store W^T under the param's name."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    perms: dict[str, tuple[int, ...]] = {}
    for node in list(g.node):
        if node.op_type != "Transpose" or node.domain or node.input[0] not in params:
            continue
        p = node.input[0]
        readers = [n for n in g.node if p in n.input]
        if len(readers) != 1 or node.output[0] in {o.name for o in g.output}:
            continue
        arr = numpy_helper.to_array(inits[p])
        perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"), tuple(reversed(range(arr.ndim))))
        new = numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), p)
        inits[p].CopyFrom(new)
        _remove_node(g, node)
        _replace_input(g, node.output[0], p)
        perms[p] = perm
    return perms


def _node_module(node_name: str, modules: set[str]) -> str | None:
    """The module a node belongs to, from its scoped name ('/layer1.0.conv1/Conv' -> 'layer1.0.conv1')."""
    parts = [p for p in node_name.split("/") if p]
    for part in reversed(parts[:-1]):
        if part in modules:
            return part
        base = re.sub(r"_\d+$", "", part)
        if base in modules:
            return base
    return None


def _module_calling(sim, args, op_name: str) -> str | None:
    """The innermost module whose forward runs the aten op `op_name` (one sim forward under a dispatch recorder)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {m: n for n, m in sim.model.named_modules() if n}
    stack: list[str | None] = []
    found: list[str] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            if not found and func._schema.name == op_name:
                found.append(next((n for n in reversed(stack) if n), ""))
            return func(*a, **(kw or {}))

    def push(m, i):
        stack.append(names.get(m))

    def pop(m, i, o):  # returns None: a forward hook's return value would replace the output
        if stack:
            stack.pop()

    pre = register_module_forward_pre_hook(push)
    post = register_module_forward_hook(pop)
    try:
        with torch.no_grad(), eval_mode(sim.model), _marked(sim, mapping_only=True, identity=True), _Recorder():
            sim.model(*args)
    except Exception:  # noqa: BLE001 - best effort: only used to name the culprit of another error
        pass
    finally:
        pre.remove()
        post.remove()
    return found[0] if found and found[0] else None


def _module_from_error(message: str, modules: set[str]) -> str | None:
    """The innermost module named by a torch.onnx error's scope ('scope: ...::layer1.0.conv1')."""
    found = None
    for scope in re.findall(r"scope: (\S+)", message):
        for part in scope.split("::")[1:]:
            name = part.split("/")[0]
            if name in modules:
                found = name
    return found


# ======================================================================================================== export


def _reraise_tracer_warnings(caught: list) -> None:
    """torch.onnx's deprecation chatter is dropped; a TracerWarning (a data-dependent branch or value frozen into
    the graph by the trace) is passed on: the exported graph may then differ from the sim on other inputs."""
    seen = set()
    own = os.path.dirname(os.path.abspath(__file__))  # quantizer state checks (bool(buffer)) are not data flow
    for w in caught:
        if os.path.dirname(os.path.abspath(w.filename)) == own:
            continue
        if issubclass(w.category, torch.jit.TracerWarning) and str(w.message) not in seen:
            seen.add(str(w.message))
            warnings.warn(f"export: {w.message}", torch.jit.TracerWarning, stacklevel=4)


def _as_args(dummy_input) -> tuple:
    if dummy_input is None:
        raise ExportError("a dummy_input is needed to trace the model (pass dummy_input=, or give the sim one)")
    return tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)


def _default_names(n: int, base: str) -> list[str]:
    return [base] if n == 1 else [f"{base}{i}" for i in range(n)]


def export_onnx(sim, dummy_input=None, *, opset_version: int = DEFAULT_OPSET, input_names=None, output_names=None,
                dynamic_batch: bool = True, mapping_only: bool = False) -> OnnxExport:
    """The sim's float ONNX graph (fake-quantized weights) with the owner of every encoded tensor.

    mapping_only: structure and names only (quantizers need no encodings; weights stay float) -- used by
    load_encodings to map an encodings file's tensor names back to quantizers.
    """
    if getattr(sim, "_emulating", False):
        raise ExportError("export_onnx: the sim is inside emulate_onnxruntime(); export it outside that context")
    args = _as_args(dummy_input if dummy_input is not None else sim.dummy_input)
    quantizers = _quantizers(sim)
    modules = {n for n, _ in sim.model.named_modules() if n}
    qmodule = {k: v[1] for k, v in quantizers.items()}
    param_keys = {k for k, v in quantizers.items() if _param_name(v[2]) is not None}
    input_names = list(input_names) if input_names else _default_names(len(args), "input")
    output_names = list(output_names) if output_names else None
    dynamic_axes = {n: {0: "batch"} for n in input_names + (output_names or [])} if dynamic_batch else None
    if not mapping_only:
        _sync_param_quantizers(sim)
        for key, (_, mname, _, q) in quantizers.items():
            if q.enabled and q.dtype != "float" and not q.is_initialized() and key not in param_keys:
                raise ExportError(f"{key}: quantizer has no encoding (run compute_encodings or load_encodings)", mname)
    buf = io.BytesIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(sim.model))
        stack.enter_context(_marked(sim, mapping_only))
        stack.enter_context(_full_scope_names())
        caught: list = []
        stack.callback(_reraise_tracer_warnings, caught)  # registered first: runs after catch_warnings has exited
        caught_now = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        stack.callback(lambda: caught.extend(caught_now))
        try:
            torch.onnx.export(
                sim.model, args, buf, dynamo=False, opset_version=int(opset_version), input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=False,
                custom_opsets={MARKER_DOMAIN: 1},
            )
        except Exception as e:  # noqa: BLE001 - torch.onnx raises many types; report the module
            msg = str(e)
            module = _module_from_error(msg, modules)
            aten = re.search(r"'(aten::\w+)'", msg)
            if module is None and aten:
                module = _module_calling(sim, args, aten.group(1))
            head = next((line for line in msg.splitlines() if line.strip()), type(e).__name__)
            where = f"module '{module}'" if module else "the model"
            if module is None and sim._captured.float_ops:
                where += f" (ops the sim leaves in float: {', '.join(sim._captured.float_ops)})"
            raise ExportError(f"{where}: torch.onnx cannot export it: {head}", module) from e
    model = onnx.load_from_string(buf.getvalue())
    if output_names is None:  # torch names outputs after their producers: call them output / output0, output1, ...
        outs = [o.name for o in model.graph.output]
        for old, new in zip(outs, _default_names(len(outs), "output")):
            if old != new:
                _rename_tensor(model.graph, old, new)
                next(o for o in model.graph.output if o.name == old).name = new
    _undo_initializer_dedup(model)
    acts, params = _strip_markers(model, param_keys, qmodule)
    perms = _fold_param_transposes(model, params)
    _drop_unused_initializers(model)
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", int(opset_version))])
    model.producer_name = "quantsim"
    node_modules = {}
    for n in model.graph.node:
        m = _node_module(n.name, modules)
        if m is not None:
            node_modules[n.name] = m
    axes: dict[str, int | None] = {}
    for tensor, key in params.items():
        q = quantizers[key][3]
        axis = q.channel_axis
        if axis is not None and tensor in perms:
            axis = perms[tensor].index(axis)
        axes[tensor] = axis
    result = OnnxExport(model, acts, params, axes, None, node_modules)
    if not mapping_only:
        result.encodings = _encodings(sim, result, quantizers)
    return result


def _quantizer_args(sim) -> dict:
    d = sim.config.defaults
    return {
        "activation_bitwidth": sim.default_output_bw,
        "dtype": "int",
        "is_symmetric": str(bool(d.param_is_symmetric)),
        "param_bitwidth": sim.default_param_bw,
        "per_channel_quantization": str(bool(sim.config.per_channel_default())),
        "quant_scheme": sim.quant_scheme.value,
    }


def _encodings(sim, ox: OnnxExport, quantizers) -> Encodings:
    from . import __version__

    enc = Encodings(version="1.0.0", excluded_layers=[], quantizer_args=_quantizer_args(sim),
                    extra={"producer": {"package": "quantsim", "version": __version__}})
    for tensor, key in ox.activations.items():
        module, mname, _, q = quantizers[key]
        enc.add_activation(quantizer_encoding(q, tensor, 1, key))
    for tensor, key in ox.params.items():
        module, mname, slot, q = quantizers[key]
        te = quantizer_encoding(q, tensor, ox.param_axes.get(tensor), key)
        if te.per_channel:
            dims = _init_shape(ox.model, tensor)
            axis = te.channel_axis
            if q.groups > 1 or axis is None or dims is None or dims[axis] != te.scale.size:
                raise ExportError(f"{mname}: per-channel encoding of '{tensor}' ({te.scale.size} channels) has no "
                                  f"per-axis ONNX form (tensor shape {dims}, axis {axis}, groups {q.groups})", mname)
        enc.add_param(te)
    seen = set(ox.activations.values()) | set(ox.params.values())
    missing = [k for k, v in quantizers.items() if v[3].enabled and k not in seen]
    if missing:
        warnings.warn(f"export: {len(missing)} enabled quantizer(s) are not on the traced path of dummy_input and have "
                      f"no entry (first: {missing[0]})", stacklevel=3)
    return enc


def _init_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    for i in model.graph.initializer:
        if i.name == name:
            return tuple(i.dims)
    return None


def _module_for(ox: OnnxExport, err: QDQError | EncodingsError) -> str | None:
    node = getattr(err, "node", None)
    tensor = getattr(err, "tensor", None)
    if node and node in ox.node_modules:
        return ox.node_modules[node]
    owner = ox.owner(tensor) if tensor else None
    if owner:
        return owner.split(".input_quantizers[")[0].split(".output_quantizers[")[0].split(".param_quantizers[")[0]
    if tensor:  # a tensor produced by a node of a module
        for n in ox.model.graph.node:
            if tensor in n.output and n.name in ox.node_modules:
                return ox.node_modules[n.name]
    return None


def _float_op_owner(sim, node_name: str | None) -> str | None:
    """The owner module of the one float op of the sim matching an ONNX node at root scope ('/Sin' -> 'inner')."""
    if not node_name:
        return None
    op = re.sub(r"_\d+$", "", node_name.rstrip("/").rsplit("/", 1)[-1]).lower()
    hits = []
    for entry in sim._captured.float_ops:
        name, _, label = entry.rpartition(" (")
        if label.rstrip(")").lower().replace("_", "") == op:
            hits.append(name)
    if len(hits) != 1:
        return None
    owner = hits[0].rpartition(".")[0]
    return owner or None


def _float_sandwiched_types(ox: OnnxExport) -> tuple[str, ...]:
    """Op types with no integer form whose every instance reads dequantized inputs and writes a quantized output:
    they run in float between a DQ and a Q exactly as the sim computes them (LayerNorm, GELU, ...)."""
    known = set(_qdq.COMPUTE_OPS + _qdq.BINARY_OPS + _qdq.VARIADIC_OPS + _qdq.UNARY_OPS + _qdq.PASSTHROUGH_OPS
                + _qdq.FLOAT_OK_OPS) | {"BatchNormalization"}
    g = ox.model.graph
    inits = {i.name for i in g.initializer}
    encoded = set(ox.activations)
    producer = {o: n for n in g.node for o in n.output}

    def has_enc(t: str) -> bool:
        seen = 0
        while t not in encoded and seen < 16:
            p = producer.get(t)
            if p is None or p.op_type not in _qdq.PASSTHROUGH_OPS:
                return False
            t = p.input[0]
            seen += 1
        return t in encoded

    ok: dict[str, bool] = {}
    for n in g.node:
        if n.op_type in known or n.domain not in ("", "ai.onnx"):
            continue
        data_in = [x for x in n.input if x and x not in inits]
        sandwiched = bool(data_in) and all(has_enc(x) for x in data_in) and all(o in encoded for o in n.output if o)
        ok[n.op_type] = ok.get(n.op_type, True) and sandwiched
    return tuple(sorted(t for t, v in ok.items() if v))


def _check_writable_dir(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"export: directory {path!r} does not exist (or is not a directory)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"export: directory {path!r} is not writable")
    return path


def _without_int32_bias(enc: Encodings) -> Encodings:
    """The encodings minus derived int32 bias entries: the QDQ builder makes the same int32 bias (scale = input scale
    x weight scale) from the on-grid float bias itself, and treats a bias it finds encoded as an activation."""
    params = {k: v for k, v in enc.params.items() if v.bitwidth != 32}
    if len(params) == len(enc.params):
        return enc
    return dataclasses.replace(enc, params=params)


def export(sim, path, filename_prefix: str, dummy_input=None, *, encoding_version: str = "1.0.0", qdq: bool = True,
           qdq_options: QDQOptions | None = None, opset_version: int = DEFAULT_OPSET, input_names=None,
           output_names=None, dynamic_batch: bool = True, process_group=None) -> ExportPaths:
    """Write <prefix>.onnx, <prefix>.encodings, <prefix>_qdq.onnx and <prefix>.safetensors into `path`, all or none.

    Raises ExportError naming the module when a part of the sim has no ONNX / integer QDQ form (qdq=False skips the
    QDQ model), EncodingsError for an unsupported version, OSError for an unwritable path (nothing is written).
    Under torch.distributed (or with `process_group`) every rank calls it: rank 0 writes, the others wait for it and
    return its paths or raise its error.
    """
    return on_rank_zero(lambda: _export(sim, path, filename_prefix, dummy_input, encoding_version=encoding_version,
                                        qdq=qdq, qdq_options=qdq_options, opset_version=opset_version,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_batch=dynamic_batch), resolve_group(process_group))


def _export(sim, path, filename_prefix: str, dummy_input, *, encoding_version: str, qdq: bool,
            qdq_options: QDQOptions | None, opset_version: int, input_names, output_names,
            dynamic_batch: bool) -> ExportPaths:
    path = _check_writable_dir(path)
    if not filename_prefix or os.sep in filename_prefix:
        raise ValueError(f"filename_prefix must be a plain file name prefix, got {filename_prefix!r}")
    ox = export_onnx(sim, dummy_input, opset_version=opset_version, input_names=input_names,
                     output_names=output_names, dynamic_batch=dynamic_batch)
    enc = ox.encodings
    try:
        enc_json = json.dumps(dump_encodings(enc, encoding_version, ox.model), indent=4, sort_keys=True,
                              allow_nan=False) + "\n"
        onnx.checker.check_model(ox.model)
    except EncodingsError as e:
        if e.tensor is None:  # e.g. an unsupported version
            raise
        module = _module_for(ox, e)
        raise ExportError(f"module '{module}': {e}" if module else str(e), module) from e
    float_ops: tuple[str, ...] = ()
    qdq_bytes = None
    if qdq:
        float_ops = _float_sandwiched_types(ox)
        opts = _copy_options(qdq_options)
        opts.allow_float_ops = tuple(sorted(set(opts.allow_float_ops) | set(float_ops)))
        try:
            qdq_model = build_qdq(ox.model, _without_int32_bias(enc), opts)
        except (QDQError, EncodingsError) as e:
            module = _module_for(ox, e) or _float_op_owner(sim, getattr(e, "node", None))
            where = f"module '{module}'" if module else "the model"
            if sim._captured.float_ops:  # functional ops the root's traced forward runs (no module scope in ONNX)
                where += f" (ops the sim leaves in float: {', '.join(sim._captured.float_ops)})"
            raise ExportError(f"{where} cannot be exported as an integer QDQ graph: {e} (qdq=False writes the float "
                              "ONNX and encodings only)", module) from e
        qdq_bytes = qdq_model.SerializeToString()
    files = {
        os.path.join(path, f"{filename_prefix}.onnx"): ox.model.SerializeToString(),
        os.path.join(path, f"{filename_prefix}.encodings"): enc_json.encode("utf-8"),
        os.path.join(path, f"{filename_prefix}.safetensors"): state_bytes(sim),
    }
    qdq_path = os.path.join(path, f"{filename_prefix}_qdq.onnx") if qdq else None
    if qdq_path:
        files[qdq_path] = qdq_bytes
    _write_all(files)
    p = os.path.join(path, filename_prefix)
    return ExportPaths(f"{p}.onnx", f"{p}.encodings", qdq_path, f"{p}.safetensors", float_ops)


def _copy_options(options: QDQOptions | None) -> QDQOptions:
    if options is None:
        return QDQOptions()
    return QDQOptions(options.int8_activations, options.allow_16bit, tuple(options.allow_float_ops))


# ================================================================================================= load encodings


def _check_grid(q: QuantizeDequantize, te: TensorEncoding, version: str, where: str) -> tuple[int, int, np.ndarray]:
    """(qmin, qmax, offset) putting `te`'s values on q's grid, or EncodingsError naming the tensor."""
    name = te.name
    if te.bitwidth != q.bitwidth:
        raise EncodingsError(f"{name}: bitwidth {te.bitwidth} does not fit {where} (bitwidth {q.bitwidth})", name)
    kind = te.kind
    b = q.bitwidth
    if not q.symmetric:
        if kind in ("asymmetric", "unsigned"):
            return te.qmin, te.qmax, te.offset
        if kind == "signed":  # same values as the unsigned grid with offset -2^(b-1)
            return 0, 2**b - 1, te.offset - 2 ** (b - 1)
        raise EncodingsError(f"{name}: a {kind} symmetric grid does not fit the asymmetric {where}", name)
    if np.any(te.offset != 0) and kind == "asymmetric" and np.all(te.offset == -(2 ** (b - 1))):
        kind = "signed"  # signed grid written on uintN with zero point 2^(b-1)
    elif kind == "asymmetric" and np.all(te.offset == 0):
        kind = "unsigned"  # 2.0.0 writes unsigned symmetric as uintN without zero point
    if kind == "signed":
        if q.strict_symmetric and version == "2.0.0":  # 2.0.0 cannot mark strict grids
            return q.qmin, q.qmax, np.zeros_like(te.offset)
        if q.strict_symmetric:
            raise EncodingsError(f"{name}: full signed grid does not fit the strict symmetric {where}", name)
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1, np.zeros_like(te.offset)
    if kind == "strict":
        if not q.strict_symmetric:
            raise EncodingsError(f"{name}: strict symmetric grid does not fit the symmetric {where}", name)
        return te.qmin, te.qmax, np.zeros_like(te.offset)
    if kind == "unsigned":
        if not q.unsigned_symmetric:
            raise EncodingsError(f"{name}: unsigned symmetric grid does not fit {where} (unsigned_symmetric is off)",
                                 name)
        return 0, 2**b - 1, np.zeros_like(te.offset)
    raise EncodingsError(f"{name}: asymmetric encoding (offset {te.offset.reshape(-1)[:4].tolist()}) does not fit "
                         f"the symmetric {where}", name)


def _apply(q: QuantizeDequantize, te: TensorEncoding, version: str, key: str, freeze: bool) -> None:
    _apply_dry(q, te, key)
    if te.is_float:
        return
    shape = tuple(q.scale.shape)
    qmin, qmax, offset = _check_grid(q, te, version, f"quantizer {key}")
    q.qmin, q.qmax = int(qmin), int(qmax)
    dev = q.scale.device
    q.set_encoding(torch.as_tensor(te.scale, dtype=torch.float32, device=dev).reshape(shape),
                   torch.as_tensor(offset.astype(np.float32), device=dev).reshape(shape), freeze=freeze)


def load_encodings(sim, encodings, *, dummy_input=None, partial: bool = True, mapping: OnnxExport | None = None,
                   **export_kwargs):
    """Load an AIMET encodings file (0.6.1 / 1.0.0 / 2.0.0, ours or AIMET's) into the sim's quantizers.

    Param entries are keyed by parameter path ('layer1.0.conv1.weight') and loaded frozen; activation entries by the
    ONNX tensor names `export` writes, recovered by a marker export on `dummy_input` (default: the sim's). Raises
    EncodingsError naming the first tensor that does not fit; partial=False also requires every enabled quantizer.
    export_kwargs (input_names, output_names, opset_version) must match those given to `export`, if any.
    """
    enc = encodings if isinstance(encodings, Encodings) else read_encodings(os.fspath(encodings))
    quantizers = _quantizers(sim)
    param_tensors: dict[str, str] = {}
    for key, (module, mname, slot, q) in quantizers.items():
        pname = _param_name(slot)
        if pname is not None:
            param_tensors[f"{mname}.{pname}" if mname else pname] = key
    entries = list(enc.activations.values()) + list(enc.params.values())
    need_map = any(te.name not in param_tensors for te in entries)
    acts: dict[str, str] = {}
    if need_map:
        if mapping is None:
            if dummy_input is None and sim.dummy_input is None:
                first = next(te.name for te in entries if te.name not in param_tensors)
                raise EncodingsError(f"{first}: activation tensor names need a dummy_input to trace the model "
                                     "(pass dummy_input= or create the sim with one)", first)
            mapping = export_onnx(sim, dummy_input, mapping_only=True, **export_kwargs)
        acts = dict(mapping.activations)
        for t, key in mapping.params.items():
            param_tensors.setdefault(t, key)
    plan: list[tuple[QuantizeDequantize, TensorEncoding, str, bool]] = []
    assigned: dict[str, TensorEncoding] = {}
    for te in entries:  # check every entry, in file order, before changing any quantizer
        key = param_tensors.get(te.name) or acts.get(te.name)
        if key is None:
            raise EncodingsError(f"{te.name}: no quantizer of the sim quantizes this tensor (not a quantized "
                                 "parameter path nor an activation tensor of the exported graph)", te.name)
        q = quantizers[key][3]
        if not q.enabled:
            raise EncodingsError(f"{te.name}: its quantizer {key} is disabled in the sim", te.name)
        prev = assigned.get(key)
        if prev is not None and not prev.same_as(te, check_name=False):
            raise EncodingsError(f"{te.name}: quantizer {key} already gets a different encoding from "
                                 f"'{prev.name}'", te.name)
        _apply_dry(q, te, key)
        if not te.is_float:
            _check_grid(q, te, enc.version, f"quantizer {key}")
        assigned[key] = te
        plan.append((q, te, key, _param_name(quantizers[key][2]) is not None))
    if not partial:
        missing = [k for k, v in quantizers.items() if v[3].enabled and k not in assigned]
        if missing:
            raise EncodingsError(f"{missing[0]}: enabled quantizer has no entry in the encodings "
                                 f"({len(missing)} missing)", missing[0])
    for q, te, key, is_param in plan:
        _apply(q, te, enc.version, key, freeze=is_param)
    return enc


def _apply_dry(q: QuantizeDequantize, te: TensorEncoding, key: str) -> None:
    where = f"quantizer {key}"
    if te.is_float or q.dtype == "float":
        if te.is_float != (q.dtype == "float") or te.bitwidth != q.bitwidth:
            raise EncodingsError(f"{te.name}: {'float' if te.is_float else 'int'}{te.bitwidth} encoding does not fit "
                                 f"{where} ({q.dtype}{q.bitwidth})", te.name)
        return
    shape = tuple(q.scale.shape)
    if te.per_channel != bool(shape) or (shape and te.scale.size != shape[0]):
        want = f"{shape[0]} channels" if shape else "per tensor"
        got = f"{te.scale.size} channels" if te.per_channel else "per tensor"
        raise EncodingsError(f"{te.name}: {got} but {where} is {want}", te.name)
    if not np.all(np.isfinite(te.scale)) or np.any(te.scale <= 0):
        raise EncodingsError(f"{te.name}: scale must be finite and > 0", te.name)


# ================================================================================================ safetensors state


def _quantizer_meta(q: QuantizeDequantize) -> dict:
    return {"enabled": bool(q.enabled), "frozen": bool(q.frozen), "bitwidth": q.bitwidth, "symmetric": q.symmetric,
            "strict_symmetric": q.strict_symmetric, "unsigned_symmetric": q.unsigned_symmetric, "qmin": int(q.qmin),
            "qmax": int(q.qmax), "channel_axis": q.channel_axis, "dtype": q.dtype, "learn_ranges": bool(q.learn_ranges)}


def state_bytes(sim) -> bytes:
    """The sim's weights and quantizer state as safetensors bytes (quantizer flags in the metadata)."""
    from safetensors.torch import save

    _sync_param_quantizers(sim)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sim.model.state_dict().items()}
    meta = {k: _quantizer_meta(v[3]) for k, v in _quantizers(sim).items()}
    return save(tensors, metadata={"format": _STATE_FORMAT, "quantizers": json.dumps(meta, sort_keys=True)})


def save_state(sim, path, process_group=None) -> str:
    """Write the sim's state (weights, encodings, quantizer flags) to a safetensors file, atomically. Under
    torch.distributed (or with `process_group`) every rank calls it and rank 0 writes, as in `export`."""
    path = os.fspath(path)

    def write() -> str:
        _check_writable_dir(os.path.dirname(os.path.abspath(path)))
        _write_all({path: state_bytes(sim)})
        return path

    return on_rank_zero(write, resolve_group(process_group))


def load_state(sim, path) -> None:
    """Restore a state written by save_state/export into a sim of the same model and config (bit-identical forward)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path}: not a quantsim state file (format {meta.get('format')!r})")
    info = json.loads(meta["quantizers"])
    quantizers = _quantizers(sim)
    for key in quantizers:
        if key not in info:
            raise ValueError(f"{path}: no state for quantizer {key} (a different model or config?)")
    for key in info:
        if key not in quantizers:
            raise ValueError(f"{path}: quantizer {key} does not exist in this sim (a different model or config?)")
    tensors = load_file(path)
    own = sim.model.state_dict()
    for k, v in own.items():  # the sim's order: the first mismatch is the first in the model
        if k not in tensors:
            raise ValueError(f"{path}: no {k} ({sum(1 for x in own if x not in tensors)} state_dict entries missing)")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the sim has {tuple(v.shape)}")
    extra = [k for k in tensors if k not in own]
    if extra:
        raise ValueError(f"{path}: {extra[0]} is not in the sim's state_dict")
    sim.model.load_state_dict(tensors, strict=True)
    for key, (module, _, slot, q) in quantizers.items():
        m = info[key]
        q.enabled, q.frozen = bool(m["enabled"]), bool(m["frozen"])
        q.qmin, q.qmax = int(m["qmin"]), int(m["qmax"])
        q.learn_ranges = bool(m["learn_ranges"])
        pname = _param_name(slot)
        p = module._parameters.get(pname) if pname else None
        if p is not None:  # the loaded encoding is current for the loaded weights: no recompute on the next forward
            q._seen_version = (p.data_ptr(), p._version)


# ======================================================================================================= fidelity


def _capture_quantizer_outputs(sim, args) -> tuple[dict[str, np.ndarray], Any]:
    """Outputs of every enabled activation quantizer (by name) and the model output, for one forward."""
    caps: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    hooks = []

    def hook(key):
        def fn(mod, inp, out):
            calls[key] = calls.get(key, 0) + 1
            caps[key] = out.detach().float().cpu().numpy().copy()  # copy: in-place ops (ReLU) run later
        return fn

    for key, (_, _, slot, q) in _quantizers(sim).items():
        if q.enabled and _param_name(slot) is None:
            hooks.append(q.register_forward_hook(hook(key)))
    try:
        with torch.no_grad(), eval_mode(sim.model):
            out = sim.model(*args)
    finally:
        for h in hooks:
            h.remove()
    return {k: v for k, v in caps.items() if calls[k] == 1}, out


def onnxruntime_fidelity(sim, qdq_model, inputs, *, teacher_forced: bool = False, mapping: OnnxExport | None = None,
                         threads: int = 1, emulate: bool = False) -> dict:
    """How far onnxruntime's QDQ model is from the sim, in LSBs of each quantized tensor's encoding.

    End to end (default): the model outputs. teacher_forced: every quantized tensor is computed by onnxruntime from the
    sim's own quantized inputs (the consumers of each QuantizeLinear read the sim's integers), so each layer is checked
    on its own: rounding differences cannot compound through depth. emulate: the sim runs inside
    emulate_onnxruntime() (its report is under "emulation"). Returns per-tensor and overall fractions of elements
    within one LSB, exact fractions and the largest difference (LSBs).
    """
    from export.runner import make_session

    args = _as_args(inputs)
    model = qdq_model if isinstance(qdq_model, onnx.ModelProto) else onnx.load(os.fspath(qdq_model))
    model = onnx.ModelProto.FromString(model.SerializeToString())
    mapping = mapping or export_onnx(sim, tuple(a[:1] for a in args), mapping_only=True)
    from .emulation import emulate_onnxruntime

    with emulate_onnxruntime(sim) if emulate else contextlib.nullcontext() as emulation:
        caps, out = _capture_quantizer_outputs(sim, args)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    graph_inputs = [i.name for i in g.input if i.name not in inits]
    feeds = {n: a.detach().float().cpu().numpy() for n, a in zip(graph_inputs, args)}
    checks: list[tuple[str, str, np.ndarray, float, int]] = []  # (tensor, output name, sim value, scale, zero point)
    if teacher_forced:
        for node in list(g.node):
            if node.op_type != "QuantizeLinear":
                continue
            src = node.input[0]
            tensor = src if src in mapping.activations else (src[:-6] if src.endswith("_float") else src)
            key = mapping.activations.get(tensor)
            if key is None or key not in caps:
                continue
            scale = float(inits[node.input[1]])
            zp_arr = inits[node.input[2]]
            ref = caps[key]
            qname = node.output[0]
            if src not in graph_inputs:
                forced = f"{qname}__forced"
                u = np.rint(ref.astype(np.float64) / scale) + int(zp_arr)
                info = np.iinfo(zp_arr.dtype)
                feeds[forced] = np.clip(u, info.min, info.max).astype(zp_arr.dtype)
                for n in g.node:
                    for i, x in enumerate(n.input):
                        if x == qname and n is not node:
                            n.input[i] = forced
                g.input.append(helper.make_tensor_value_info(forced, helper.np_dtype_to_tensor_dtype(zp_arr.dtype),
                                                             list(ref.shape)))
            g.output.append(helper.make_tensor_value_info(qname, helper.np_dtype_to_tensor_dtype(zp_arr.dtype), None))
            checks.append((tensor, qname, ref, scale, int(zp_arr)))
    else:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o, ref in zip(g.output, outs):
            te = mapping.activations.get(o.name)
            q = _quantizers(sim)[te][3] if te else None
            if q is None or q.dtype == "float" or q.get_scale() is None or q.get_scale().numel() != 1:
                continue
            checks.append((o.name, o.name, ref.detach().float().cpu().numpy(), float(q.get_scale()), None))
    sess = make_session(model, threads=threads)
    results = sess.run([c[1] for c in checks], feeds)
    report: dict[str, Any] = {"tensors": {}}
    total = within = exact = 0
    worst = 0.0
    for (tensor, _, ref, scale, zp), got in zip(checks, results):
        got = got.astype(np.float64)
        val = (got - zp) * scale if zp is not None else got
        d = np.abs(val - ref.astype(np.float64)) / scale
        w, e, m = int((d <= 1.0 + 1e-3).sum()), int((d < 1e-3).sum()), float(d.max()) if d.size else 0.0
        report["tensors"][tensor] = {"quantizer": mapping.activations.get(tensor), "within_1": w / max(d.size, 1),
                                     "exact": e / max(d.size, 1), "max_lsb": m}
        total, within, exact, worst = total + d.size, within + w, exact + e, max(worst, m)
    report.update({"within_1": within / max(total, 1), "exact": exact / max(total, 1), "max_lsb": worst,
                   "elements": total, "teacher_forced": teacher_forced, "emulation": emulation})
    if not teacher_forced:
        refs = [c[2] for c in checks]
        if refs and refs[0].ndim == 2:
            report["top1_agreement"] = float((refs[0].argmax(1) == results[0].argmax(1)).mean())
    return report
