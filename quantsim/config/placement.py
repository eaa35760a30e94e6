"""Quantizer placement: (OpGraph, BackendConfig) -> which quantizer each op's inputs, output and params get.

Pure function of the graph and the config (no torch). Rules follow AIMET's QuantSimConfigurator, applied in its
order (defaults < params < op_type < supergroups < model_input < model_output); docs/config.md states each rule
and where quantsim departs from AIMET.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable

from ..ir import MODEL_INPUT, OpGraph, OpNode
from .schema import BackendConfig, ConfigError, Kernel, load_config

__all__ = ["QuantSpec", "NodePlacement", "place", "PER_CHANNEL_OP_TYPES", "BN_FOLDABLE_OP_TYPES",
           "GRID_PRESERVING_OP_TYPES", "find_bn_folds", "find_supergroups"]

#: Op types whose "weight" may be quantized per channel (other params are always per tensor).
PER_CHANNEL_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Layers a following BatchNormalization folds into (AIMET's conv/linear types).
BN_FOLDABLE_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: Ops whose output lies on its input's grid (AIMET's _is_grid_preserving_op): output not requantized
#: unless the config names the op type in op_type.
GRID_PRESERVING_OP_TYPES = frozenset({
    "BatchToSpace", "Col2Im", "Compress", "DepthToSpace", "Dropout", "Expand", "Flatten", "Gather",
    "GatherElements", "GatherND", "Identity", "MaxPool", "MaxRoiPool", "NonZero", "Pad", "ReduceMax", "ReduceMin",
    "Reshape", "Slice", "SpaceToBatch", "SpaceToDepth", "Split", "SplitToSequence", "Squeeze", "Tile", "TopK",
    "Transpose", "Unsqueeze",
})
_FP16 = (16, "float")


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer must be (strict/unsigned are only ever set on symmetric specs)."""

    bitwidth: int
    symmetric: bool
    per_channel: bool = False       # only meaningful for params
    strict_symmetric: bool = False
    unsigned_symmetric: bool = False
    dtype: str = "int"              # "int" or "float"
    encoding_min_max: tuple[float, float] | None = None   # fixed range from encoding_constraints


@dataclass(frozen=True)
class NodePlacement:
    """Quantizers of one op: one entry per OpNode.inputs, one output, one per OpNode.params; None = none."""

    inputs: tuple[QuantSpec | None, ...]
    outputs: tuple[QuantSpec | None, ...]
    params: dict[str, QuantSpec | None]


def _is_model_input(src: str | None) -> bool:
    return src is not None and src.startswith(MODEL_INPUT)


#: hw_version values of targets whose fused kernels include depthwise/3-D convs (onnxruntime's QLinearConv does).
FUSES_DEPTHWISE_HW = ("ORT_CPU",)


def _rejects_supergroup_start(node: OpNode, hw_version: str | None = None) -> bool:
    """AIMET never starts a supergroup at a depthwise or 3-D conv (an HTP limitation it applies to every config);
    targets that fuse those too (hw_version in FUSES_DEPTHWISE_HW) lift the rule."""
    if hw_version in FUSES_DEPTHWISE_HW:
        return False
    return node.op_type in ("Conv", "ConvTranspose") and bool(
        getattr(node, "depthwise", False) or getattr(node, "conv3d", False))


def _sole_consumer(graph: OpGraph, name: str) -> str | None:
    """The only node reading `name`'s output, or None if it fans out, is a model output, or is unused."""
    if graph[name].is_model_output:
        return None
    consumers = list(dict.fromkeys(graph.consumers(name)))
    return consumers[0] if len(consumers) == 1 else None


def find_bn_folds(graph: OpGraph) -> dict[str, str]:
    """{layer: batchnorm} for each Conv/ConvTranspose/Gemm whose output only feeds a BatchNormalization."""
    folds = {}
    for node in graph:
        if node.op_type not in BN_FOLDABLE_OP_TYPES:
            continue
        if node.op_type == "ConvTranspose" and getattr(node, "depthwise", False):
            continue  # AIMET does not fold BN into a depthwise transposed conv
        bn = _sole_consumer(graph, node.name)
        if bn is not None and graph[bn].op_type == "BatchNormalization" and graph[bn].inputs[:1] == (node.name,):
            folds[node.name] = bn
    return folds


def find_supergroups(graph: OpGraph, patterns: Iterable[tuple[str, ...]],
                     folds: dict[str, str] | None = None, hw_version: str | None = None) -> list[tuple[str, ...]]:
    """Every chain of nodes matching a pattern (a folded layer+BN counts as one op of the layer's type).

    Each node of a chain but the last must feed only the next one; patterns may overlap (AIMET applies all).
    """
    folds = find_bn_folds(graph) if folds is None else folds
    absorbed = set(folds.values())

    def match(name: str, pattern: tuple[str, ...]) -> list[list[str]]:
        if name in absorbed or graph[name].op_type != pattern[0]:
            return []
        if len(pattern) == 1:
            return [[name]]
        nxt = _sole_consumer(graph, folds.get(name, name))
        return [] if nxt is None else [[name] + rest for rest in match(nxt, pattern[1:])]

    chains: list[tuple[str, ...]] = []
    for pattern in sorted(patterns, key=len, reverse=True):  # AIMET's order; results do not depend on it
        for node in graph:
            if node.op_type == pattern[0] and not _rejects_supergroup_start(node, hw_version):
                chains.extend(tuple(c) for c in match(node.name, tuple(pattern)))
    return chains


def _supports(kernels: tuple[Kernel, ...], act: tuple[int, str], param: tuple[int, str]) -> bool:
    """AIMET's current_config_in_supported_kernels: the (act, param) pair is one of the kernels."""
    return any(k.activation == act and (k.param is None or k.param == param) for k in kernels)


def place(graph: OpGraph, config: "BackendConfig | str | dict | None", *, default_param_bw: int = 8,
          default_output_bw: int = 8, enforce_supported_kernels: bool = False) -> dict[str, NodePlacement]:
    """Placement for every node of `graph` under `config` (unknown ops, op_type "", get no quantizers).

    enforce_supported_kernels: apply supported_kernels to bit-widths/dtypes like AIMET's
    ENFORCE_TARGET_DTYPE_BITWIDTH_CONFIG (off by default, as in AIMET: the lists are then only recorded).
    """
    config = load_config(config)
    for label, bw in (("default_param_bw", default_param_bw), ("default_output_bw", default_output_bw)):
        if isinstance(bw, bool) or not isinstance(bw, numbers.Integral) or not 1 <= bw <= 32:
            raise ValueError(f"{label} must be an integer in [1, 32], got {bw!r}")
    d = config.defaults
    nodes = [n for n in graph]
    known = {n.name for n in nodes if n.op_type}

    # ---- level 1: defaults (tensor-level settings are keyed by the producing node / model-input name)
    out_on = {n.name: d.is_output_quantized for n in nodes}
    in_req = {n.name: [d.is_input_quantized] * len(n.inputs) for n in nodes}
    sym: dict[str, bool] = {}                       # tensor -> symmetric (absent: defaults.ops.is_symmetric)
    fixed: dict[str, tuple[float, float]] = {}      # tensor -> encoding_constraints
    p_on = {(n.name, p): d.param_is_quantized for n in nodes for p in n.params}
    p_sym = {(n.name, p): d.param_is_symmetric for n in nodes for p in n.params}
    pcq = {n.name: config.per_channel_default() for n in nodes}

    # ---- level 2: params by name
    for (name, p) in p_on:
        pc = config.params.get(p)
        if pc is not None:
            if pc.is_quantized is not None:
                p_on[(name, p)] = pc.is_quantized
            if pc.is_symmetric is not None:
                p_sym[(name, p)] = pc.is_symmetric

    # ---- level 3: op_type
    sym_owner: dict[str, tuple[str, bool]] = {}
    for n in nodes:
        if not n.op_type:
            continue
        oc = config.op_type.get(n.op_type)
        if oc is None:
            if n.op_type in GRID_PRESERVING_OP_TYPES:
                out_on[n.name] = False
            continue
        if oc.is_input_quantized is not None:
            in_req[n.name] = [oc.is_input_quantized] * len(n.inputs)
        if oc.is_output_quantized is not None:
            out_on[n.name] = oc.is_output_quantized
        if oc.is_symmetric is not None:  # every tensor the op touches, as AIMET's neighbourhood rule does
            for t in [s for s in n.inputs if s is not None] + [n.name]:
                prev = sym_owner.get(t)
                if prev is not None and prev[1] != oc.is_symmetric:
                    raise ConfigError(f"op_type.{n.op_type}.is_symmetric",
                                      f"conflicts with op_type.{prev[0]}.is_symmetric on tensor '{t}' "
                                      f"(node '{n.name}'); AIMET rejects this combination too", config.source)
                sym_owner[t] = (n.op_type, oc.is_symmetric)
                sym[t] = oc.is_symmetric
        if oc.encoding_constraints is not None:
            fixed[n.name] = oc.encoding_constraints
        for p in n.params:
            pc = oc.params.get(p)
            if pc is not None:
                if pc.is_quantized is not None:
                    p_on[(n.name, p)] = pc.is_quantized
                if pc.is_symmetric is not None:
                    p_sym[(n.name, p)] = pc.is_symmetric
        if oc.per_channel_quantization is not None:
            pcq[n.name] = oc.per_channel_quantization

    # ---- level 4: supergroups, then conv+BN fusion (the BN output takes over the layer's output quantizer)
    folds = find_bn_folds(graph)
    for chain in find_supergroups(graph, config.supergroups, folds, config.defaults.hw_version):
        for i, name in enumerate(chain):
            if i < len(chain) - 1:
                out_on[name] = False
            if i > 0:
                in_req[name] = [False] * len(in_req[name])
    for layer, bn in folds.items():
        out_on[bn], out_on[layer] = out_on[layer], False
        in_req[bn] = [False] * len(in_req[bn])
        for p in graph[bn].params:
            p_on[(bn, p)] = False

    # ---- level 5/6: model inputs and outputs
    if config.model_input_quantized is not None:
        for n in nodes:
            for i, src in enumerate(n.inputs):
                if _is_model_input(src):
                    in_req[n.name][i] = config.model_input_quantized
    if config.model_output_quantized is not None:
        for n in nodes:
            if n.is_model_output:
                out_on[n.name] = config.model_output_quantized

    # ---- precisions (supported_kernels only when enforced)
    act = (int(default_output_bw), "int")
    par = (int(default_param_bw), "int")
    in_prec = {n.name: act for n in nodes}
    out_prec = dict(in_prec)
    par_prec = {n.name: par for n in nodes}
    if enforce_supported_kernels:
        _enforce_kernels(graph, config, in_prec, out_prec, par_prec, act, par)

    # ---- resolve: input quantizers only where the tensor is not already on a grid
    def act_spec(tensor: str, prec: tuple[int, str]) -> QuantSpec:
        s = sym.get(tensor, d.is_symmetric)
        return QuantSpec(prec[0], s, False, d.strict_symmetric and s, d.unsigned_symmetric and s, prec[1],
                         fixed.get(tensor))

    on_grid: dict[str, bool] = {}   # node -> its output tensor carries a quantization grid

    def carries_grid(src: str) -> bool:
        return on_grid.get(src, False)  # model inputs and unknown producers: no

    result: dict[str, NodePlacement] = {}
    for n in nodes:
        if n.name not in known:
            result[n.name] = NodePlacement((None,) * len(n.inputs), (None,), {p: None for p in n.params})
            on_grid[n.name] = False
            continue
        indices_only = n.op_type == "Gather" and "weight" in n.params  # Embedding: integer indices in
        ins = tuple(
            act_spec(src, in_prec[n.name])
            if src is not None and in_req[n.name][i] and not carries_grid(src) and not indices_only else None
            for i, src in enumerate(n.inputs))
        out = act_spec(n.name, out_prec[n.name]) if out_on[n.name] else None
        params = {}
        for p in n.params:
            if not p_on[(n.name, p)]:
                params[p] = None
                continue
            s = p_sym[(n.name, p)]
            per_channel = pcq[n.name] and p == "weight" and n.op_type in PER_CHANNEL_OP_TYPES
            params[p] = QuantSpec(par_prec[n.name][0], s, per_channel, d.strict_symmetric and s,
                                  d.unsigned_symmetric and s, par_prec[n.name][1])
        result[n.name] = NodePlacement(ins, (out,), params)
        first = n.inputs[0] if n.inputs else None
        on_grid[n.name] = out is not None or (
            n.op_type in GRID_PRESERVING_OP_TYPES and first is not None and (ins[0] is not None or carries_grid(first)))
    return result


def _enforce_kernels(graph: OpGraph, config: BackendConfig, in_prec: dict, out_prec: dict, par_prec: dict,
                     act: tuple[int, str], par: tuple[int, str]) -> None:
    """AIMET's supported_kernels override: defaults' first kernel, then per op type when it lacks the default."""
    dk = config.defaults.supported_kernels
    if dk:
        act, par = dk[0].activation, dk[0].param or par
        for name in in_prec:
            in_prec[name] = out_prec[name] = act
            par_prec[name] = par

    def first_act(op_type: str) -> tuple[int, str] | None:
        oc = config.op_type.get(op_type)
        return oc.supported_kernels[0].activation if oc is not None and oc.supported_kernels else None

    names = {n.name for n in graph}
    for n in graph:
        oc = config.op_type.get(n.op_type) if n.op_type else None
        if oc is None or not oc.supported_kernels or _supports(oc.supported_kernels, act, par):
            continue
        k0 = oc.supported_kernels[0]
        if k0.param is not None:
            par_prec[n.name] = k0.param
        if k0.activation == _FP16:  # fp16 only where the neighbours run fp16 too (no requantization between)
            producers = [s for s in n.inputs if s in names]
            if all(first_act(graph[s].op_type) == _FP16 for s in producers):
                in_prec[n.name] = _FP16
            if all(first_act(graph[c].op_type) == _FP16 for c in graph.consumers(n.name)):
                out_prec[n.name] = _FP16
        else:
            in_prec[n.name] = out_prec[n.name] = k0.activation
