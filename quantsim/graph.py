"""Graph capture: torch.fx trace -> a GraphModule with functional ops as modules, and its OpGraph.

Known layers (and user subclasses of them, which keep their own forward) are fx leaves. A submodule that
cannot be traced becomes an opaque leaf (with a warning naming it); if the root itself cannot be traced,
capture falls back to the leaf modules (edges recorded with hooks when a dummy input is given).
"""
from __future__ import annotations

import copy
import operator
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as qnn
from .ir import MODEL_INPUT, OpGraph, OpNode

# ----------------------------------------------------------------------------- op tables (one place)

#: torch module class -> ONNX op type. Subclasses map like their base.
MODULE_OP_TYPES: dict[type, str] = {
    nn.Conv1d: "Conv", nn.Conv2d: "Conv", nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose", nn.ConvTranspose2d: "ConvTranspose", nn.ConvTranspose3d: "ConvTranspose",
    nn.Linear: "Gemm",
    nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization", nn.BatchNorm3d: "BatchNormalization",
    nn.SyncBatchNorm: "BatchNormalization",
    nn.LayerNorm: "LayerNormalization", nn.GroupNorm: "GroupNormalization",
    nn.Embedding: "Gather",
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.Hardtanh: "Clip", nn.GELU: "Gelu", nn.SiLU: "Swish",
    nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh",
    nn.Softmax: "Softmax", nn.LogSoftmax: "LogSoftmax", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu",
    nn.ELU: "Elu",
    nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.MaxPool3d: "MaxPool",
    nn.AvgPool1d: "AveragePool", nn.AvgPool2d: "AveragePool", nn.AvgPool3d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool", nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.AdaptiveAvgPool3d: "GlobalAveragePool",
    nn.AdaptiveMaxPool1d: "GlobalMaxPool", nn.AdaptiveMaxPool2d: "GlobalMaxPool", nn.AdaptiveMaxPool3d: "GlobalMaxPool",
    qnn.Add: "Add", qnn.Sub: "Sub", qnn.Mul: "Mul", qnn.Div: "Div", qnn.MatMul: "MatMul", qnn.Concat: "Concat",
}

#: Modules that only move data (or do nothing in eval): transparent for placement, never quantized.
TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

#: call_function / call_method targets that only move data: transparent, never quantized.
TRANSPARENT_CALLS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    operator.getitem, torch.chunk, torch.split, F.dropout, torch.t,
    "flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
    "split", "expand", "expand_as", "repeat", "t", "to", "float", "type_as", "clone", "detach", "unflatten",
    torch.unflatten,
}

#: call_function / call_method targets whose result is not a tensor.
NON_TENSOR_CALLS = {"size", "dim", "numel", getattr, len}


def op_type_of(module: nn.Module) -> str:
    """ONNX op type of a module ("" when quantsim does not know it). Subclasses map like their base."""
    for cls in type(module).__mro__:
        if cls in MODULE_OP_TYPES:
            op = MODULE_OP_TYPES[cls]
            if op == "GlobalAveragePool" and not _is_global(module):
                return "AveragePool"
            if op == "GlobalMaxPool" and not _is_global(module):
                return "MaxPool"
            return op
    return ""


def _is_global(module: nn.Module) -> bool:
    size = getattr(module, "output_size", 1)
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def is_known_layer(module: nn.Module) -> bool:
    return op_type_of(module) != ""


# ----------------------------------------------------------------------------- functional -> module


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _binary(cls: type) -> Callable[[fx.Node], tuple[nn.Module, tuple] | None]:
    def make(node: fx.Node):
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None or len(node.args) != 2:
            return None
        return cls(), tuple(node.args)

    return make


def _unary(factory: Callable[[fx.Node], nn.Module]) -> Callable[[fx.Node], tuple[nn.Module, tuple] | None]:
    def make(node: fx.Node):
        return factory(node), (node.args[0],)

    return make


def _cat(node: fx.Node):
    tensors = _arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)):
        return None
    return qnn.Concat(_arg(node, 1, "dim", 0)), tuple(tensors)


def _softmax(node: fx.Node):
    if node.kwargs.get("dtype") is not None:
        return None
    return nn.Softmax(dim=_arg(node, 1, "dim")), (node.args[0],)


_add, _sub, _mul, _div, _matmul = (_binary(c) for c in (qnn.Add, qnn.Sub, qnn.Mul, qnn.Div, qnn.MatMul))

#: functional target -> (base name for the new module, factory returning (module, new positional args) or None)
FUNCTION_MODULES: dict[Any, tuple[str, Callable]] = {
    operator.add: ("add", _add), operator.iadd: ("add", _add), torch.add: ("add", _add), "add": ("add", _add),
    operator.sub: ("sub", _sub), operator.isub: ("sub", _sub), torch.sub: ("sub", _sub), "sub": ("sub", _sub),
    operator.mul: ("mul", _mul), operator.imul: ("mul", _mul), torch.mul: ("mul", _mul), "mul": ("mul", _mul),
    operator.truediv: ("div", _div), operator.itruediv: ("div", _div), torch.div: ("div", _div), "div": ("div", _div),
    operator.matmul: ("matmul", _matmul), torch.matmul: ("matmul", _matmul), torch.bmm: ("matmul", _matmul),
    "matmul": ("matmul", _matmul), "bmm": ("matmul", _matmul),
    torch.cat: ("cat", _cat), torch.concat: ("cat", _cat), torch.concatenate: ("cat", _cat),
    torch.relu: ("relu", _unary(lambda n: nn.ReLU())), F.relu: ("relu", _unary(lambda n: nn.ReLU())),
    "relu": ("relu", _unary(lambda n: nn.ReLU())),
    F.relu6: ("relu6", _unary(lambda n: nn.ReLU6())),
    F.gelu: ("gelu", _unary(lambda n: nn.GELU(approximate=n.kwargs.get("approximate", "none")))),
    torch.sigmoid: ("sigmoid", _unary(lambda n: nn.Sigmoid())), F.sigmoid: ("sigmoid", _unary(lambda n: nn.Sigmoid())),
    "sigmoid": ("sigmoid", _unary(lambda n: nn.Sigmoid())),
    torch.tanh: ("tanh", _unary(lambda n: nn.Tanh())), F.tanh: ("tanh", _unary(lambda n: nn.Tanh())),
    "tanh": ("tanh", _unary(lambda n: nn.Tanh())),
    F.silu: ("silu", _unary(lambda n: nn.SiLU())), F.hardswish: ("hardswish", _unary(lambda n: nn.Hardswish())),
    F.leaky_relu: ("leaky_relu", _unary(lambda n: nn.LeakyReLU(_arg(n, 1, "negative_slope", 0.01)))),
    F.softmax: ("softmax", _softmax), torch.softmax: ("softmax", _softmax), "softmax": ("softmax", _softmax),
    F.adaptive_avg_pool2d: ("avgpool", _unary(lambda n: nn.AdaptiveAvgPool2d(_arg(n, 1, "output_size")))),
}


# ----------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are the known layers (subclasses included) and the opaque modules."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or is_known_layer(m) or isinstance(m, TRANSPARENT_MODULES):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module) -> tuple[fx.Graph | None, list[str]]:
    """Trace `model`; modules that fail to trace become opaque leaves, each with a warning.

    Returns (graph, opaque module paths), or (None, paths) when the root's own forward is untraceable.
    """
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(opaque)
        try:
            return tracer.trace(model), sorted(opaque)
        except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
            where = tracer.failed_in
            if not where or where in opaque:
                warnings.warn(
                    f"quantsim: torch.fx cannot trace the model's own forward ({type(model).__name__}: "
                    f"{type(e).__name__}: {e}); falling back to quantizing its leaf modules only",
                    stacklevel=3,
                )
                return None, sorted(opaque)
            warnings.warn(
                f"quantsim: torch.fx cannot trace module '{where}' ({type(model.get_submodule(where)).__name__}: "
                f"{type(e).__name__}: {e}); it is kept as a black box: its leaf layers get quantizers, "
                "functional ops inside it stay in float",
                stacklevel=3,
            )
            opaque.add(where)


# ----------------------------------------------------------------------------- capture


@dataclass
class Captured:
    """A model prepared for quantization and the op graph placement reads."""

    model: nn.Module
    graph: OpGraph
    opaque: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)  # ops left in float (unknown to quantsim)


def _unique_name(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """GraphModule whose submodules are the original module objects (owners for new functional modules)."""
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name, child in model.named_children():
        setattr(gm, name, child)
    return gm


def _bind_traced_forward(model: nn.Module, gm: fx.GraphModule) -> None:
    """Run the traced graph as `model.forward`, so sim.model stays the user's object (its class, indexing,
    attribute paths) while executing the flattened graph with functional ops as modules."""
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            owner_path, _, field = node.target.rpartition(".")
            try:
                model.get_submodule(owner_path) if owner_path else model
                getattr(model.get_submodule(owner_path) if owner_path else model, field)
            except AttributeError:  # tracer-made constants and root-level new modules live on gm only
                owner = model.get_submodule(owner_path) if owner_path else model
                value = getattr(gm.get_submodule(owner_path) if owner_path else gm, field)
                if isinstance(value, nn.Module):
                    owner.add_module(field, value)
                elif isinstance(value, nn.Parameter):
                    owner.register_parameter(field, value)
                elif isinstance(value, torch.Tensor):
                    owner.register_buffer(field, value, persistent=False)
                else:
                    setattr(owner, field, value)
    model.forward = types.MethodType(type(gm).forward, model)


def _modularise(gm: fx.GraphModule) -> None:
    """Replace functional calls with modules (so they can hold quantizers); duplicate reused stateless modules."""
    graph = gm.graph
    seen: set[str] = set()
    for node in list(graph.nodes):
        if node.op == "call_module":
            if node.target in seen:
                mod = gm.get_submodule(node.target)
                if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                    calls = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == node.target)
                    raise ValueError(
                        f"module '{node.target}' ({type(mod).__name__}) is called {calls} times in one forward and "
                        "has parameters or buffers: each call needs its own activation quantizers, so give each "
                        "call its own module (copy.deepcopy; assign the same nn.Parameter to the copies to keep "
                        "one shared weight). AIMET's model validator rejects reused modules too.")
                owner_path, _, base = node.target.rpartition(".")
                owner = gm.get_submodule(owner_path)
                name = _unique_name(owner, base)
                owner.add_module(name, copy.deepcopy(mod))
                node.target = f"{owner_path}.{name}" if owner_path else name
            seen.add(node.target)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        entry = FUNCTION_MODULES.get(node.target)
        if entry is None:
            continue
        base, factory = entry
        made = factory(node)
        if made is None:
            continue
        module, args = made
        owner_path = _owner_path(node)
        owner = gm.get_submodule(owner_path) if owner_path else gm
        name = _unique_name(owner, base)
        owner.add_module(name, module)
        target = f"{owner_path}.{name}" if owner_path else name
        with graph.inserting_before(node):
            new = graph.call_module(target, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        seen.add(target)
    graph.lint()
    gm.recompile()


def _is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return isinstance(module, nn.modules.conv._ConvNd) and groups > 1 and groups == module.in_channels


def _direct_params(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module.named_parameters(recurse=False) if p is not None)


def _tensor_args(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_tensor_args(a))
        else:
            out.append(a)
    return out


def op_graph_from_fx(gm: fx.GraphModule, opaque: list[str]) -> tuple[OpGraph, list[str]]:
    """OpGraph of a modularised GraphModule: one OpNode per module call, data movement made transparent."""
    producer: dict[fx.Node, str | None] = {}
    nodes: list[OpNode] = []
    float_ops: list[str] = []
    placeholder_index = 0

    def src(a) -> str | None:
        return producer.get(a) if isinstance(a, fx.Node) else None

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            producer[node] = f"{MODEL_INPUT}{placeholder_index}"
            placeholder_index += 1
        elif node.op == "get_attr":
            producer[node] = None
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, TRANSPARENT_MODULES):
                producer[node] = src(node.args[0]) if node.args else None
                continue
            op = op_type_of(mod)
            if not op:
                float_ops.append(f"{node.target} ({type(mod).__name__})")
            inputs = tuple(src(a) for a in node.args)
            nodes.append(OpNode(node.target, op, inputs, _direct_params(mod) if op else (), depthwise=_is_depthwise(mod)))
            producer[node] = node.target
        elif node.op in ("call_function", "call_method"):
            if node.target in NON_TENSOR_CALLS:
                producer[node] = None
            elif node.target in TRANSPARENT_CALLS:
                producer[node] = src(node.args[0]) if node.args else None
            else:
                name = f"{_owner_path(node) + '.' if _owner_path(node) else ''}{node.name}"
                label = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
                float_ops.append(f"{name} ({label})")
                nodes.append(OpNode(name, "", tuple(src(a) for a in _tensor_args(node.args))))
                producer[node] = name
        elif node.op == "output":
            outs = {src(a) for a in _tensor_args(node.args)} - {None}
            nodes = [OpNode(n.name, n.op_type, n.inputs, n.params, n.name in outs, n.depthwise) for n in nodes]
    # leaf layers inside opaque modules: quantized on their own, producers unknown
    for path in opaque:
        for sub, mod in gm.get_submodule(path).named_modules(prefix=path):
            if sub != path and is_known_layer(mod) and not any(True for _ in mod.children()):
                nodes.append(OpNode(sub, op_type_of(mod), (None,), _direct_params(mod), depthwise=_is_depthwise(mod)))
    return OpGraph(nodes), float_ops


def _leaf_graph(model: nn.Module, dummy_input: Any = None) -> tuple[OpGraph, list[str]]:
    """OpGraph of the known leaf layers, edges from a hooked run on `dummy_input` when one is given."""
    leaves = [(n, m) for n, m in model.named_modules() if n and is_known_layer(m) and not any(True for _ in m.children())]
    producer: dict[int, str] = {}
    inputs: dict[str, tuple] = {n: (None,) for n, _ in leaves}
    order: list[str] = []
    if dummy_input is not None:
        args = dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                producer[id(a)] = f"{MODEL_INPUT}{i}"
        handles = []
        outputs: list = []

        def hook(name):
            def fn(mod, inp, out):
                if name not in inputs or name in order:
                    return
                inputs[name] = tuple(producer.get(id(t)) if isinstance(t, torch.Tensor) else None for t in inp)
                order.append(name)
                if isinstance(out, torch.Tensor):
                    producer[id(out)] = name
                    outputs.append(out)  # keep alive so ids stay unique

            return fn

        for n, m in leaves:
            handles.append(m.register_forward_hook(hook(n)))
        try:
            with torch.no_grad():
                model(*args)
        finally:
            for h in handles:
                h.remove()
    names = order + [n for n, _ in leaves if n not in order]
    mods = dict(leaves)
    nodes = [OpNode(n, op_type_of(mods[n]), inputs[n], _direct_params(mods[n]), depthwise=_is_depthwise(mods[n]))
             for n in names]
    return OpGraph(nodes), []


def capture(model: nn.Module, dummy_input: Any = None) -> Captured:
    """Trace and prepare `model` (modified: pass a copy) and describe it as an OpGraph."""
    graph, opaque = trace(model)
    if graph is None:
        g, float_ops = _leaf_graph(model, dummy_input)
        return Captured(model, g, opaque=[""], float_ops=float_ops)
    gm = _graph_module(model, graph)
    _modularise(gm)
    g, float_ops = op_graph_from_fx(gm, opaque)
    _bind_traced_forward(model, gm)
    return Captured(model, g, opaque=opaque, float_ops=float_ops)
