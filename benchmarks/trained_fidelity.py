"""Fidelity on trained deep networks: ResNet-18 and MobileNetV2 trained briefly on real digits, as deployed.

A random deep network turns one rare 1-LSB rounding difference into many output differences (it is chaotic);
a trained one does not, so these rows say what a user of a real model gets. Each model is exported twice from
the same calibration: with BatchNorm still a separate op in the sim (the QDQ builder folds it, so the folded
bias is not on the sim's int32 grid), and after `fold_all_batch_norms_to_scale` (the deployment flow, int32 bias
simulated).
"""
from __future__ import annotations

import torch

from quantsim import QuantizationSimModel
from quantsim.batchnorm import fold_all_batch_norms_to_scale
from quantsim.data import make_loader, train_classifier
from quantsim.models import mobilenet_v2, resnet18

from .mnist import dataset
from .models import fidelity_row

#: name -> (builder(quick), epochs at full size); quick mode trains ResNet-18 only, narrower, on fewer images.
ARCHS = {
    "resnet18": (lambda quick: resnet18(10, in_channels=1, width=8 if quick else 16, small_input=True), 1),
    "mobilenet_v2": (lambda quick: mobilenet_v2(10, in_channels=1, width_mult=0.5, small_input=True), 2),
}


def rows(directory: str, quick: bool = False) -> list[list]:
    """Rows of ort.run_fidelity's table for each trained architecture, BN unfolded and folded."""
    x_tr, y_tr, x_te, _ = dataset("MNIST-5k")
    n_train = 256 if quick else len(x_tr)  # quick: a few steps, so the code runs; the numbers mean little
    out = []
    for name, (build, epochs) in ARCHS.items():
        if quick and name != "resnet18":
            continue
        torch.manual_seed(0)
        model = build(quick)
        train_classifier(model, make_loader(x_tr[:n_train], y_tr[:n_train], batch_size=64, shuffle=True, seed=0),
                         epochs=1 if quick else epochs, lr=0.05)
        model.eval()
        sim = QuantizationSimModel(model, "onnxruntime_cpu", dummy_input=x_te[:1])
        sim.compute_encodings([x_tr[:256]], progress=False)
        for folded in (False, True):  # the same calibration, exported before and after folding
            if folded:
                fold_all_batch_norms_to_scale(sim)
            paths = sim.export(directory, f"{name}_trained{'_folded' if folded else ''}", x_te[:1])
            label = f"{name} trained, BN {'folded' if folded else 'unfolded'}"
            out.append(fidelity_row(label, f"MNIST test x{len(x_te)}", sim, paths.qdq, x_te, x_te[:64]))
    return out
