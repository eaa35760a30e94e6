"""One QAT step (forward, backward, SGD step) on sim.model / the same step on the float model, and peak memory;
also PyTorch's own QAT (torch.ao prepare_qat_fx, per-channel weight fake-quant) when this torch still ships it."""
from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch import nn

from quantsim import QuantizationSimModel

from .common import Table, peak_tensor_bytes
from .models import batches, make_model

TIME_TARGET = 1.4
MEMORY_TARGET = 1.3
BATCH = 16  # the batch the targets are stated for; quick mode uses QUICK_BATCH
QUICK_BATCH = 4


def _torch_ao_qat(model: nn.Module, example: torch.Tensor):
    """torch.ao's FX QAT model (x86 default QAT qconfig: per-channel symmetric weights, fused observer+fake-quant,
    conv-BN fused with BN simulated in training), or None when this torch no longer ships it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qat_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_qat_fx

            return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (example,))
    except Exception:  # ImportError, or an API change in a newer torch
        return None


def paired_ratios(fns: dict, baseline: str, repeats: int, warmup: int = 2) -> tuple[dict, dict]:
    """(median of per-round time ratios to `baseline`, median times). Every round runs each candidate right
    after (or before: the order alternates) the baseline, so load that changes over seconds cancels in a ratio;
    the median over rounds drops rounds hit by a burst."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    ratios = {k: statistics.median(t / b for t, b in zip(times[k], times[baseline])) for k in fns}
    return ratios, {k: statistics.median(v) for k, v in times.items()}


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def run(quick: bool = False, models=("resnet18", "mobilenet_v2")) -> list[Table]:
    batch = QUICK_BATCH if quick else BATCH
    repeats, warmup = (2, 1) if quick else (11, 2)
    table = Table(
        f"QAT step (forward + backward + SGD step, batch {batch}) / the same step on the float model",
        ["model", "candidate", "step ratio", "target", "ok", "peak mem ratio", "target", "ok"],
        notes=[
            "sim: QuantizationSimModel(config='default', min_max, W8 per-channel / A8), after compute_encodings; "
            "BN stays a real BN (batch statistics, running-stat updates)",
            "torch.ao: prepare_qat_fx with get_default_qat_qconfig_mapping('x86') (per-channel weight fake-quant)",
            "peak mem = bytes of new tensor storages (activations, saved tensors, grads, temporaries; views excluded)",
            "step ratio = median over rounds of (candidate time / float time in the same round), order alternating; "
            f"image size {batches(1, 1, quick)[0].shape[-1]}{' (quick)' if quick else ''}; {repeats} rounds",
        ],
        key="qat",
    )
    for name in models:
        model = make_model(name, quick)
        data = batches(2, batch, quick)
        x, y = data[1], torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(0))
        sim = QuantizationSimModel(model)
        sim.compute_encodings(data[:1], progress=False)
        fns = {"float": _step_fn(copy.deepcopy(model).train(), x, y), "sim": _step_fn(sim.model.train(), x, y)}
        ao = _torch_ao_qat(model, x)
        if ao is not None:
            fns["torch.ao"] = _step_fn(ao, x, y)
        ratios, med = paired_ratios(fns, "float", repeats=repeats, warmup=warmup)
        peaks = {k: peak_tensor_bytes(fn) for k, fn in fns.items()}
        for cand in [c for c in ("sim", "torch.ao") if c in fns]:
            ratio = ratios[cand]
            mem = peaks[cand] / max(peaks["float"], 1)
            table.add(name, cand, ratio, TIME_TARGET, "yes" if ratio <= TIME_TARGET else "NO", mem, MEMORY_TARGET,
                      "yes" if mem <= MEMORY_TARGET else "NO")
        if ao is None:
            table.add(name, "torch.ao", "n/a", TIME_TARGET, "-", "n/a", MEMORY_TARGET, "-")
        table.notes.append(f"{name}: float step {med['float'] * 1e3:.0f} ms, "
                           f"float peak {peaks['float'] / 2**20:.0f} MB")
    if any(r[1] == "torch.ao" and r[2] == "n/a" for r in table.rows):
        table.notes.append("torch.ao.quantization.quantize_fx is not available in this torch: skipped")
    return [table]
