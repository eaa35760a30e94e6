"""Per-layer SQNR of a quantized model: each quantized activation of the sim vs the same tensor in float.

Both runs use the same sim.model: once with every quantizer disabled (the float model, with the sim's module
names, including the functional adds the float model has no module for), once as quantized. Errors accumulate
through depth, as they do at inference. SQNR = 10 log10(sum x^2 / sum (q - x)^2) over the whole batch.
"""
from __future__ import annotations

import math

import torch

from quantsim import QuantizationSimModel

from .common import Table
from .models import batches, make_model

SCHEMES = ("min_max", "tf_enhanced")


def _output_quantized_modules(sim: QuantizationSimModel) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in sim.quantized_modules()
            if len(m.output_quantizers) and m.output_quantizers[0] is not None and m.output_quantizers[0].enabled]


@torch.no_grad()
def per_layer_sqnr(sim: QuantizationSimModel, x: torch.Tensor) -> dict[str, float]:
    """layer name -> SQNR (dB) of its quantized output against its float output, in execution order."""
    points = _output_quantized_modules(sim)
    outputs: dict[str, dict[str, torch.Tensor]] = {"float": {}, "quant": {}}
    mode = "float"

    def hook(name):
        def capture(module, args, out):
            outputs[mode][name] = (out[0] if isinstance(out, tuple) else out).detach().double()
        return capture

    quantizers = [q for _, q in sim.named_quantizers()]
    enabled = [q.enabled for q in quantizers]
    handles = [m.register_forward_hook(hook(n)) for n, m in points]
    was_training = sim.model.training
    sim.model.eval()
    try:
        for q in quantizers:
            q.enabled = False
        sim.model(x)
        for q, e in zip(quantizers, enabled):
            q.enabled = e
        mode = "quant"
        sim.model(x)
    finally:
        for q, e in zip(quantizers, enabled):
            q.enabled = e
        for h in handles:
            h.remove()
        sim.model.train(was_training)
    result = {}
    for name in outputs["quant"]:
        ref = outputs["float"][name]
        noise = float(((outputs["quant"][name] - ref) ** 2).sum())
        signal = float((ref ** 2).sum())
        result[name] = 10 * math.log10(signal / noise) if noise > 0 else math.inf
    return result


def run(quick: bool = False, model_name: str = "resnet18") -> list[Table]:
    model = make_model(model_name, quick)
    calib = batches(1, 4, quick) if quick else batches(2, 8, quick)
    x = torch.cat(batches(1, 4 if quick else 16, quick, seed=5))
    per_scheme = {}
    for scheme in SCHEMES:
        sim = QuantizationSimModel(model, "onnxruntime_cpu", quant_scheme=scheme, dummy_input=calib[0][:1])
        sim.compute_encodings(calib, progress=False)
        per_scheme[scheme] = per_layer_sqnr(sim, x)
    table = Table(
        f"per-layer SQNR (dB) of {model_name} W8A8 (onnxruntime_cpu config): quantized vs float activations",
        ["layer", *(f"SQNR {s}" for s in SCHEMES)],
        notes=[f"{len(x)} held-out benchmark images ({x.shape[-1]}px) after calibration on "
               f"{sum(len(c) for c in calib)}; every quantized activation, in execution order; quantization error "
               "accumulates through depth (not teacher forced); random weights with BN statistics re-estimated on "
               "random images (benchmarks.models.make_model)"],
        key="sqnr",
    )
    for name in per_scheme[SCHEMES[0]]:
        table.add(name, *(per_scheme[s][name] for s in SCHEMES))
    return [table]
