"""Every layer kind the simulation covers gets quantizers, calibrates and runs; unknown ops stay float and are listed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsim import QuantizationSimModel

ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh(),
               nn.Softmax(dim=1), nn.LeakyReLU(0.1), nn.PReLU(4)]


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.t1 = nn.ConvTranspose1d(4, 4, 2, stride=2)
        self.bn1 = nn.BatchNorm1d(4)
        self.c3 = nn.Conv3d(4, 4, 3, padding=1)
        self.t3 = nn.ConvTranspose3d(4, 4, 2, stride=2, groups=2)
        self.bn3 = nn.BatchNorm3d(4)
        self.pool1 = nn.MaxPool1d(2)
        self.pool3 = nn.AvgPool3d(2)

    def forward(self, x1, x3):
        a = self.pool1(self.bn1(self.t1(self.c1(x1))))
        b = self.pool3(self.bn3(self.t3(self.c3(x3))))
        return a.mean() + b.mean()


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(8, 4)
        self.acts = nn.ModuleList(ACTIVATIONS)
        self.gap = nn.AdaptiveAvgPool1d(1)

    def forward(self, idx):
        h = self.fc(self.ln(self.emb(idx)))  # (B, T, 4)
        h = self.gn(h.transpose(1, 2))  # (B, 4, T)
        for act in self.acts:
            h = act(h)
        h = torch.sub(h, 0.5) / 2.0
        return torch.flip(self.gap(h), dims=[1])  # flip: an op quantsim does not know


def test_conv_variants_and_bn_pairs():
    torch.manual_seed(0)
    m = Convs().eval()
    sim = QuantizationSimModel(m)
    for name in ["c1", "t1", "c3", "t3"]:
        assert sim.model.get_submodule(name).param_quantizers["weight"] is not None, name
    assert sim.model.t3.param_quantizers["weight"].channel_axis == 1
    assert sim.model.t3.param_quantizers["weight"].scale.shape == (4,)  # grouped: all output channels
    assert sim.model.t1.output_quantizers[0] is None and sim.model.bn1.output_quantizers[0] is not None
    data = [(torch.randn(2, 4, 8), torch.randn(2, 4, 4, 4, 4)) for _ in range(2)]
    sim.compute_encodings(lambda model: [model(*d) for d in data])
    out = sim.model(*data[0])
    assert torch.isfinite(out) and abs(out.item() - m(*data[0]).item()) < 0.1


def test_embedding_norms_activations_elementwise():
    torch.manual_seed(0)
    m = Mixed().eval()
    sim = QuantizationSimModel(m)
    mods = dict(sim.quantized_modules())
    for name in ["emb", "ln", "gn", "fc", *[f"acts.{i}" for i in range(len(ACTIVATIONS))], "sub", "div", "gap"]:
        assert name in mods, f"{name} not quantized"
    assert mods["emb"].input_quantizers[0] is None  # integer indices are never quantized
    assert mods["emb"].param_quantizers["weight"] is not None
    assert mods["acts.9"].param_quantizers["weight"] is not None  # PReLU slope
    assert "flip" in str(sim)  # unknown op listed as left in float
    idx = torch.randint(0, 20, (3, 5))
    sim.compute_encodings([torch.randint(0, 20, (3, 5)) for _ in range(3)])
    y, ref = sim.model(idx), m(idx)
    assert y.shape == ref.shape and (y - ref).abs().max() < 0.1


def test_in_place_modifies_the_given_model():
    m = nn.Sequential(nn.Linear(3, 3))
    sim = QuantizationSimModel(m, in_place=True)
    assert sim.model is m and hasattr(m[0], "param_quantizers")


def test_autocast_bfloat16_and_batch_size_one():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()
    m(torch.randn(1, 3, 6, 6))
    sim = QuantizationSimModel(m)
    sim.compute_encodings([torch.randn(4, 3, 6, 6)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sim.model(torch.randn(1, 3, 6, 6))
    assert y.shape == (1, 2) and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_inf_in_calibration_data_is_an_error(bad):
    sim = QuantizationSimModel(nn.Sequential(nn.Linear(3, 3)))
    x = torch.randn(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"0\.input_quantizers\[0\].*(inf|Inf)"):
        sim.compute_encodings([x])
