"""compute_encodings time / float forward time over the same batches, per scheme; peak tensor memory."""
from __future__ import annotations

import torch

from quantsim import QuantizationSimModel

from .common import Table, paired_ratio_medians, peak_tensor_bytes
from .models import batches, make_model

SCHEMES = ["min_max", "tf_enhanced", "percentile", "mse"]
TARGETS = {"min_max": 1.3, "tf_enhanced": 2.0, "percentile": 2.0, "mse": 2.0}


def run(quick: bool = False, models=("resnet18", "mobilenet_v2")) -> list[Table]:
    n_batches, batch = (1, 4) if quick else (8, 16)
    repeats, warmup = (1, 0) if quick else (7, 1)
    table = Table(
        "calibration: compute_encodings time / float forward time (same batches)",
        ["model", "scheme", "ratio", "target", "ok", "peak mem ratio"],
        notes=[f"{n_batches} batches of {batch}; ratio = median over {repeats} rounds of compute_encodings time / the "
               "float forward timed just before it (schemes in rotating order); peak = tensor bytes allocated by the "
               "calling thread (the calibration worker's processing and scratch buffers, and the copies made when "
               "a snapshotted tensor is written in place, are not counted)"],
        key="calibration",
    )
    for name in models:
        model = make_model(name, quick)
        data = batches(n_batches, batch, quick)
        sims = {s: QuantizationSimModel(model, quant_scheme=s) for s in SCHEMES}
        if "percentile" in sims:
            sims["percentile"].set_percentile_value(99.99)

        def float_pass():
            with torch.no_grad():
                for x in data:
                    model(x)

        fns = {s: (lambda sim=sim: sim.compute_encodings(data, progress=False)) for s, sim in sims.items()}
        ratios = paired_ratio_medians(float_pass, fns, repeats=repeats, warmup=warmup)
        float_peak = peak_tensor_bytes(float_pass)
        for s in SCHEMES:
            ratio = ratios[s]
            mem = peak_tensor_bytes(fns[s]) / max(float_peak, 1)
            table.add(name, s, ratio, TARGETS[s], "yes" if ratio <= TARGETS[s] else "NO", mem)
    return [table]
