"""onnxruntime's integer kernels reproduced inside the simulation (docs/export.md, "Bit-exact emulation").

The fake-quantized forward computes a convolution in float32 on dequantized values; onnxruntime's QLinearConv
accumulates exact int32 products and requantizes them with one float32 multiply. The two agree to within float32
rounding, so one element in a million lands on the other side of a rounding tie, and deep networks amplify those
steps. Inside `emulate_onnxruntime(sim)` the layers that onnxruntime runs as integer kernels compute what those
kernels compute instead (MLAS's expressions, operation by operation), a BatchNorm the sim keeps unfolded is folded
into its layer as the QDQ builder folds it, and activation quantizers divide by the scale like QuantizeLinear. The
result is the QDQ model's output, bit for bit, for the ops listed in EMULATED_OP_TYPES.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.encodings import quantize_array

from .bias import INT32_MAX, INT32_MIN, DerivedBiasQuantizer
from .observers import _f32
from .qmodule import is_quantized
from .quantizer import QuantizeDequantize
from .utils import eval_mode

__all__ = ["EMULATED_OP_TYPES", "EmulationReport", "emulate_onnxruntime", "plan", "qlinear_add", "quantize_linear",
           "requantize"]

#: Op types whose integer kernel is reproduced: QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool.
EMULATED_OP_TYPES = ("Conv", "Gemm", "Add", "GlobalAveragePool")
#: Ops onnxruntime folds into the QuantizeLinear after them (ClipQuantFusion / ReluQuantFusion).
_EPILOGUES = ("Relu", "Clip")


@dataclass
class EmulationReport:
    """Which layers run as emulated integer kernels, and why the others do not (layer -> reason)."""

    emulated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- primitives
def _scalar_encoding(q: QuantizeDequantize, where: str) -> tuple[torch.Tensor, int, int, int]:
    """(scale float32 0-d, zero point, qmin, qmax) of a per-tensor integer quantizer."""
    if q.channel_axis is not None or q.get_scale() is None or q.get_scale().numel() != 1:
        raise _Skip(f"{where} is not an initialized per-tensor quantizer")
    zp = int(-q.get_offset().reshape(-1)[0])
    return q.get_scale().reshape(()).float(), zp, q.qmin, q.qmax


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear as MLAS computes it, minus the zero point: clamp(round_half_even(x / scale), qmin - zp,
    qmax - zp) in float32 (a division, where the fused fake-quant kernels multiply by the reciprocal)."""
    y = torch.div(x.float(), scale)
    return y.clamp_(qmin - zero_point, qmax - zero_point).round_()


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """MlasRequantizeOutput minus the zero point: an exact int32 accumulator (held in float64) converted to float32,
    times the float32 multiplier, clamped to [qmin - zp, qmax - zp], rounded half to even."""
    y = acc.to(torch.float32).mul_(multiplier)
    return y.clamp_(qmin - zero_point, qmax - zero_point).round_()


def qlinear_add(a: torch.Tensor, b: torch.Tensor, sa, zpa: int, sb, zpb: int, sc, zpc: int, qmin: int, qmax: int):
    """QLinearAdd's integer output (float tensor) for raw integers a, b (zero points included), as MLAS's AVX2
    kernel computes it: c = fma(a, sa/sc, fma(b, sb/sc, K)), K = zpc - fma(sa/sc, zpa, sb/sc * zpb), each fma
    rounded once to float32, then round half to even and saturate. float64 holds each product and sum exactly.
    """
    sa, sb, sc = (_f32(float(v)) for v in (sa, sb, sc))
    r_ac, r_bc = _f32(sa / sc), _f32(sb / sc)  # one float32 division each (double, rounded once, is exact here)
    fixed = _f32(zpc - _f32(r_ac * zpa + _f32(r_bc * zpb)))  # the compiler contracts one product into an fma
    inner = (b.double() * r_bc + fixed).to(torch.float32).double()
    c = (a.double() * r_ac + inner).to(torch.float32)
    return c.round_().clamp_(qmin, qmax)


def _integers(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The grid integers (q - zero point) of a tensor that lies on the grid of `scale`, as float64 (exact)."""
    return torch.round(x.double() / scale.double())


class _Skip(Exception):
    """This layer is not emulated (the reason is reported)."""


# ----------------------------------------------------------------------------------------------- kernels
class _Site:
    """One emulated layer: the encodings it reads and the quantizer whose grid its output lands on."""

    def __init__(self, sim, name: str, module: nn.Module, op_type: str, target: QuantizeDequantize,
                 bn: nn.Module | None = None):
        self.name, self.module, self.op_type, self.target, self.bn = name, module, op_type, target, bn
        node = sim.graph[name]
        self.inputs = []
        for i, src in enumerate(node.inputs if op_type == "Add" else node.inputs[:1]):
            own = module.input_quantizers[i] if i < len(module.input_quantizers) else None
            q = own if own is not None and own.enabled else sim._activation_quantizer_of(src)
            if q is None or not q.enabled or q.dtype == "float":
                raise _Skip(f"input {i} is not on an integer grid")
            _scalar_encoding(q, f"input {i}'s quantizer {q.name!r}")
            self.inputs.append((q, own is not None and own.enabled))
        _scalar_encoding(target, f"output quantizer {target.name!r}")
        self.own_target = any(q is target for q in module.output_quantizers)

    def _input_integers(self, i: int, x: torch.Tensor) -> torch.Tensor:
        q, own = self.inputs[i]
        s, zp, qmin, qmax = _scalar_encoding(q, q.name)
        if own:  # the layer quantizes this input itself: a QuantizeLinear on float data
            return quantize_linear(x, s, zp, qmin, qmax).double()
        return _integers(x, s)

    def _finish(self, k: torch.Tensor, shape=None) -> torch.Tensor:
        out = k.mul_(self.target.get_scale().reshape(()))
        out = out if shape is None else out.reshape(shape)
        # the layer's own output quantizer still runs (it changes nothing: out is on its grid) so that hooks on it,
        # like the fidelity check's, see the output
        return self.target(out) if self.own_target else out

    def forward(self, *args):
        if self.op_type == "Gemm" and args[0].dim() != 2:  # exported as MatMul + Add, not QGemm: not emulated
            return type(self.module).forward(self.module, *args)
        if self.op_type in ("Conv", "Gemm"):
            return self._linear(args[0])
        if self.op_type == "Add":
            return self._add(args[0], args[1])
        return self._global_average_pool(args[0])

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        kx = self._input_integers(0, x)
        sx = self.inputs[0][0].get_scale().reshape(()).float()
        w_q = m.param_quantizers["weight"]
        w_hat = w_q(m.weight)  # the weights as the simulation (and the exported ONNX) hold them
        sw = w_q.get_scale().float().reshape(-1)
        shape = [-1] + [1] * (m.weight.dim() - 1)
        if self.bn is not None:
            kw, sw, b = self._folded(w_q, w_hat)
        else:
            kw = _integers(w_hat, sw.reshape(shape) if sw.numel() > 1 else sw.reshape(()))
            b = self._bias() if m.bias is not None else None
        # Every partial sum is an integer bounded by max|kx| * max_c sum|kw_c|: below 2^24 float32 holds them all
        # exactly, whatever the summation order; otherwise float64 (exact to 2^53).
        exact32 = float(kw.abs().flatten(1).sum(1).max()) * float(kx.abs().max()) < 2.0**24 if kx.numel() else True
        if exact32:
            kx, kw = kx.float(), kw.float()
        if isinstance(m, nn.Linear):
            acc = F.linear(kx, kw)
        else:
            acc = m._conv_forward(kx, kw, None)
        acc = acc.double()
        channels = [-1] + [1] * (acc.dim() - 2)  # output channels are dim 1 of (N, C, ...) and of (N, C)
        acc_scale = sx * sw  # input scale x weight scale, float32: the int32 bias's scale
        if b is not None:
            qb = torch.round(b.double() / acc_scale.double()).clamp_(INT32_MIN, INT32_MAX)
            acc = acc + qb.reshape(channels)
        s_y, zp, qmin, qmax = _scalar_encoding(self.target, self.target.name)
        mult = acc_scale / s_y  # onnxruntime: X_scale * W_scale[c] / Y_scale, float32, left to right
        return self._finish(requantize(acc, mult.reshape(channels), zp, qmin, qmax))

    def _bias(self) -> torch.Tensor:
        """The bias as the simulation (and the exported ONNX) holds it: after its quantizer, if any."""
        m = self.module
        b_q = m.param_quantizers["bias"] if "bias" in m.param_quantizers else None
        return b_q(m.bias) if b_q is not None and b_q.enabled else m.bias

    def _folded(self, w_q: QuantizeDequantize, w_hat: torch.Tensor):
        """(integers, float32 scales, float32 bias) of the layer with the BatchNorm after it folded, exactly as the
        QDQ builder folds them (export.qdq.fold_bn_into_grid / bn_scale_shift)."""
        from export.qdq import bn_scale_shift, fold_bn_into_grid

        from .exporter import quantizer_encoding

        m, bn = self.module, self.bn
        te = quantizer_encoding(w_q, "weight", 0)
        q = quantize_array(w_hat.detach().cpu().numpy(), te.scale, te.offset, te.qmin, te.qmax,
                           0 if te.per_channel else None)
        n = m.weight.shape[0]
        ones = np.ones(n, np.float32)
        gamma = bn.weight.detach().cpu().numpy() if bn.weight is not None else ones
        beta = bn.bias.detach().cpu().numpy() if bn.bias is not None else 0 * ones
        k, c = bn_scale_shift(gamma, beta, bn.running_mean.cpu().numpy(), bn.running_var.cpu().numpy(), bn.eps)
        q_new, o_new, scale, _ = fold_bn_into_grid(q, te, k, 0, f"{self.name}: folding its BatchNorm")
        kw = torch.from_numpy((q_new + o_new.reshape([-1] + [1] * (q.ndim - 1))).astype(np.float64))
        bias = np.zeros(n) if m.bias is None else self._bias().detach().cpu().numpy().astype(np.float32).astype(
            np.float64)
        b = torch.from_numpy((bias * k + c).astype(np.float32))
        dev = m.weight.device
        return kw.to(dev), torch.from_numpy(scale).to(dev), b.to(dev)

    def _add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (qa, _), (qb, _) = self.inputs
        sa, zpa, _, _ = _scalar_encoding(qa, qa.name)
        sb, zpb, _, _ = _scalar_encoding(qb, qb.name)
        sc, zpc, qmin, qmax = _scalar_encoding(self.target, self.target.name)
        ka, kb = self._input_integers(0, a), self._input_integers(1, b)
        return self._finish(qlinear_add(ka + zpa, kb + zpb, sa, zpa, sb, zpb, sc, zpc, qmin, qmax).sub_(zpc))

    def _global_average_pool(self, x: torch.Tensor) -> torch.Tensor:
        # MlasQLinearGlobalAveragePool: acc = sum(q) - zp_in * N (= sum of q - zp_in), scale = s_in / (s_out * N)
        q_in, _ = self.inputs[0]
        s_in = q_in.get_scale().reshape(()).float()
        kx = self._input_integers(0, x)
        acc = kx.flatten(2).sum(-1)
        s_y, zp, qmin, qmax = _scalar_encoding(self.target, self.target.name)
        mult = s_in / (s_y * torch.tensor(float(math.prod(x.shape[2:])), dtype=torch.float32))
        k = requantize(acc, mult, zp, qmin, qmax)
        return self._finish(k, k.shape + (1,) * (x.dim() - 2))


# ----------------------------------------------------------------------------------------------- planning
def _output_quantizer(module: nn.Module) -> QuantizeDequantize | None:
    """The module's enabled output quantizer, if it has one."""
    q = module.output_quantizers[0] if is_quantized(module) and len(module.output_quantizers) else None
    return q if q is not None and q.enabled else None


def _target(sim, name: str, module: nn.Module, op_type: str):
    """(quantizer, BatchNorm or None): the quantizer that requantizes `name`'s output (its own, or that of a sole
    Relu/Clip consumer onnxruntime folds into the QuantizeLinear), and the BatchNorm between them that the QDQ
    builder folds into the layer, if any."""
    own = _output_quantizer(module)
    if own is not None:
        return own, None
    bn = None
    cons = sim.graph.consumers(name)
    if op_type in ("Conv", "Gemm") and len(cons) == 1 and sim.graph[cons[0]].op_type == "BatchNormalization":
        bn = sim.model.get_submodule(cons[0])
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
                and bn.running_mean is not None and bn.num_features == module.weight.shape[0]):
            raise _Skip("the BatchNorm after it has no running statistics to fold")
        q = _output_quantizer(bn)
        if q is not None:
            return q, bn
        name, cons = cons[0], sim.graph.consumers(cons[0])
    if len(cons) == 1 and sim.graph[cons[0]].op_type in _EPILOGUES:
        q = _output_quantizer(sim.model.get_submodule(cons[0]))
        if q is not None:
            return q, bn
    raise _Skip("its output is not quantized (directly, after a BatchNorm, or after a Relu/Clip)")


def plan(sim) -> tuple[dict[str, _Site], EmulationReport]:
    """The layers to emulate and the report (pure: reads the graph and the quantizers' encodings)."""
    sites, report = {}, EmulationReport()
    for node in sim.graph:
        if node.op_type not in EMULATED_OP_TYPES:
            continue
        module = sim.model.get_submodule(node.name)
        try:
            if not is_quantized(module):
                raise _Skip("not quantized")
            if node.op_type in ("Conv", "Gemm"):
                w_q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
                if w_q is None or not w_q.enabled or w_q.dtype == "float":
                    raise _Skip("its weight is not quantized to integers")
                if node.op_type == "Gemm" and not isinstance(module, nn.Linear):
                    raise _Skip(f"{type(module).__name__} is not an nn.Linear")
                if node.op_type == "Conv" and not isinstance(module, nn.modules.conv._ConvNd):
                    raise _Skip(f"{type(module).__name__} is not a convolution")
            if node.op_type == "Gemm" and module.weight.dim() != 2:
                raise _Skip("not a 2-d weight")
            target, bn = _target(sim, node.name, module, node.op_type)
            sites[node.name] = _Site(sim, node.name, module, node.op_type, target, bn)
            report.emulated.append(node.name)
        except _Skip as why:
            report.skipped[node.name] = str(why)
    return sites, report


def _passthrough(bn: nn.Module):
    own = _output_quantizer(bn)

    def forward(x):
        return own(x) if own is not None else x  # on own's grid already: hooks still see it

    return forward


def _activation_forward(q: QuantizeDequantize):
    s, zp, qmin, qmax = _scalar_encoding(q, q.name)

    def forward(x):
        return quantize_linear(x, s, zp, qmin, qmax).mul_(s).to(x.dtype)

    return forward


@contextlib.contextmanager
def emulate_onnxruntime(sim):
    """Run sim.model as onnxruntime runs the exported QDQ model (eval mode, no gradients); yields the report."""
    if getattr(sim, "_emulating", False):
        raise RuntimeError("emulate_onnxruntime: already emulating (the contexts do not nest)")
    sites, report = plan(sim)
    patched: list[tuple[nn.Module, object]] = []  # (module, its previous instance-level forward or None)
    sim._emulating = True
    try:
        for site in sites.values():
            patched.append((site.module, site.module.__dict__.get("forward")))
            site.module.forward = site.forward
            if site.bn is not None:  # folded into the layer: the layer's output is already the BN's, requantized
                patched.append((site.bn, site.bn.__dict__.get("forward")))
                site.bn.forward = _passthrough(site.bn)
        for _, q in sim.named_quantizers():
            if (q.enabled and q.dtype != "float" and not q.follows_input and q.channel_axis is None
                    and not isinstance(q, DerivedBiasQuantizer) and q.is_initialized()):
                patched.append((q, q.__dict__.get("forward")))
                q.forward = _activation_forward(q)
        with eval_mode(sim.model), torch.no_grad():
            yield report
    finally:
        sim._emulating = False
        for m, previous in reversed(patched):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
