"""One mixin gives any layer its quantizers: inputs, parameters and outputs (AIMET v2 style).

A quantized layer's class is `Quantized<Layer>(QuantizationMixin, Layer)`, made once per layer class, so the
layer keeps its own forward (also user subclasses that override it), its attributes and its state_dict keys.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_CLASS_CACHE: dict[type, type] = {}


def _none_list(n: int) -> nn.ModuleList:
    ml = nn.ModuleList()
    for i in range(n):
        ml.add_module(str(i), None)
    return ml


class QuantizationMixin:
    """Quantize inputs -> run the layer with quantized parameters -> quantize outputs.

    input_quantizers / output_quantizers: nn.ModuleList (None where disabled);
    param_quantizers: nn.ModuleDict keyed by parameter name (None where not quantized).
    """

    input_quantizers: nn.ModuleList
    output_quantizers: nn.ModuleList
    param_quantizers: nn.ModuleDict

    def _init_quantizers(self, n_inputs: int, n_outputs: int = 1) -> None:
        self.input_quantizers = _none_list(n_inputs)
        self.output_quantizers = _none_list(n_outputs)
        self.param_quantizers = nn.ModuleDict()

    @contextlib.contextmanager
    def _quantized_params(self):
        """Shadow each quantized parameter by its fake-quantized value for one forward; backward recomputes that
        value instead of keeping it (saved-tensor hooks; docs/batchnorm_math.md, "QAT numerics")."""
        shadowed = []
        recompute = {}
        try:
            for name, q in self.param_quantizers.items():
                if q is None or not q.enabled:
                    continue
                p = self._parameters.get(name)
                if p is None:
                    continue
                qp = q(p)
                self.__dict__[name] = qp
                shadowed.append(name)
                if qp is not p and qp.requires_grad and q.dtype != "float":
                    st = qp.untyped_storage()  # keyed by storage; the dict must not keep qp itself alive
                    recompute[st.data_ptr()] = (st.nbytes(), p, q)
            if recompute:
                with torch.autograd.graph.saved_tensors_hooks(*_recompute_hooks(recompute)):
                    yield
            else:
                yield
        finally:
            for name in shadowed:
                self.__dict__.pop(name, None)

    def forward(self, *args, **kwargs):
        if any(q is not None for q in self.input_quantizers):
            args = tuple(
                q(a) if q is not None and isinstance(a, torch.Tensor) else a
                for a, q in zip(args, list(self.input_quantizers) + [None] * (len(args) - len(self.input_quantizers)))
            )
        q = self.output_quantizers[0] if len(self.output_quantizers) else None
        clip = _fused_clip(self, q, args, kwargs)
        if clip is not None:  # ReLU/ReLU6 + output quantizer as one op: one mask kept, no clamped copy
            return q._quantize(args[0], clip)
        with self._quantized_params():
            out = super().forward(*args, **kwargs)
        if q is not None:
            if isinstance(out, torch.Tensor):
                out = q(out)
            elif isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                out = (q(out[0]),) + out[1:]
        return out

    def quantizers(self):
        """(kind, index or name, quantizer) for every quantizer slot that holds one."""
        for i, q in enumerate(self.input_quantizers):
            if q is not None:
                yield f"input_quantizers[{i}]", q
        for n, q in self.param_quantizers.items():
            if q is not None:
                yield f"param_quantizers[{n!r}]", q
        for i, q in enumerate(self.output_quantizers):
            if q is not None:
                yield f"output_quantizers[{i}]", q


def quantized_class(cls: type) -> type:
    """The cached `Quantized<cls>` class; its MRO puts the mixin's forward in front of cls.forward."""
    if issubclass(cls, QuantizationMixin):
        return cls
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Quantized{cls.__name__}", (QuantizationMixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def make_quantized(module: nn.Module, n_inputs: int) -> nn.Module:
    """Turn `module` into its quantized class in place, with empty quantizer slots."""
    module.__class__ = quantized_class(type(module))
    module._init_quantizers(n_inputs)
    return module


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizationMixin)


class _Recompute:
    """What a saved-tensor hook keeps instead of a fake-quantized parameter: enough to rebuild it exactly."""

    __slots__ = ("param", "quantizer", "version", "kparams", "view")

    def __init__(self, param, quantizer, view):
        self.param, self.quantizer, self.view = param, quantizer, view
        self.version = param._version
        self.kparams = quantizer._kparams_for(param)  # the encoding this forward used (cached, immutable)


def _recompute_hooks(recompute: dict):
    """(pack, unpack) for saved_tensors_hooks: pack swaps a saved fake-quantized parameter (or a view of it)
    for a _Recompute; unpack rebuilds it. unpack is stored with every saved tensor, so it holds no state."""

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        entry = recompute.get(st.data_ptr())
        if entry is None or st.nbytes() != entry[0]:
            return t
        _, p, q = entry
        return _Recompute(p, q, (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype))

    return pack, _unpack


def _unpack(obj):
    if not isinstance(obj, _Recompute):
        return obj
    p, q = obj.param, obj.quantizer
    if p._version != obj.version:
        raise RuntimeError(f"{q.name or 'parameter'}: the parameter was modified in place between forward and "
                           "backward (its fake-quantized value is recomputed for backward)")
    with torch.no_grad():
        qp = q._fake_quantize_fixed(p, obj.kparams)
    shape, stride, offset, dtype = obj.view
    qp = qp.to(dtype)
    if shape == tuple(qp.shape) and stride == qp.stride() and offset == 0:
        return qp
    return qp.as_strided(shape, stride, offset)


def _fused_clip(module, q, args, kwargs):
    """(lo, hi) when `module` is a stock ReLU/ReLU6/Hardtanh whose output quantizer can absorb it, else None."""
    if q is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    base = type(module).__mro__[2] if len(type(module).__mro__) > 2 else None
    if base not in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
        return None
    if not (q.enabled and not q._observing and q.dtype != "float" and not q.learn_ranges and q._ready()):
        return None
    if not (torch.is_grad_enabled() and args[0].requires_grad):
        return None
    if base is nn.ReLU:
        return (0.0, None)
    return (float(module.min_val), float(module.max_val))
