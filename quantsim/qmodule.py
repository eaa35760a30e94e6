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
        """Shadow each quantized parameter by its fake-quantized value for the duration of one forward."""
        shadowed = []
        try:
            for name, q in self.param_quantizers.items():
                if q is None or not q.enabled:
                    continue
                p = self._parameters.get(name)
                if p is None:
                    continue
                self.__dict__[name] = q(p)
                shadowed.append(name)
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
        with self._quantized_params():
            out = super().forward(*args, **kwargs)
        q = self.output_quantizers[0] if len(self.output_quantizers) else None
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
