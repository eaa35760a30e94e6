"""Run (QDQ) ONNX models with onnxruntime on CPU and report which Conv/Gemm/MatMul became integer kernels.

No torch: onnx, onnxruntime and numpy only.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["OPT_LEVELS", "INTEGER_KERNELS", "make_session", "run", "integer_kernel_report", "input_specs"]

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: Node types (any domain) that compute a Conv/Gemm/MatMul with integer arithmetic.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QOrderedMatMul", "QLinearConvTranspose",
})
_TRACKED = ("Conv", "Gemm", "MatMul")
#: Nodes the layout transformers put around a fused node (ORT_ENABLE_ALL): walk back through them.
_LAYOUT_OPS = ("Transpose", "Reshape")


def _model_source(model):
    """Bytes or a path onnxruntime accepts, from a path or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return os.fspath(model)


def make_session(model, threads: int = 1, optimization: str = "all", optimized_model_path=None,
                 int8_activations: bool = False, config: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU InferenceSession with intra_op_num_threads=threads (inter-op 1, sequential execution).

    optimization: "disable" | "basic" | "extended" | "all". int8_activations sets session.qdq_is_int8_allowed=1 so
    onnxruntime on x86 also fuses Conv/MatMul whose activations are int8. config: further session config entries,
    e.g. {"session.intra_op.allow_spinning": "0"} when several sessions are timed in turn.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        so.graph_optimization_level = OPT_LEVELS[optimization]
    except KeyError:
        raise ValueError(f"optimization must be one of {sorted(OPT_LEVELS)}, got {optimization!r}") from None
    if optimized_model_path is not None:
        so.optimized_model_filepath = os.fspath(optimized_model_path)
    if int8_activations:
        so.add_session_config_entry("session.qdq_is_int8_allowed", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    so.log_severity_level = 3
    return ort.InferenceSession(_model_source(model), so, providers=["CPUExecutionProvider"])


_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def input_specs(session: ort.InferenceSession) -> list[tuple[str, list, type]]:
    """(name, shape with None/str for free dims, numpy dtype) of each model input."""
    return [(i.name, list(i.shape), _NP_TYPES.get(i.type, np.float32)) for i in session.get_inputs()]


def _feeds(session, inputs) -> dict[str, np.ndarray]:
    specs = input_specs(session)
    if isinstance(inputs, dict):
        missing = [n for n, _, _ in specs if n not in inputs]
        if missing:
            raise ValueError(f"missing model inputs: {missing}")
        return {n: np.asarray(inputs[n], dtype=t) for n, _, t in specs}
    if len(specs) != 1:
        raise ValueError(f"the model has {len(specs)} inputs; pass a dict name -> array")
    name, _, t = specs[0]
    return {name: np.asarray(inputs, dtype=t)}


def run(model_path_or_proto, inputs, threads: int = 1, batch: int | None = None, session=None) -> list[np.ndarray]:
    """Outputs of the model for `inputs` (a dict name -> array, or one array for a single-input model).

    batch: run in chunks of `batch` rows along axis 0 (every input is split the same way) and concatenate the
    outputs, bounding memory and matching models exported with a fixed batch size.
    """
    sess = session or make_session(model_path_or_proto, threads=threads)
    feeds = _feeds(sess, inputs)
    if not batch:
        return sess.run(None, feeds)
    n = {a.shape[0] if a.ndim else 1 for a in feeds.values()}
    if len(n) != 1:
        raise ValueError(f"inputs disagree on the batch dimension: {sorted(n)}")
    total = n.pop()
    parts = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, total, int(batch))]
    return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(parts[0]))]


def _group_output(node, consumers) -> str:
    """The tensor a fused integer node would write: the output of the QuantizeLinear after node (possibly through a
    Relu/Clip or a bias Add onnxruntime folds in), else node's own output."""
    out = node.output[0]
    for _ in range(2):
        cons = consumers.get(out, [])
        if len(cons) != 1:
            return out
        if cons[0].op_type == "QuantizeLinear":
            return cons[0].output[0]
        if cons[0].op_type not in ("Relu", "Clip", "Add"):
            return out
        out = cons[0].output[0]
    cons = consumers.get(out, [])
    return cons[0].output[0] if len(cons) == 1 and cons[0].op_type == "QuantizeLinear" else node.output[0]


def integer_kernel_report(model_path_or_proto, optimization: str = "extended", int8_activations: bool = False,
                          keep_optimized: str | None = None) -> dict:
    """Which Conv/Gemm/MatMul of the model onnxruntime turned into integer kernels.

    Builds a session with optimized_model_filepath set, reads the optimized graph back and, for each tracked node of
    the input graph, finds the node that produces its output (fused integer nodes keep the name of the node they
    replace and write the QuantizeLinear's output). Returns counts and a per-node listing.
    """
    model = model_path_or_proto
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = keep_optimized or os.path.join(tmp, "optimized.onnx")
        make_session(model, optimization=optimization, optimized_model_path=opt_path,
                     int8_activations=int8_activations)
        optimized = onnx.load(opt_path)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in optimized.graph.node for o in n.output}
    by_name = {n.name: n for n in optimized.graph.node}

    def resolve(node):
        hit = by_name.get(node.name) if node.name else None
        if (hit is None or hit.op_type not in INTEGER_KERNELS) and node.name:
            # Renamed by a fusion: "<name>_token_<k>" (layout transforms), "<name>/MatMulAddFusion", ...
            hit = next((n for name, n in by_name.items() if n.op_type in INTEGER_KERNELS and (
                name.startswith(node.name + "_token_") or name.startswith(node.name + "/"))), hit)
        if hit is not None and (hit.op_type in INTEGER_KERNELS or hit.op_type == node.op_type):
            return hit
        p = producer.get(_group_output(node, consumers)) or producer.get(node.output[0])
        seen = 0
        while p is not None and p.op_type in _LAYOUT_OPS and seen < 4:
            p = producer.get(p.input[0])
            seen += 1
        return p or hit

    nodes = []
    for node in model.graph.node:
        if node.op_type not in _TRACKED:
            continue
        hit = resolve(node)
        kernel = hit.op_type if hit is not None else None
        nodes.append({
            "name": node.name or node.output[0],
            "op_type": node.op_type,
            "kernel": kernel,
            "domain": (hit.domain or "ai.onnx") if hit is not None else None,
            "integer": kernel in INTEGER_KERNELS,
        })
    counts = Counter(n["op_type"] for n in nodes)
    integer = Counter(n["op_type"] for n in nodes if n["integer"])
    return {
        "optimization": optimization,
        "total": len(nodes),
        "integer": sum(integer.values()),
        "float": len(nodes) - sum(integer.values()),
        "by_op_type": {op: {"total": counts[op], "integer": integer[op]} for op in sorted(counts)},
        "kernels": dict(Counter(n["kernel"] for n in nodes if n["integer"])),
        "nodes": nodes,
        "optimized_op_counts": dict(Counter(
            (n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}")
            for n in optimized.graph.node)),
    }
