"""BatchNorm utilities: exact statistics re-estimation, frozen-BN QAT, folding BatchNorm into the neighbouring
Conv / ConvTranspose / Linear, and folding it into a QuantizationSimModel's quantization scales after QAT.

The math (pooled moments, folding formulas, when BN->Conv folding is exact, fold-to-scale) is in
docs/batchnorm_math.md; the workflow in docs/batchnorm.md.
"""
from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm

from . import numerics
from .config import NodePlacement, find_bn_folds, place
from .distributed import all_reduce, gather_rows, resolve_group
from .graph import op_type_of, trace
from .ir import OpGraph
from .qmodule import QuantizationMixin, is_quantized
from .utils import run_batches

__all__ = [
    "ChannelMoments",
    "all_reduce_moments",
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
    "fold_all_batch_norms_to_scale",
    "reestimate_and_fold",
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
        """Add a BN input of shape ``(N, C, ...)`` (channels on dim 1)."""
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


def all_reduce_moments(moments: list[ChannelMoments], group) -> None:
    """Pool every rank's samples into each accumulator in place, so all ranks hold the moments of all samples.

    Collective over a torch.distributed `group` (no-op for None); every rank passes its accumulators in the same
    order. Each accumulator is rebased to the shift of the first rank that has samples, then count, sum and sum of
    squares are summed in float64 (docs/batchnorm_math.md, "Pooled moments"); three all-reduces for all of them.
    """
    if group is None or not moments:
        return
    dev = moments[0].total.device
    f64 = dict(dtype=torch.float64, device=dev)
    header = [torch.cat([torch.tensor([m.count, m.batches], **f64),
                         m.shift.to(**f64) if m.shift is not None else torch.zeros(m.num_channels, **f64)])
              for m in moments]
    layout = gather_rows(torch.tensor([len(moments), sum(h.numel() for h in header)], **f64), group)
    if not bool((layout == layout[0]).all()):
        raise ValueError(f"all_reduce_moments: the ranks pass different BatchNorm layers ((layers, channels + 2 per "
                         f"layer) per rank: {layout.tolist()})")
    rows = gather_rows(torch.cat(header), group)  # (ranks, sum of 2 + C)
    ends = torch.tensor([h.numel() for h in header]).cumsum(0).tolist()
    pooled = []
    for m, end, h in zip(moments, ends, header):
        block = rows[:, end - h.numel():end]
        has = block[:, 0] > 0
        if not bool(has.any()):
            continue
        m.rebase(block[int(has.to(torch.uint8).argmax()), 2:])
        pooled.append((m, int(block[:, 0].sum()), int(block[:, 1].sum())))
    if not pooled:
        return
    flat = torch.cat([torch.cat([m.total, m.total_sq]).to(**f64) for m, _, _ in pooled])
    all_reduce(flat, "sum", group)
    for (m, count, batches), part in zip(pooled, flat.split([2 * m.num_channels for m, _, _ in pooled])):
        m.total.copy_(part[:m.num_channels])
        m.total_sq.copy_(part[m.num_channels:])
        m.count, m.batches = count, batches


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
    process_group: Any = None,
) -> BNReestimationHandle:
    """Set every BN's running_mean/var to the exact pooled mean / unbiased variance of the inputs it receives
    over up to `num_batches` batches (docs/batchnorm_math.md, "BN re-estimation").

    Only BN layers are put in train mode (frozen ones included), so each BN sees what the model feeds it when
    every BN normalises with its own batch statistics (as in training); other modules keep their mode.
    Under torch.distributed (or with `process_group`) every rank must call it: the statistics pool all ranks'
    samples, identical on every rank (docs/scaling.md).
    """
    group = resolve_group(process_group)
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

    all_reduce_moments([stats[n] for n, _ in bns], group)
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


def _layer_class(module: nn.Module) -> type:
    """The module's own class; for a sim's Quantized<Layer>, the wrapped layer class."""
    cls = type(module)
    return cls.__bases__[-1] if QuantizationMixin in cls.__bases__ else cls


def _is_stock(module: nn.Module, *methods: str) -> bool:
    """True when the module computes what its torch base class does (a subclass may not override forward).
    A sim's quantized layer counts as its wrapped class: the mixin only adds quantizers around it."""
    cls = _layer_class(module)
    return all(getattr(getattr(cls, m, None), "__module__", "").startswith("torch.") for m in methods)


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


def _bn_affine(bn: _BatchNorm, gamma: torch.Tensor | None = None,
               beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with BN_eval(x) = scale * x + shift per channel (gamma/beta: override the
    BN's own, e.g. by their fake-quantized values)."""
    if not _tracks_stats(bn):
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
    mean = bn.running_mean.detach().double()
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = gamma if gamma is not None else bn.weight
    beta = beta if beta is not None else bn.bias
    gamma = gamma.detach().double() if gamma is not None else torch.ones_like(mean)
    beta = beta.detach().double() if beta is not None else torch.zeros_like(mean)
    scale = gamma / sigma
    return scale, beta - mean * scale


def _set_bias(layer: nn.Module, bias64: torch.Tensor) -> None:
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(bias64.to(w), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(bias64.to(layer.bias))


@torch.no_grad()
def fold_bn_into_layer(layer: nn.Module, bn: _BatchNorm, gamma: torch.Tensor | None = None,
                       beta: torch.Tensor | None = None) -> torch.Tensor:
    """Fold `bn` (which follows `layer`) into the layer's weight and bias in place; returns gamma/sigma per
    output channel, the factor the weight was scaled by. The caller removes the BN.
    Math: docs/batchnorm_math.md, "Folding a BN into the layer before it"."""
    if not isinstance(layer, (nn.Linear,) + _CONV + _CONV_T):
        raise TypeError(f"cannot fold BatchNorm into {type(layer).__name__}")
    out = _out_channels(layer)
    if bn.num_features != out:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the layer has {out} output channels")
    scale, shift = _bn_affine(bn, gamma, beta)
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


# ============================================================================ folding into a QuantizationSimModel


class _NotFoldable(Exception):
    """A pair that fold_all_batch_norms_to_scale leaves in place (the message says why)."""


def _active(q) -> bool:
    return q is not None and q.enabled


def _sim_pairs(sim) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(layer->BN pairs, BN->conv pairs) of a sim, from sim.graph (the pairs placement fused), with the module
    checks of find_layer_bn_pairs."""
    graph, model = sim.graph, sim.model
    modules = dict(model.named_modules())
    backward = []
    for layer_path, bn_path in find_bn_folds(graph).items():
        layer, bn = modules.get(layer_path), modules.get(bn_path)
        if layer is None or bn is None or not (_foldable_layer(layer) and _foldable_bn(bn)):
            continue
        if bn.num_features != _out_channels(layer):
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        backward.append((layer_path, bn_path))
    folded = {b for _, b in backward}
    forward = []
    for node in graph:
        bn = modules.get(node.name)
        if node.name in folded or bn is None or not _foldable_bn(bn) or node.is_model_output:
            continue
        users = list(dict.fromkeys(graph.consumers(node.name)))
        if len(users) != 1 or graph[users[0]].inputs != (node.name,):
            continue
        conv = modules.get(users[0])
        if isinstance(conv, _CONV) and _foldable_layer(conv) and conv.in_channels == bn.num_features:
            forward.append((node.name, users[0]))
    return backward, forward


def _quantized_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """A parameter as the sim uses it: fake-quantized when its quantizer is active."""
    p = getattr(module, name, None)
    if p is None:
        return None
    q = module.param_quantizers[name] if is_quantized(module) and name in module.param_quantizers else None
    return q(p) if _active(q) and q.is_initialized() else p


def _check_backward_fold(layer: nn.Module, bn: nn.Module) -> None:
    if not is_quantized(layer):
        return
    if _active(layer.output_quantizers[0]):
        raise _NotFoldable("the layer's own output is quantized (the BN is not fused with it), so folding would "
                           "remove a quantization step")
    if is_quantized(bn) and any(_active(q) for q in bn.input_quantizers):
        raise _NotFoldable("the BN's input is quantized, so folding would remove a quantization step")
    wq = layer.param_quantizers["weight"] if "weight" in layer.param_quantizers else None
    if _active(wq) and wq.dtype == "float":
        raise _NotFoldable("the weight quantizer is a float (fp16/bf16) quantizer")
    if _active(wq) and wq.channel_axis is not None and wq.is_unsigned_grid:
        gamma = bn.weight.detach() if bn.weight is not None else None
        if gamma is not None and bool((gamma < 0).any()):
            raise _NotFoldable("negative gamma cannot be folded into an unsigned (qmin = 0) symmetric weight grid")


@torch.no_grad()
def _fold_to_scale(sim, layer_path: str, bn_path: str) -> str | None:
    """Fold one layer->BN pair of the sim (docs/batchnorm_math.md, "Folding into the quantization scale");
    returns a note for a warning (per-tensor re-calibration, clamped integers) or None."""
    model = sim.model
    layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
    _check_backward_fold(layer, bn)
    wq = layer.param_quantizers["weight"] if is_quantized(layer) and "weight" in layer.param_quantizers else None
    wq = wq if _active(wq) else None
    gamma, beta = _quantized_value(bn, "weight"), _quantized_value(bn, "bias")  # AIMET folds quantized gamma/beta
    a = _bn_affine(bn, gamma, beta)[0].to(layer.weight.device)  # float64 gamma/sigma per output channel
    note = None
    if wq is not None and wq.channel_axis is not None:
        wq(layer.weight)  # make sure the encoding is the one the sim currently uses for these weights
        old_scale, zp = wq._kernel_params()
        old_offset = -zp.double()
        q_old = _weight_integers(wq, layer.weight, old_scale, old_offset)
        fold_bn_into_layer(layer, bn, gamma, beta)
        neg = a < 0
        new_scale = (old_scale.double() * a.abs()).float()
        span = float(wq.qmin + wq.qmax)
        if wq.symmetric:  # offset stays 0: integers flip sign; on [-2^(b-1), 2^(b-1)-1], -2^(b-1) cannot
            new_offset = old_offset
            view = (-1,) + (1,) * (q_old.dim() - 1)
            expected = torch.where(neg.view(view), -q_old, q_old)
            clamped = int(((expected > wq.qmax) | (expected < wq.qmin)).sum())
            expected = expected.clamp(wq.qmin, wq.qmax)
            if clamped:
                note = (f"{clamped} weight integer(s) at -2^(b-1) in channels with negative gamma became "
                        f"{wq.qmax} (one step less; a strict-symmetric grid avoids this)")
        else:  # asymmetric: q -> qmin + qmax - q with offset -> -(qmin + qmax) - offset keeps the grid exact
            new_offset = torch.where(neg, -span - old_offset, old_offset)
            view = (-1,) + (1,) * (q_old.dim() - 1)
            expected = torch.where(neg.view(view), span - q_old, q_old)
        wq.set_encoding(new_scale.reshape(wq.scale.shape), new_offset.float().reshape(wq.offset.shape), freeze=True)
        _snap_to_integers(wq, layer, expected)
    else:
        fold_bn_into_layer(layer, bn, gamma, beta)
        if wq is not None:  # per-tensor: one scale cannot absorb per-channel factors
            wq.compute_from(layer.weight)
            wq.frozen = True
            note = "its per-tensor weight encoding was re-calibrated from the folded weight (integers change)"
    if is_quantized(layer):
        bn_out = bn.output_quantizers[0] if is_quantized(bn) and len(bn.output_quantizers) else None
        layer.output_quantizers[0] = bn_out  # None when the activation after the BN carries it
    _replace_with_identity(model, bn_path)
    return note


def _weight_integers(wq, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Integer weights (float64, channel-major) exactly as the sim's kernels compute them."""
    w = wq._channel_major(weight.detach())
    return numerics.quantize(w, scale, offset.float(), wq.qmin, wq.qmax, axis=0).double()


def _snap_to_integers(wq, layer: nn.Module, expected: torch.Tensor) -> None:
    """Put weights whose folded float value crossed a rounding tie onto their grid point, so the integers are
    exactly `expected` (such a weight moves by less than half a step)."""
    scale, zp = wq._kernel_params()
    got = _weight_integers(wq, layer.weight, scale, -zp.double())
    wrong = got != expected
    if not bool(wrong.any()):
        return
    view = (-1,) + (1,) * (expected.dim() - 1)
    grid_value = ((expected - zp.double().view(view)) * scale.double().view(view)).float()
    w_cm = wq._channel_major(layer.weight.detach()).clone()
    w_cm[wrong] = grid_value[wrong]
    layer.weight.copy_(wq._from_channel_major(w_cm, layer.weight))


@torch.no_grad()
def _fold_forward_in_sim(sim, bn_path: str, conv_path: str) -> str | None:
    """Fold a BN into the conv after it when no quantizer sits between them; the conv's weight encoding is
    re-calibrated (a per-input-channel factor does not fit a per-output-channel grid)."""
    model = sim.model
    bn, conv = model.get_submodule(bn_path), model.get_submodule(conv_path)
    if is_quantized(bn) and any(_active(q) for _, q in bn.quantizers()):
        raise _NotFoldable("the BN has active quantizers (its output is quantized before the conv reads it)")
    if is_quantized(conv) and any(_active(q) for q in conv.input_quantizers):
        raise _NotFoldable("the conv quantizes its input, which would then see the un-normalised tensor")
    problem = _forward_fold_problem(bn, conv)
    if problem:
        raise _NotFoldable(problem)
    fold_bn_into_next_conv(bn, conv)
    _replace_with_identity(model, bn_path)
    wq = conv.param_quantizers["weight"] if is_quantized(conv) and "weight" in conv.param_quantizers else None
    if _active(wq):
        wq.compute_from(conv.weight)
        wq.frozen = True
        return "the conv's weight encoding was re-calibrated from the folded weight (integers change)"
    return None


def _update_sim_records(sim, backward: list[tuple[str, str]], forward: list[tuple[str, str]]) -> None:
    """Drop folded BNs from sim.graph and sim.placement (consumers read the layer), move the BN's output spec to
    the layer, and give a new bias the quantizer the config asks for."""
    graph = sim.graph
    gone = {bn: layer for layer, bn in backward}
    gone.update({bn: graph[bn].inputs[0] if graph[bn].inputs else None for bn, _ in forward})
    layers = {layer: bn for layer, bn in backward}
    nodes = []
    for n in graph:
        if n.name in gone:
            continue
        changes = {"inputs": tuple(gone.get(i, i) if i is not None else None for i in n.inputs)}
        if n.name in layers:
            layer = sim.model.get_submodule(n.name)
            if "bias" not in n.params and getattr(layer, "bias", None) is not None:
                changes["params"] = n.params + ("bias",)
            changes["is_model_output"] = n.is_model_output or graph[layers[n.name]].is_model_output
        nodes.append(dataclasses.replace(n, **changes))
    new_graph = OpGraph(nodes)
    fresh = place(new_graph, sim.config, default_param_bw=sim.default_param_bw,
                  default_output_bw=sim.default_output_bw)
    for layer_path, bn_path in backward:
        old, bn_p = sim.placement.get(layer_path), sim.placement.pop(bn_path, None)
        if old is None:
            continue
        params = dict(old.params)
        layer = sim.model.get_submodule(layer_path)
        if "bias" not in params and getattr(layer, "bias", None) is not None:
            spec = fresh[layer_path].params.get("bias")
            params["bias"] = spec
            if spec is not None and is_quantized(layer):
                q = sim._make_quantizer(spec, f"{layer_path}.param_quantizers['bias']", follows_input=True)
                layer.param_quantizers["bias"] = q.to(layer.weight.device)
        sim.placement[layer_path] = NodePlacement(old.inputs, bn_p.outputs if bn_p else old.outputs, params)
    for bn_path, _ in forward:
        sim.placement.pop(bn_path, None)
    sim.graph = new_graph
    if getattr(sim, "_captured", None) is not None:
        sim._captured.graph = new_graph


def fold_all_batch_norms_to_scale(sim) -> FoldedPairs:
    """After QAT, fold every layer->BN pair of a sim into weight, bias and per-channel weight scale, keeping the
    integer weights; returns the folded pairs, warns about the rest (docs/batchnorm.md, docs/batchnorm_math.md)."""
    model = sim.model
    backward, forward = _sim_pairs(sim)
    counts = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {i for i, c in counts.items() if c > 1}
    done_b: list[tuple[str, str]] = []
    done_f: list[tuple[str, str]] = []
    for layer_path, bn_path in backward:
        try:
            problem = _weight_problem(model, layer_path, shared)
            if problem:
                raise _NotFoldable(problem)
            note = _fold_to_scale(sim, layer_path, bn_path)
        except _NotFoldable as e:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' not folded into '{layer_path}': {e}", stacklevel=2)
            continue
        if note:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' folded into '{layer_path}': {note}", stacklevel=2)
        done_b.append((layer_path, bn_path))
    for bn_path, conv_path in forward:
        try:
            problem = _weight_problem(model, conv_path, shared)
            if problem:
                raise _NotFoldable(problem)
            note = _fold_forward_in_sim(sim, bn_path, conv_path)
        except _NotFoldable as e:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' (before conv '{conv_path}') not folded: {e}",
                          stacklevel=2)
            continue
        if note:
            warnings.warn(f"quantsim: BatchNorm '{bn_path}' folded into the conv after it, '{conv_path}': {note}",
                          stacklevel=2)
        done_f.append((bn_path, conv_path))
    if done_b or done_f:
        _update_sim_records(sim, done_b, done_f)
        if getattr(sim, "int32_bias", False):
            sim.attach_int32_bias()  # folding gave layers (new) biases: simulate them as the kernels add them
    return FoldedPairs(done_b, done_f)


def reestimate_and_fold(sim, dataloader: Iterable, num_batches: int | None = 100,
                        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                        progress: bool = True, process_group: Any = None) -> FoldedPairs:
    """Re-estimate BN statistics on sim.model (quantizers active), then fold_all_batch_norms_to_scale(sim);
    returns the folded pairs. Under torch.distributed the statistics pool all ranks' samples."""
    reestimate_bn_stats(sim.model, dataloader, num_batches=num_batches, forward_fn=forward_fn, progress=progress,
                        process_group=process_group)
    return fold_all_batch_norms_to_scale(sim)
