"""fold_all_batch_norms_to_scale / reestimate_and_fold on a QuantizationSimModel after QAT.

References: integer weights computed with torch.fake_quantize-compatible arithmetic (quantsim.numerics.quantize,
checked against torch's kernels in test_qat.py) before and after folding, and the sim's own outputs before folding.
"""
import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import quantsim.config
from quantsim import QuantizationSimModel, fold_all_batch_norms_to_scale, numerics, reestimate_and_fold
from quantsim import reestimate_bn_stats
from quantsim.batchnorm import find_layer_bn_pairs


def preset(name="default", **defaults):
    """A preset's JSON with some `defaults` entries replaced (e.g. strict_symmetric="True")."""
    with open(Path(quantsim.config.__file__).parent / "presets" / f"{name}.json") as f:
        cfg = json.load(f)
    for key, value in defaults.items():
        if key == "param_symmetric":
            cfg["defaults"]["params"]["is_symmetric"] = value
        elif key == "gemm_per_channel":
            cfg["op_type"].pop("Gemm", None)
        else:
            cfg["defaults"][key] = value
    return cfg


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)  # with bias
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x)) + x  # BN carries the output quantizer (no activation after it)


class Net(nn.Module):
    """conv(no bias)-BN-ReLU, a nested block, a transposed conv with BN, Linear-BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Inner(8))
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2, bias=False)
        self.up_bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5, bias=False)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.relu(self.up_bn(self.up(x)))
        return self.fc_bn(self.fc(torch.flatten(self.pool(x), 1)))


PAIRS = [("stem.0", "stem.1"), ("blocks.0.conv", "blocks.0.bn"), ("up", "up_bn"), ("fc", "fc_bn")]


def data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(n)]


def trained_sim(config, gamma_low=0.5, seed=0, steps=3):
    """A calibrated sim after a few QAT steps, BN statistics re-estimated (eval-time BN is the folded one)."""
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(gamma_low, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    sim = QuantizationSimModel(model.eval(), config=config)
    sim.compute_encodings(data(), progress=False)
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.02, momentum=0.9)
    sim.model.train()
    for x in data(steps, seed=1):
        opt.zero_grad()
        sim.model(x).square().mean().backward()
        opt.step()
    sim.model.eval()
    return sim


def weight_integers(sim):
    """{layer: (integers in channel-major layout, qmin, qmax)} for every active per-channel weight quantizer."""
    out = {}
    for name, module in sim.quantized_modules():
        q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
        if q is None or not q.enabled or q.channel_axis is None:
            continue
        with torch.no_grad():
            q(module.weight)  # the encoding the sim uses for the current weights
        w = q._channel_major(module.weight.detach())
        out[name] = numerics.quantize(w, q.get_scale(), q.get_offset(), q.qmin, q.qmax, axis=0)
    return out


def gamma_signs(sim):
    return {layer: torch.sign(sim.model.get_submodule(bn).weight.detach()) for layer, bn in PAIRS}


def fold(sim):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = fold_all_batch_norms_to_scale(sim)
    return pairs, [str(w.message) for w in caught]


def assert_outputs_match(before, after, out_q, min_identical=0.99):
    diff = (before - after).abs()
    assert (diff == 0).float().mean().item() >= min_identical
    assert diff.max().item() <= out_q.get_scale().item() * 1.0001  # at most one output step


# ============================================================================ integers and outputs


def test_integers_unchanged_and_outputs_match_after_qat():
    sim = trained_sim(preset(gemm_per_channel=True))
    x = torch.cat(data(4, seed=2))
    with torch.no_grad():
        before = sim.model(x)
    ints = weight_integers(sim)
    assert set(ints) >= {p[0] for p in PAIRS}
    pairs, msgs = fold(sim)
    assert list(pairs) == PAIRS and msgs == []
    after_ints = weight_integers(sim)
    for layer in ints:
        assert torch.equal(after_ints[layer], ints[layer]), layer
    for _, bn in PAIRS:
        assert isinstance(sim.model.get_submodule(bn), nn.Identity)
    with torch.no_grad():
        after = sim.model(x)
    assert_outputs_match(before, after, sim.model.fc.output_quantizers[0])
    # folded encodings are frozen: another forward keeps them
    scales = {n: q.get_scale().clone() for n, q in sim.named_quantizers() if "weight" in n}
    with torch.no_grad():
        sim.model(x)
    for n, q in sim.named_quantizers():
        if "weight" in n:
            assert torch.equal(q.get_scale(), scales[n]), n


def test_bias_false_layers_get_a_bias_and_output_quantizers_move():
    sim = trained_sim(preset(gemm_per_channel=True))
    bn_out = sim.model.blocks[0].bn.output_quantizers[0]
    assert sim.model.stem[0].bias is None and sim.model.fc.bias is None
    fold(sim)
    for layer in ("stem.0", "up", "fc"):
        bias = sim.model.get_submodule(layer).bias
        assert isinstance(bias, nn.Parameter) and bias.requires_grad
    assert sim.model.blocks[0].conv.output_quantizers[0] is bn_out  # the BN carried it: now the conv does
    assert sim.model.stem[0].output_quantizers[0] is None  # the ReLU after the BN carries it
    assert sim.model.stem[2].output_quantizers[0] is not None


def test_sim_records_follow_the_fold():
    sim = trained_sim(preset(gemm_per_channel=True))
    fold(sim)
    names = {n.name for n in sim.graph}
    assert not names & {bn for _, bn in PAIRS}
    assert sim.graph["blocks.0.add"].inputs[0] == "blocks.0.conv"  # the add now reads the conv
    assert sim.graph["fc"].is_model_output
    assert "bias" in sim.graph["stem.0"].params and "bias" in sim.placement["stem.0"].params
    assert sim.placement["blocks.0.conv"].outputs[0] is not None and "blocks.0.bn" not in sim.placement
    text = str(sim)
    assert "blocks.0.bn" not in text and "blocks.0.conv" in text


def test_find_layer_bn_pairs_sees_through_the_sim():
    sim = trained_sim(preset(gemm_per_channel=True), steps=1)
    assert find_layer_bn_pairs(sim.model) == PAIRS


# ============================================================================ negative gamma


def test_negative_gamma_on_strict_symmetric_grid_flips_integers_exactly():
    sim = trained_sim(preset(gemm_per_channel=True, strict_symmetric="True"), gamma_low=-1.5)
    signs = gamma_signs(sim)
    assert any((s < 0).any() for s in signs.values())
    ints = weight_integers(sim)
    x = torch.cat(data(4, seed=2))
    with torch.no_grad():
        before = sim.model(x)
    _, msgs = fold(sim)
    assert msgs == []
    after_ints = weight_integers(sim)
    for layer, s in signs.items():
        assert torch.equal(after_ints[layer], ints[layer] * s.view(-1, *[1] * (ints[layer].dim() - 1))), layer
    with torch.no_grad():
        assert_outputs_match(before, sim.model(x), sim.model.fc.output_quantizers[0])


def test_negative_gamma_on_signed_grid_clamps_the_most_negative_integer_and_says_so():
    sim = trained_sim(preset(gemm_per_channel=True), gamma_low=-1.5)
    signs = gamma_signs(sim)
    ints = weight_integers(sim)
    expected_clamped = sum(int(((ints[l] == -128) & (signs[l] < 0).view(-1, *[1] * (ints[l].dim() - 1))).sum())
                           for l in signs)
    assert expected_clamped > 0
    _, msgs = fold(sim)
    reported = sum(int(re.search(r": (\d+) weight integer", m).group(1)) for m in msgs if "became 127" in m)
    assert reported == expected_clamped
    after_ints = weight_integers(sim)
    for layer, s in signs.items():
        flipped = (ints[layer] * s.view(-1, *[1] * (ints[layer].dim() - 1))).clamp(-128, 127)
        assert torch.equal(after_ints[layer], flipped), layer


def test_negative_gamma_on_asymmetric_weight_grid_is_exact():
    sim = trained_sim(preset(gemm_per_channel=True, param_symmetric="False"), gamma_low=-1.5)
    q = sim.model.stem[0].param_quantizers["weight"]
    assert not q.symmetric
    with torch.no_grad():
        q(sim.model.stem[0].weight)
    old_scale, old_offset = q.get_scale().clone(), q.get_offset().clone()
    x = torch.cat(data(4, seed=2))
    with torch.no_grad():
        before = sim.model(x)
        w_hat = q(sim.model.stem[0].weight).clone()
    gamma = sim.model.stem[1].weight.detach().clone()
    sigma = torch.sqrt(sim.model.stem[1].running_var + sim.model.stem[1].eps)
    _, msgs = fold(sim)
    assert msgs == []
    with torch.no_grad():
        w_hat_after = q(sim.model.stem[0].weight)
    # the dequantized weights are exactly the old ones scaled by gamma/sigma (up to float rounding)
    torch.testing.assert_close(w_hat_after, w_hat * (gamma / sigma).view(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)
    neg = gamma < 0
    assert torch.equal(q.get_offset()[neg], -255 - old_offset[neg])
    assert torch.equal(q.get_offset()[~neg], old_offset[~neg])
    torch.testing.assert_close(q.get_scale(), old_scale * (gamma / sigma).abs())
    with torch.no_grad():
        assert_outputs_match(before, sim.model(x), sim.model.fc.output_quantizers[0])


def test_unsigned_weight_grid_with_negative_gamma_is_left_with_a_warning():
    sim = trained_sim(preset(gemm_per_channel=True, unsigned_symmetric="True"), gamma_low=-1.5, steps=0)
    q = sim.model.stem[0].param_quantizers["weight"]
    q.qmin, q.qmax = 0, 255  # pretend the weights were all non-negative at calibration (unsigned grid)
    q.set_encoding(q.get_scale(), freeze=True)
    pairs, msgs = fold(sim)
    assert ("stem.0", "stem.1") not in pairs
    assert any("'stem.1' not folded" in m and "unsigned" in m for m in msgs)
    assert isinstance(sim.model.stem[1], nn.BatchNorm2d)


# ============================================================================ other cases


def test_per_tensor_weights_are_recalibrated_with_a_warning():
    sim = trained_sim("default")  # AIMET's default: Gemm weights per tensor
    assert sim.model.fc.param_quantizers["weight"].channel_axis is None
    pairs, msgs = fold(sim)
    assert ("fc", "fc_bn") in pairs
    assert any("'fc_bn' folded into 'fc'" in m and "re-calibrated" in m for m in msgs)
    q = sim.model.fc.param_quantizers["weight"]
    w = sim.model.fc.weight.detach()
    assert q.frozen and q.get_scale().item() == pytest.approx(max(w.max().item() / 127, -w.min().item() / 128))


def test_bn_before_conv_is_left_with_a_warning_and_the_model_still_runs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4))
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
    sim = QuantizationSimModel(model.eval())
    sim.compute_encodings(data(), progress=False)
    pairs, msgs = fold(sim)
    assert list(pairs) == [("3", "4")]
    assert any("'2' (before conv '3') not folded" in m for m in msgs)
    assert isinstance(sim.model[2], nn.BatchNorm2d)
    with torch.no_grad():
        assert sim.model(data(1)[0]).shape == (8, 4, 4, 4)


def test_reestimate_and_fold_after_qat():
    sim = trained_sim(preset(gemm_per_channel=True))
    ref = copy.deepcopy(sim)
    batches = data(4, seed=3)
    reestimate_bn_stats(ref.model, batches, progress=False)
    x = torch.cat(data(4, seed=2))
    with torch.no_grad():
        expected = ref.model.eval()(x)
    pairs = reestimate_and_fold(sim, batches, num_batches=10, progress=False)
    assert list(pairs) == PAIRS
    with torch.no_grad():
        assert_outputs_match(expected, sim.model(x), sim.model.fc.output_quantizers[0])


def test_weights_on_rounding_ties_keep_their_integers():
    """w/s on exact .5 ties: float rounding of w*gamma/sigma and s*|gamma/sigma| would move some integers by one;
    the fold puts those weights on their grid points instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)).eval()
    s = torch.rand(8) * 0.01 + 0.001
    k = torch.randint(-120, 120, model[0].weight.shape).float()
    with torch.no_grad():
        model[0].weight.copy_((k + 0.5) * s.view(-1, 1, 1, 1))
        model[1].weight.uniform_(-2.0, 2.0)
        model[1].running_var.uniform_(0.3, 3.0)
    sim = QuantizationSimModel(model, config=preset(strict_symmetric="True"))
    conv, bn = sim.model[0], sim.model[1]
    q = conv.param_quantizers["weight"]
    q.set_encoding(s, freeze=True)
    before = numerics.quantize(conv.weight.detach(), q.get_scale(), q.get_offset(), q.qmin, q.qmax, axis=0)
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    naive = numerics.quantize(conv.weight.detach() * a.view(-1, 1, 1, 1), s * a.abs(), q.get_offset(),
                              q.qmin, q.qmax, axis=0)
    expected = before * torch.sign(a).view(-1, 1, 1, 1)
    assert (naive != expected).any()  # the float products do cross ties here
    bn.output_quantizers[0].set_encoding(torch.tensor(0.05), torch.tensor(-128.0))
    pairs, _ = fold(sim)
    assert list(pairs) == [("0", "1")]
    after = numerics.quantize(conv.weight.detach(), q.get_scale(), q.get_offset(), q.qmin, q.qmax, axis=0)
    assert torch.equal(after, expected)
