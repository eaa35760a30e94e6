"""BatchNorm utilities that do not need the quantization sim: exact statistics re-estimation, frozen-BN
QAT, and folding BatchNorm into the neighbouring Conv / ConvTranspose / Linear.

The math (pooled moments, folding formulas, when BN->Conv folding is exact) is in docs/batchnorm_math.md.
"""
from __future__ import annotations

import collections
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm

from .graph import op_type_of, trace
from .utils import run_batches

__all__ = [
    "ChannelMoments",
    "BNReestimationHandle",
    "reestimate_bn_stats",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "is_bn_frozen",
    "find_layer_bn_pairs",
    "find_bn_layer_pairs",
    "fold_bn_into_layer",
    "fold_bn_into_next_conv",
    "fold_all_batch_norms",
    "FoldedPairs",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _tracks_stats(bn: nn.Module) -> bool:
    return isinstance(bn, _BatchNorm) and bn.running_mean is not None and bn.running_var is not None


def _bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if _tracks_stats(m)]


def _acc_device(device: torch.device) -> torch.device:
    # float64 everywhere except backends without it (Apple MPS): accumulate those on the CPU.
    return torch.device("cpu") if device.type == "mps" else device


# ============================================================================ statistics re-estimation


class ChannelMoments:
    """Per-channel (count, sum, sum of squares) of BN inputs, shifted and in float64, so pooled statistics
    are exact and the accumulation can be summed across workers (docs/batchnorm_math.md, "Pooled moments").

    `total` and `total_sq` are sums of (x - shift) and (x - shift)^2; `shift` is the first batch's channel
    mean. Accumulators with different shifts combine after `rebase` to a common shift; with equal shifts,
    count/total/total_sq simply add (an all-reduce of `count`, `total`, `total_sq` after broadcasting one shift).
    """

    def __init__(self, num_channels: int, device: torch.device | str | None = None):
        self.num_channels = num_channels
        self.count = 0  # elements per channel (same for every channel); Python int: exact
        self.batches = 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(num_channels, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(num_channels, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a BN input of shape (N, C, *) (channels on dim 1)."""
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected a (N, {self.num_channels}, ...) input, got shape {tuple(x.shape)}")
        dims = [0] + list(range(2, x.dim()))
        x = x.detach().to(device=self.total.device, dtype=torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=dims)
        view = (1, -1) + (1,) * (x.dim() - 2)
        d = x - self.shift.view(view)
        self.total += d.sum(dim=dims)
        self.total_sq += d.square().sum(dim=dims)
        self.count += x.numel() // self.num_channels
        self.batches += 1

    @torch.no_grad()
    def rebase(self, shift: torch.Tensor) -> None:
        """Re-express the sums around another shift (exact algebra; needed before summing accumulators)."""
        shift = shift.to(device=self.total.device, dtype=torch.float64)
        if self.shift is None:
            self.shift = shift.clone()
            return
        delta = self.shift - shift  # x - new = (x - old) + delta
        self.total_sq += 2 * delta * self.total + self.count * delta.square()
        self.total += self.count * delta
        self.shift = shift.clone()

    def merge(self, other: "ChannelMoments") -> None:
        """Pool `other`'s samples into this accumulator."""
        if other.count == 0:
            return
        other_total, other_sq = other.total, other.total_sq
        if self.shift is None:
            self.shift = other.shift.clone()
        elif not torch.equal(self.shift, other.shift):
            tmp = ChannelMoments(other.num_channels, other.total.device)
            tmp.count, tmp.shift = other.count, other.shift.clone()
            tmp.total, tmp.total_sq = other.total.clone(), other.total_sq.clone()
            tmp.rebase(self.shift)
            other_total, other_sq = tmp.total, tmp.total_sq
        self.total += other_total.to(self.total.device)
        self.total_sq += other_sq.to(self.total.device)
        self.count += other.count
        self.batches += other.batches

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no samples accumulated")
        return self.shift + self.total / self.count

    def var(self, unbiased: bool = True) -> torch.Tensor:
        dof = self.count - 1 if unbiased else self.count
        if dof <= 0:
            raise ValueError(f"variance needs more samples (have {self.count} per channel)")
        return ((self.total_sq - self.total.square() / self.count) / dof).clamp_min(0)


class BNReestimationHandle:
    """Result of `reestimate_bn_stats`: pooled moments per BN path (`stats`) and `remove()` to undo."""

    def __init__(self, saved: list[tuple], stats: dict[str, ChannelMoments], num_batches: int):
        self._saved = saved
        self.stats = stats
        self.num_batches = num_batches

    def remove(self) -> None:
        """Restore every re-estimated BN's previous running_mean / running_var / num_batches_tracked exactly."""
        if self._saved:
            _restore_buffers(self._saved)
            self._saved = []

    def __repr__(self) -> str:
        return f"BNReestimationHandle({len(self.stats)} BN layers, {self.num_batches} batches)"


def _save_buffers(bns: list[tuple[str, _BatchNorm]]) -> list[tuple]:
    return [
        (bn, bn.running_mean.detach().clone(), bn.running_var.detach().clone(),
         None if bn.num_batches_tracked is None else bn.num_batches_tracked.detach().clone())
        for _, bn in bns
    ]


@torch.no_grad()
def _restore_buffers(saved: list[tuple]) -> None:
    for bn, mean, var, tracked in saved:
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if tracked is not None and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def reestimate_bn_stats(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int | None = 100,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
) -> BNReestimationHandle:
    """Set every BN's running_mean/var to the exact pooled mean / unbiased variance of the inputs it receives
    over up to `num_batches` batches (docs/batchnorm_math.md, "BN re-estimation").

    Only BN layers are put in train mode (frozen ones included), so each BN sees what the model feeds it when
    every BN normalises with its own batch statistics (as in training); other modules keep their mode.
    """
    bns = _bn_layers(model)
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for _, bn in bns]
    frozen = [(bn, bn.__dict__.get(_FROZEN)) for _, bn in bns]
    saved = _save_buffers(bns)
    stats = {n: ChannelMoments(bn.num_features, _acc_device(bn.running_mean.device)) for n, bn in bns}
    hooks = []

    def hook_for(acc: ChannelMoments):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                acc.update(x)
        return hook

    try:
        for name, bn in bns:
            bn.train()
            bn.momentum = 0.0  # torch's own running update leaves the buffers as they are
            bn.__dict__[_FROZEN] = False
            hooks.append(bn.register_forward_pre_hook(hook_for(stats[name]), with_kwargs=True))
        count = run_batches(model, dataloader, num_batches, forward_fn, desc="BN re-estimation", progress=progress)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in modes:
            m.training = flag
        for bn, momentum in momenta:
            bn.momentum = momentum
        for bn, flag in frozen:
            if flag is None:
                bn.__dict__.pop(_FROZEN, None)
            else:
                bn.__dict__[_FROZEN] = flag
        _restore_buffers(saved)  # undo the run's num_batches_tracked increments (everything, on an error)

    for name, bn in bns:
        acc = stats[name]
        if acc.count < 2:
            warnings.warn(f"quantsim: BatchNorm '{name}' received {'no' if acc.count == 0 else 'too few'} "
                          "inputs during re-estimation; its statistics are unchanged", stacklevel=2)
            continue
        bn.running_mean.copy_(acc.mean().to(bn.running_mean))
        bn.running_var.copy_(acc.var(unbiased=True).to(bn.running_var))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(acc.batches)  # the stats now summarise this many batches
    return BNReestimationHandle(saved, stats, count)


# ============================================================================ frozen BN

_FROZEN = "_quantsim_bn_frozen"
_WAS_TRAINING = "_quantsim_bn_was_training"


def _frozen_pre_hook(module: nn.Module, args) -> None:
    if module.__dict__.get(_FROZEN) and module.training:
        module.__dict__[_WAS_TRAINING] = True
        module.training = False  # this call normalises with, and does not update, the running stats


def _frozen_post_hook(module: nn.Module, args, output) -> None:
    if module.__dict__.pop(_WAS_TRAINING, False):
        module.training = True


def _has_freeze_hooks(bn: nn.Module) -> bool:
    return any(h is _frozen_pre_hook for h in bn._forward_pre_hooks.values())


def is_bn_frozen(bn: nn.Module) -> bool:
    return bool(bn.__dict__.get(_FROZEN, False))


def freeze_bn_stats(model: nn.Module) -> None:
    """Make every BN use and keep its running statistics even in train mode (frozen-BN QAT); gamma/beta still
    train and other modules' modes are untouched. A flag + hooks, so state_dict, copies and model.train() work."""
    for _, bn in _bn_layers(model):
        bn.__dict__[_FROZEN] = True
        if not _has_freeze_hooks(bn):
            bn.register_forward_pre_hook(_frozen_pre_hook)
            bn.register_forward_hook(_frozen_post_hook, always_call=True)  # runs even if forward raises


def unfreeze_bn_stats(model: nn.Module) -> None:
    """Undo `freeze_bn_stats`: BN layers follow their own train/eval mode again."""
    for m in model.modules():
        if _FROZEN not in m.__dict__ and not _has_freeze_hooks(m):
            continue
        m.__dict__.pop(_FROZEN, None)
        for hooks, fn in ((m._forward_pre_hooks, _frozen_pre_hook), (m._forward_hooks, _frozen_post_hook)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)  # torch keeps always_call flags here


# ============================================================================ finding pairs


def _is_stock(module: nn.Module, *methods: str) -> bool:
    """True when the module computes what its torch base class does (a subclass may not override forward)."""
    return all(getattr(getattr(type(module), m, None), "__module__", "").startswith("torch.") for m in methods)


def _foldable_layer(m: nn.Module) -> bool:
    if isinstance(m, _CONV):
        return _is_stock(m, "forward", "_conv_forward")
    if isinstance(m, (nn.Linear,) + _CONV_T):
        return _is_stock(m, "forward")
    return False


def _foldable_bn(m: nn.Module) -> bool:
    return _tracks_stats(m) and op_type_of(m) == "BatchNormalization" and _is_stock(m, "forward")


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _single_input(node: fx.Node, producer: fx.Node) -> bool:
    return len(node.args) == 1 and node.args[0] is producer and not node.kwargs


def _find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(layer->BN pairs, BN->Conv pairs) read off one fx trace of `model`."""
    graph, _ = trace(model)
    if graph is None:
        return [], []
    calls = [n for n in graph.nodes if n.op == "call_module"]
    times_called = collections.Counter(n.target for n in calls)
    mods = {n.target: model.get_submodule(n.target) for n in calls}

    def single_call(node: fx.Node | None) -> bool:
        return node is not None and node.op == "call_module" and times_called[node.target] == 1

    backward, forward = [], []
    for node in calls:
        mod, user = mods[node.target], _only_user(node)
        if not (single_call(node) and single_call(user) and _single_input(user, node)):
            continue
        nxt = mods[user.target]
        if _foldable_layer(mod) and _foldable_bn(nxt) and nxt.num_features == _out_channels(mod):
            # Linear: BN channel (dim 1) is Linear's feature dim only for 2-D input; only BatchNorm1d fits
            if isinstance(mod, nn.Linear) and not isinstance(nxt, nn.BatchNorm1d):
                continue
            backward.append((node.target, user.target))
        elif _foldable_bn(mod) and isinstance(nxt, _CONV) and _foldable_layer(nxt) \
                and nxt.in_channels == mod.num_features:
            forward.append((node.target, user.target))
    return backward, forward


def find_layer_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer path, BN path) for each Conv/ConvTranspose/Linear whose output goes only into a BN.

    Found on the fx graph; modules inside untraceable (opaque) submodules are not paired.
    """
    return _find_pairs(model)[0]


def find_bn_layer_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(BN path, conv path) for each BN whose output goes only into a Conv1d/2d/3d (candidates for folding
    forward; whether that is exact is decided by `fold_all_batch_norms`)."""
    return _find_pairs(model)[1]


# ============================================================================ folding


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with BN_eval(x) = scale * x + shift per channel."""
    if not _tracks_stats(bn):
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
    mean = bn.running_mean.detach().double()
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / sigma
    return scale, beta - mean * scale


def _set_bias(layer: nn.Module, bias64: torch.Tensor) -> None:
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(bias64.to(w), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias64.to(layer.bias))


@torch.no_grad()
def fold_bn_into_layer(layer: nn.Module, bn: _BatchNorm) -> torch.Tensor:
    """Fold `bn` (which follows `layer`) into the layer's weight and bias in place; returns gamma/sigma per
    output channel, the factor the weight was scaled by. The caller removes the BN.
    Math: docs/batchnorm_math.md, "Folding a BN into the layer before it"."""
    if not isinstance(layer, (nn.Linear,) + _CONV + _CONV_T):
        raise TypeError(f"cannot fold BatchNorm into {type(layer).__name__}")
    out = _out_channels(layer)
    if bn.num_features != out:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the layer has {out} output channels")
    scale, shift = _bn_affine(bn)
    scale, shift = scale.to(layer.weight.device), shift.to(layer.weight.device)
    w = layer.weight.detach().double()
    k = (1,) * (w.dim() - 2)
    if isinstance(layer, _CONV_T):  # weight (in, out/groups, *k); output o = g*out_g + j at [g*in_g:(g+1)*in_g, j]
        g = layer.groups
        w_new = (w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:]) * scale.view(g, 1, -1, *k)).view_as(w)
    else:  # Conv (out, in/groups, *k), Linear (out, in)
        w_new = w * scale.view(-1, 1, *k)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    layer.weight.copy_(w_new.to(layer.weight))
    _set_bias(layer, b * scale + shift)  # (b - mean) * gamma/sigma + beta
    return scale.to(layer.weight)


def _zero_padding(conv: nn.Module) -> bool:
    if conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return all(p == 0 for p in conv.padding)


def _forward_fold_problem(bn: _BatchNorm, conv: nn.Module) -> str | None:
    """Why folding `bn` forward into `conv` would change the output, or None when it is exact."""
    if conv.padding_mode != "zeros" or _zero_padding(conv):
        return None
    if torch.all(_bn_affine(bn)[1] == 0):
        return None
    return ("the conv zero-pads its input and the BN's shift beta - mean*gamma/sigma is not zero, "
            "so the border outputs would differ")


@torch.no_grad()
def fold_bn_into_next_conv(bn: _BatchNorm, conv: nn.Module) -> torch.Tensor:
    """Fold `bn` (which feeds `conv`) forward into the conv's weight and bias in place; returns gamma/sigma per
    input channel. Exact only under the condition in docs/batchnorm_math.md, "Folding a BN into the conv after it"."""
    if not isinstance(conv, _CONV):
        raise TypeError(f"can only fold a BatchNorm forward into Conv1d/2d/3d, not {type(conv).__name__}")
    if bn.num_features != conv.in_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the conv has {conv.in_channels} inputs")
    scale, shift = _bn_affine(bn)
    scale, shift = scale.to(conv.weight.device), shift.to(conv.weight.device)
    w = conv.weight.detach().double()  # (out, in/groups, *k)
    g, k = conv.groups, (1,) * (w.dim() - 2)
    out_g = w.shape[0] // g

    def per_out(v: torch.Tensor) -> torch.Tensor:  # per-input-channel vector -> (out, in/groups, 1...)
        return v.view(g, -1).repeat_interleave(out_g, dim=0).view(w.shape[0], w.shape[1], *k)

    b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
    b_new = b + (w * per_out(shift)).flatten(1).sum(dim=1)
    conv.weight.copy_((w * per_out(scale)).to(conv.weight))
    _set_bias(conv, b_new)
    return scale.to(conv.weight)


class FoldedPairs(list):
    """List of folded pairs in data-flow order: (layer, bn) for BNs folded backward, then (bn, conv) for BNs
    folded forward; the two kinds are also in `.backward` and `.forward`."""

    def __init__(self, backward: list[tuple[str, str]], forward: list[tuple[str, str]]):
        super().__init__(backward + forward)
        self.backward = backward
        self.forward = forward


def _weight_problem(model: nn.Module, path: str, shared: set[int]) -> str | None:
    layer = model.get_submodule(path)
    if id(layer.weight) in shared or (layer.bias is not None and id(layer.bias) in shared):
        return f"'{path}' shares its weight or bias with another module"
    if parametrize.is_parametrized(layer):
        return f"'{path}' has parametrized weights"
    if any(type(h).__name__ == "WeightNorm" for h in layer._forward_pre_hooks.values()):
        return f"'{path}' uses weight_norm"
    return None


def _replace_with_identity(model: nn.Module, path: str) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())


def fold_all_batch_norms(model: nn.Module, fold_backward: bool = True, fold_forward: bool = True) -> FoldedPairs:
    """Fold every BN into its neighbouring layer in place (eval semantics; docs/batchnorm_math.md, "Folding") and
    replace it by nn.Identity. Layer->BN first; BN->Conv where exact, else the BN stays with a warning."""
    backward, forward = _find_pairs(model)
    counts = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {i for i, c in counts.items() if c > 1}
    done_b: list[tuple[str, str]] = []
    done_f: list[tuple[str, str]] = []
    folded_bns: set[str] = set()
    for layer_path, bn_path in backward if fold_backward else []:
        problem = _weight_problem(model, layer_path, shared)
        if problem:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' not folded: {problem}", stacklevel=2)
            continue
        fold_bn_into_layer(model.get_submodule(layer_path), model.get_submodule(bn_path))
        _replace_with_identity(model, bn_path)
        done_b.append((layer_path, bn_path))
        folded_bns.add(bn_path)
    for bn_path, conv_path in forward if fold_forward else []:
        if bn_path in folded_bns:
            continue
        bn, conv = model.get_submodule(bn_path), model.get_submodule(conv_path)
        problem = _forward_fold_problem(bn, conv) or _weight_problem(model, conv_path, shared)
        if problem:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' (before conv '{conv_path}') not folded: {problem}",
                          stacklevel=2)
            continue
        fold_bn_into_next_conv(bn, conv)
        _replace_with_identity(model, bn_path)
        done_f.append((bn_path, conv_path))
    return FoldedPairs(done_b, done_f)
