"""The benchmark models at their benchmark sizes, with realistic BatchNorm statistics; sim + export in one call."""
from __future__ import annotations

import torch
from torch import nn

from quantsim import QuantizationSimModel
from quantsim.batchnorm import reestimate_bn_stats
from quantsim.exporter import onnxruntime_fidelity
from quantsim.models import mobilenet_v2, resnet18

#: name -> builder; images are 3 x input_size(quick) x input_size(quick).
MODELS = {
    "resnet18": lambda: resnet18(num_classes=10, in_channels=3),
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10, in_channels=3),
}


def input_size(quick: bool) -> int:
    """112 px for the real run; 32 px in quick mode (it only checks that the suite still runs end to end)."""
    return 32 if quick else 112


def make_model(name: str, quick: bool, seed: int = 0, size: int | None = None) -> nn.Module:
    """A model with non-degenerate BN statistics (re-estimated on random images of `size` px, default
    input_size(quick)), in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    s = size or input_size(quick)
    g = torch.Generator().manual_seed(seed)
    reestimate_bn_stats(model, [torch.randn(8, 3, s, s, generator=g) for _ in range(2)], progress=False)
    return model.eval()


def batches(n: int, batch: int, quick: bool, seed: int = 1, size: int | None = None) -> list[torch.Tensor]:
    s = size or input_size(quick)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for _ in range(n)]


def quantize_and_export(model: nn.Module, calib: list[torch.Tensor], dummy: torch.Tensor, directory: str,
                        prefix: str, config: str = "onnxruntime_cpu"):
    """(sim, ExportPaths): the sim calibrated (min_max) on `calib` and exported (float ONNX, encodings, QDQ ONNX)."""
    sim = QuantizationSimModel(model, config, dummy_input=dummy)
    sim.compute_encodings(calib, progress=False)
    return sim, sim.export(directory, prefix, dummy)


def fidelity_row(label: str, data: str, sim, qdq_path, x: torch.Tensor, x_teacher_forced: torch.Tensor) -> list:
    """One row of the fidelity table (ort.run_fidelity's columns): onnxruntime vs the sim end to end on `x`, and per
    layer (teacher forced) on `x_teacher_forced`; then the same two exact fractions with the sim inside
    sim.emulate_onnxruntime()."""
    e2e = onnxruntime_fidelity(sim, qdq_path, x)
    tf = onnxruntime_fidelity(sim, qdq_path, x_teacher_forced, teacher_forced=True)
    e2e_emu = onnxruntime_fidelity(sim, qdq_path, x, emulate=True)
    tf_emu = onnxruntime_fidelity(sim, qdq_path, x_teacher_forced, teacher_forced=True, emulate=True)
    return [label, data, e2e["within_1"], e2e["exact"], e2e["max_lsb"], e2e.get("top1_agreement"), tf["within_1"],
            tf["max_lsb"], tf["exact"], e2e_emu["exact"], tf_emu["exact"]]
