"""BatchNorm utilities: exact re-estimation, frozen BN, finding and folding layer/BN pairs.

References are computed independently here (captured BN inputs -> float64 mean/var; unfolded eval outputs).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsim.batchnorm import (
    ChannelMoments,
    find_bn_layer_pairs,
    find_layer_bn_pairs,
    fold_all_batch_norms,
    fold_bn_into_layer,
    freeze_bn_stats,
    reestimate_bn_stats,
    unfreeze_bn_stats,
)


def bns_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bns_of(model):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.randn(c, generator=g))
                bn.bias.copy_(torch.randn(c, generator=g))
    return model


def buffers_of(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_buffers_identical(model, saved):
    now = dict(model.named_buffers())
    assert now.keys() == saved.keys()
    for n, b in saved.items():
        assert now[n].dtype == b.dtype and torch.equal(now[n], b), n


def reference_stats(model, batches, forward=lambda m, b: m(b)):
    """float64 mean / unbiased var of every BN's input, as fed during re-estimation: BN layers in train mode
    (normalising with batch statistics), every other module in its own mode."""
    ref = copy.deepcopy(model)
    captured = {n: [] for n, _ in bns_of(ref)}
    for n, bn in bns_of(ref):
        bn.train()
        bn.register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            forward(ref, b)
    out = {}
    for n, xs in captured.items():
        x = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)  # (C, all)
        out[n] = (x.mean(dim=1), x.var(dim=1, unbiased=True), len(xs))
    return out


class Deep(nn.Module):
    """conv-bn-relu-conv-bn plus a Linear-BatchNorm1d head: BNs deep inside, 4-D and 2-D inputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.bn2 = nn.BatchNorm2d(5, momentum=None)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(5, 4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.bn3(self.fc(self.drop(x.mean(dim=(2, 3)))))


def make_batches(n=5, bs=8, offset=3.0, scale=2.0, shape=(3, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, *shape, generator=g) * scale + offset + i for i in range(n)]


# ============================================================================ re-estimation


def test_reestimate_matches_float64_reference_deep_model():
    torch.manual_seed(0)
    model = randomize_bn(Deep()).eval()
    batches = make_batches()
    ref = reference_stats(model, batches)
    handle = reestimate_bn_stats(model, batches, progress=False)
    for name, bn in bns_of(model):
        mean, var, calls = ref[name]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert bn.running_mean.dtype == torch.float32
        assert int(bn.num_batches_tracked) == calls == 5
        assert handle.stats[name].count == {"bn1": 5 * 8 * 64, "bn2": 5 * 8 * 36, "bn3": 5 * 8}[name]
    assert handle.num_batches == 5
    # pooled over all samples, not the average of per-batch variances
    per_batch = torch.stack([torch.var(b.double().transpose(0, 1).reshape(3, -1), dim=1) for b in batches]).mean(0)
    pooled = torch.cat([b.double().transpose(0, 1).reshape(3, -1) for b in batches], 1).var(dim=1)
    assert (pooled - per_batch).abs().min() > 0.5  # the batches' means differ, so the two are far apart


def test_reestimate_is_numerically_careful_with_large_offsets():
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(16, 3, 8, 8) * 1e-2 + 1e4 for _ in range(10)]
    ref = reference_stats(model, batches)
    reestimate_bn_stats(model, batches, progress=False)
    mean, var, _ = ref["0"]
    torch.testing.assert_close(model[0].running_mean.double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-5, atol=0)


def test_remove_restores_previous_stats_bit_identically():
    model = randomize_bn(Deep()).eval()
    before = buffers_of(model)
    handle = reestimate_bn_stats(model, make_batches(), progress=False)
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])
    handle.remove()
    assert_buffers_identical(model, before)
    handle.remove()  # idempotent
    assert_buffers_identical(model, before)


def test_only_bn_in_train_mode_during_run_and_modes_restored():
    model = Deep()
    model.eval()
    model.drop.train()  # a mixed state that must come back as it was
    model.bn1.momentum = 0.25
    flags = {n: m.training for n, m in model.named_modules()}
    seen = {}

    def forward_fn(m, batch):
        seen.update({n: mod.training for n, mod in m.named_modules()})
        seen["grad"] = torch.is_grad_enabled()
        return m(batch)

    reestimate_bn_stats(model, make_batches(2), forward_fn=forward_fn, progress=False)
    assert all(seen[n] for n, _ in bns_of(model))
    assert all(seen[n] == flags[n] for n in flags if not n.startswith("bn"))
    assert seen["grad"] is False
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.bn1.momentum == 0.25 and model.bn2.momentum is None and model.bn3.momentum == 0.1


def test_exception_in_forward_fn_restores_everything():
    model = randomize_bn(Deep()).train()
    model.bn2.momentum = 0.5
    flags = {n: m.training for n, m in model.named_modules()}
    before = buffers_of(model)
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        reestimate_bn_stats(model, make_batches(), forward_fn=forward_fn, progress=False)
    assert_buffers_identical(model, before)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.bn2.momentum == 0.5 and model.bn1.momentum == 0.1
    assert all(not bn._forward_pre_hooks for _, bn in bns_of(model))


def test_generator_dict_batches_and_num_batches_limit():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    batches = make_batches(6)
    consumed = []

    def gen():  # no len()
        for b in batches:
            consumed.append(1)
            yield {"image": b, "label": 0}

    ref = reference_stats(model, batches[:3])
    handle = reestimate_bn_stats(model, gen(), num_batches=3, forward_fn=lambda m, b: m(b["image"]), progress=False)
    assert handle.num_batches == 3 and len(consumed) == 3
    assert handle.stats["1"].count == 3 * 8 * 8 * 8
    torch.testing.assert_close(model[1].running_var.double(), ref["1"][1], rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3


def test_iterable_dataset_with_tuple_batches_and_syncbatchnorm():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(3)
            for _ in range(12):
                yield torch.randn(3, 4, 4, generator=g) * 3 + 1, 0

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)).eval()
    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)
    ref = reference_stats(model, [x for x, _ in loader])
    handle = reestimate_bn_stats(model, loader, progress=False)  # (input, target) batches, default forward
    assert handle.num_batches == 3
    torch.testing.assert_close(model[1].running_mean.double(), ref["1"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), ref["1"][1], rtol=1e-5, atol=1e-6)


def test_empty_loader_raises_and_leaves_model_untouched():
    model = randomize_bn(Deep()).eval()
    before = buffers_of(model)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn_stats(model, iter([]), progress=False)
    assert_buffers_identical(model, before)
    assert not model.bn1.training


def test_unused_bn_warns_and_keeps_stats():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x)

    model = randomize_bn(M()).eval()
    before = model.unused.running_var.clone()
    with pytest.warns(UserWarning, match="'unused'"):
        reestimate_bn_stats(model, make_batches(2), progress=False)
    assert torch.equal(model.unused.running_var, before)


def test_channel_moments_merge_and_rebase_pool_exactly():
    xs = make_batches(4, offset=50.0)
    a, b, whole = ChannelMoments(3), ChannelMoments(3), ChannelMoments(3)
    for x in xs[:2]:
        a.update(x)
    for x in xs[2:]:
        b.update(x)
    for x in xs:
        whole.update(x)
    assert not torch.equal(a.shift, b.shift)
    a.merge(b)
    ref = torch.cat([x.double().transpose(0, 1).reshape(3, -1) for x in xs], 1)
    for acc in (a, whole):
        torch.testing.assert_close(acc.mean(), ref.mean(1), rtol=1e-12, atol=0)
        torch.testing.assert_close(acc.var(), ref.var(1), rtol=1e-10, atol=0)
    assert a.count == whole.count and a.batches == 4


def test_reestimate_frozen_bn_is_reestimated_and_stays_frozen():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).train()
    freeze_bn_stats(model)
    batches = make_batches(2)
    unfrozen = copy.deepcopy(model)
    unfreeze_bn_stats(unfrozen)
    ref = reference_stats(unfrozen, batches)
    reestimate_bn_stats(model, batches, progress=False)
    torch.testing.assert_close(model[1].running_mean.double(), ref["1"][0], rtol=1e-5, atol=1e-6)
    before = model[1].running_mean.clone()
    model(batches[0])  # still frozen in train mode
    assert torch.equal(model[1].running_mean, before)


# ============================================================================ frozen BN


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def train_step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()


def test_frozen_bn_keeps_stats_in_train_mode_but_trains_gamma_beta():
    torch.manual_seed(0)
    model = randomize_bn(Net())
    keys = list(model.state_dict())
    freeze_bn_stats(model)
    model.eval()
    model.train()  # freezing survives mode switches
    stats = {n: b.clone() for n, b in model.bn.named_buffers()}
    gamma, beta = model.bn.weight.clone(), model.bn.bias.clone()
    x = torch.randn(8, 3, 6, 6)
    train_step(model, x)
    for n, b in model.bn.named_buffers():
        assert torch.equal(b, stats[n]), n
    assert model.bn.weight.grad.abs().sum() > 0 and model.bn.bias.grad.abs().sum() > 0
    assert not torch.equal(model.bn.weight, gamma) and not torch.equal(model.bn.bias, beta)
    assert model.training and model.bn.training and model.drop.training
    # the frozen BN normalises with the running statistics
    y = model.conv(x)
    bn = model.bn
    expected = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(bn(y), expected)
    # dropout elsewhere still active
    feats = torch.ones(64, 4)
    assert (model.drop(feats) == 0).any()
    assert list(model.state_dict()) == keys
    copied = copy.deepcopy(model)  # copies stay frozen
    train_step(copied, x)
    assert torch.equal(copied.bn.running_mean, stats["running_mean"])


def test_unfreeze_restores_normal_behaviour():
    model = randomize_bn(Net()).train()
    freeze_bn_stats(model)
    unfreeze_bn_stats(model)
    assert not model.bn._forward_pre_hooks and not model.bn._forward_hooks
    before = model.bn.running_mean.clone()
    train_step(model, torch.randn(8, 3, 6, 6))
    assert not torch.equal(model.bn.running_mean, before)
    assert int(model.bn.num_batches_tracked) == 1


def test_frozen_bn_restores_training_flag_when_forward_raises():
    bn = nn.BatchNorm2d(4).train()
    freeze_bn_stats(bn)
    with pytest.raises(RuntimeError):
        bn(torch.randn(2, 5, 3, 3))  # wrong channel count
    assert bn.training


# ============================================================================ folding


def assert_fold_exact(model, x, expected_pairs, atol=1e-5, **kwargs):
    model = randomize_bn(model).eval()
    with torch.no_grad():
        ref = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_all_batch_norms(folded, **kwargs)
    assert list(pairs) == expected_pairs
    for p in pairs:
        bn_path = p[1] if p in pairs.backward else p[0]
        assert isinstance(folded.get_submodule(bn_path), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, atol=atol, rtol=1e-5)
    return folded


class Wrapper(nn.Module):
    """User-defined wrapper with functional ops around a nested Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)))
        self.head = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3, affine=False)

    def forward(self, x):
        x = F.relu(self.body(x))
        return self.bn(self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))) * 2


@pytest.mark.parametrize(
    "model, shape",
    [
        (nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4)), (2, 3, 9)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)), (2, 3, 9, 9)),
        (nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4)), (2, 3, 5, 5, 5)),
        (nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)), (2, 3, 5, 5)),
        (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, padding=1), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
        (nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4)), (2, 4, 5, 5)),
        (nn.Sequential(nn.ConvTranspose1d(4, 6, 2, groups=2, stride=2), nn.BatchNorm1d(6)), (2, 4, 5)),
        (nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8)), (2, 4, 6, 6)),
        (nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5)),
        (nn.Sequential(nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6, affine=False)), (4, 5)),
    ],
    ids=["conv1d", "conv2d", "conv3d", "convT2d", "convT2d-groups2", "convT2d-depthwise", "convT1d-groups2",
         "conv2d-grouped-nobias", "linear", "linear-nobias-noaffine"],
)
def test_fold_matches_unfolded_eval_model(model, shape):
    torch.manual_seed(0)
    folded = assert_fold_exact(model, torch.randn(shape), [("0", "1")])
    assert isinstance(folded[0].bias, nn.Parameter) and folded[0].bias.requires_grad


def test_fold_nested_sequential_and_wrapper_module():
    torch.manual_seed(0)
    folded = assert_fold_exact(Wrapper(), torch.randn(2, 3, 6, 6), [("body.0.0", "body.0.1"), ("head", "bn")])
    assert folded.body[0][0].bias is not None


def test_not_folded_when_layer_output_has_second_user():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn2(self.conv2(x))

    model = randomize_bn(Residual()).eval()
    assert find_layer_bn_pairs(model) == [("conv2", "bn2")]
    pairs = fold_all_batch_norms(model)
    assert list(pairs) == [("conv2", "bn2")]
    assert isinstance(model.bn, nn.BatchNorm2d)  # not folded


def test_subclass_with_own_forward_is_not_paired():
    class PaddedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1), mode="reflect"))

    model = nn.Sequential(PaddedConv(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert find_layer_bn_pairs(model) == [("2", "3")]


def test_fold_bn_into_layer_returns_gamma_over_sigma():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = randomize_bn(nn.BatchNorm2d(4, eps=1e-3))
    w = conv.weight.detach().clone()
    expected = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    factor = fold_bn_into_layer(conv, bn)
    torch.testing.assert_close(factor, expected)
    torch.testing.assert_close(conv.weight.detach(), w * expected.view(-1, 1, 1, 1))
    torch.testing.assert_close(conv.bias.detach(), bn.bias.detach() - bn.running_mean * expected)
    assert isinstance(conv.bias, nn.Parameter)

    no_affine = randomize_bn(nn.BatchNorm1d(4, affine=False))
    factor = fold_bn_into_layer(nn.Linear(3, 4), no_affine)
    torch.testing.assert_close(factor, 1 / torch.sqrt(no_affine.running_var + no_affine.eps))


# ---------------------------------------------------------------------------- BN before conv


def bn_conv(padding=0, padding_mode="zeros", groups=1):
    conv = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode, groups=groups)
    return nn.Sequential(nn.BatchNorm2d(4), conv)


@pytest.mark.parametrize("padding, mode, groups", [(0, "zeros", 1), (0, "zeros", 2), (1, "reflect", 1),
                                                    (2, "replicate", 2), (1, "circular", 1)])
def test_bn_before_conv_folds_forward_where_exact(padding, mode, groups):
    torch.manual_seed(0)
    model = bn_conv(padding, mode, groups)
    assert find_bn_layer_pairs(model) == [("0", "1")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_fold_exact(model, torch.randn(2, 4, 7, 7), [("0", "1")], atol=1e-4)


def test_bn_before_zero_padded_conv_warns_and_is_kept():
    model = randomize_bn(bn_conv(padding=1)).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="BatchNorm '0'"):
        pairs = fold_all_batch_norms(model)
    assert list(pairs) == []
    assert isinstance(model[0], nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_bn_before_zero_padded_conv_with_zero_shift_folds():
    model = bn_conv(padding=1).eval()
    with torch.no_grad():  # mean = 0, beta = 0: the BN only scales, so zero padding commutes with it
        model[0].running_var.uniform_(0.5, 2.0)
        model[0].weight.uniform_(-2, 2)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        ref = model(x)
    assert list(fold_all_batch_norms(model)) == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_both_directions_into_one_conv_and_fold_forward_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    folded = assert_fold_exact(model, torch.randn(2, 4, 7, 7), [("1", "2"), ("0", "1")])
    assert folded.__class__ is nn.Sequential
    kept = assert_fold_exact(copy.deepcopy(model), torch.randn(2, 4, 7, 7), [("1", "2")], fold_forward=False)
    assert isinstance(kept[0], nn.BatchNorm2d)


def test_layer_with_shared_weight_is_not_folded():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))).eval()
    model[2].weight = model[0].weight  # tied: folding would change the other conv too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(fold_all_batch_norms(model)) == []
    messages = sorted(str(w.message) for w in caught)
    assert "BatchNorm '1' not folded: '0' shares its weight" in messages[1]  # neither after conv 0...
    assert "BatchNorm '1' (before conv '2') not folded: '2' shares its weight" in messages[0]  # ...nor into conv 2
    assert isinstance(model[1], nn.BatchNorm2d)
