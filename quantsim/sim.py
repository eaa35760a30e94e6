"""QuantizationSimModel: a model with fake-quantizers placed by a backend config, and its calibration."""
from __future__ import annotations

import copy
import enum
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .bias import DerivedBiasQuantizer
from .config import GRID_PRESERVING_OP_TYPES, NodePlacement, QuantSpec, load_config, place
from .distributed import resolve_group
from .graph import Captured, capture
from .observers import Background, sync_observers
from .qmodule import QuantizationMixin, is_quantized, make_quantized
from .quantizer import QuantizeDequantize
from .utils import eval_mode, run_batches


class QuantScheme(str, enum.Enum):
    """How ranges are chosen (AIMET's names are accepted as aliases)."""

    min_max = "min_max"
    tf_enhanced = "tf_enhanced"
    percentile = "percentile"
    mse = "mse"
    training_range_learning_with_tf_init = "training_range_learning_with_tf_init"
    training_range_learning_with_tf_enhanced_init = "training_range_learning_with_tf_enhanced_init"

    # AIMET spellings
    post_training_tf = "min_max"
    post_training_tf_enhanced = "tf_enhanced"
    post_training_percentile = "percentile"

    @classmethod
    def parse(cls, value: "str | QuantScheme") -> "QuantScheme":
        if isinstance(value, QuantScheme):
            return value
        aliases = {"tf": "min_max", "minmax": "min_max", "post_training_tf": "min_max",
                   "post_training_tf_enhanced": "tf_enhanced", "post_training_percentile": "percentile"}
        key = str(value).strip().lower()
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            names = sorted({m.value for m in cls} | set(aliases))
            raise ValueError(f"unknown quant_scheme {value!r}; expected one of {names}") from None

    @property
    def observer_scheme(self) -> str:
        """The calibration scheme used to initialise (range-learning schemes start from tf / tf_enhanced)."""
        return {"training_range_learning_with_tf_init": "min_max",
                "training_range_learning_with_tf_enhanced_init": "tf_enhanced"}.get(self.value, self.value)

    @property
    def learns_ranges(self) -> bool:
        return self.value.startswith("training_range_learning")


#: Which axis of a parameter holds output channels, by op type (per-channel quantization).
PARAM_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0, "MatMul": 1, "Gather": 0}


class QuantizationSimModel:
    """Wraps every quantizable layer of `model` with fake-quantizers placed by a backend config.

    sim.model keeps the float model's attribute paths; functional ops found by torch.fx become modules.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Any = "default",
        dummy_input: Any = None,
        quant_scheme: "str | QuantScheme" = "min_max",
        default_param_bw: int = 8,
        default_output_bw: int = 8,
        in_place: bool = False,
        *,
        config_file: Any = None,
        learn_ranges: bool | None = None,
        percentile: float | None = None,
        int32_bias: bool | None = None,
    ):
        if config_file is not None:
            config = config_file
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.quant_scheme = QuantScheme.parse(quant_scheme)
        self.config = load_config(config)
        self.dummy_input = dummy_input
        self.default_param_bw = int(default_param_bw)
        self.default_output_bw = int(default_output_bw)
        model = model if in_place else copy.deepcopy(model)
        self._captured: Captured = capture(model, dummy_input)
        self.model: nn.Module = self._captured.model
        self.graph = self._captured.graph
        self.placement: dict[str, NodePlacement] = place(
            self.graph, self.config, default_param_bw=self.default_param_bw, default_output_bw=self.default_output_bw
        )
        self._insert_quantizers()
        #: simulate the int32 bias of integer kernels (default: on for the onnxruntime_cpu preset's target)
        self.int32_bias = (self.config.defaults.hw_version == "ORT_CPU") if int32_bias is None else bool(int32_bias)
        if self.int32_bias:
            self.attach_int32_bias()
        learn = self.quant_scheme.learns_ranges if learn_ranges is None else bool(learn_ranges)
        if learn:
            self.set_learn_ranges(True)
        if percentile is not None:
            self.set_percentile_value(percentile)

    # ------------------------------------------------------------------ construction
    def _make_quantizer(self, spec: QuantSpec, name: str, *, shape=(), channel_axis=None, follows_input=False,
                        groups=1) -> QuantizeDequantize:
        return QuantizeDequantize(
            shape, spec.bitwidth, spec.symmetric, channel_axis=channel_axis,
            strict_symmetric=spec.strict_symmetric, unsigned_symmetric=spec.unsigned_symmetric,
            scheme=self.quant_scheme.observer_scheme, follows_input=follows_input, groups=groups,
            dtype=spec.dtype, fixed_range=spec.encoding_min_max, name=name,
        )

    def _insert_quantizers(self) -> None:
        for node in self.graph:
            if not node.op_type:
                continue
            p = self.placement.get(node.name)
            if p is None:
                continue
            module = self.model.get_submodule(node.name)
            if is_quantized(module):  # shared module called twice: first call site decides
                continue
            make_quantized(module, len(p.inputs))
            dev = next(iter(module.parameters()), torch.empty(0)).device
            for i, spec in enumerate(p.inputs):
                if spec is not None:
                    module.input_quantizers[i] = self._make_quantizer(spec, f"{node.name}.input_quantizers[{i}]")
            for i, spec in enumerate(p.outputs[:1]):
                if spec is not None:
                    module.output_quantizers[i] = self._make_quantizer(spec, f"{node.name}.output_quantizers[{i}]")
            for pname, spec in p.params.items():
                param = getattr(module, pname, None)
                if spec is None or not isinstance(param, torch.Tensor):
                    module.param_quantizers[pname] = None
                    continue
                qname = f"{node.name}.param_quantizers[{pname!r}]"
                axis = PARAM_CHANNEL_AXIS.get(node.op_type, 0) if spec.per_channel and pname == "weight" else None
                groups = getattr(module, "groups", 1) if node.op_type == "ConvTranspose" else 1
                if axis is None:
                    shape = ()
                elif groups > 1 and axis == 1:
                    shape = (param.shape[1] * groups,)
                else:
                    shape = (param.shape[axis],)
                module.param_quantizers[pname] = self._make_quantizer(
                    spec, qname, shape=shape, channel_axis=axis, follows_input=True, groups=groups
                )
            module.to(dev)

    def _activation_quantizer_of(self, source: str | None) -> QuantizeDequantize | None:
        """The quantizer that put the tensor produced by `source` on its grid (through grid-preserving ops)."""
        while source is not None and source in self.graph:
            node = self.graph[source]
            module = self.model.get_submodule(source) if node.op_type else None
            q = module.output_quantizers[0] if module is not None and is_quantized(module) else None
            if q is not None:
                return q
            if node.op_type not in GRID_PRESERVING_OP_TYPES or not node.inputs:
                return None
            source = node.inputs[0]
        return None

    def attach_int32_bias(self) -> list[str]:
        """Give every Conv/ConvTranspose/Gemm with a float bias, a quantized input and a quantized weight the int32
        bias that integer kernels add (scale = input scale x weight scale); returns the layers changed. Called again
        after BN folding, which creates biases."""
        changed = []
        for node in self.graph:
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
                continue
            module = self.model.get_submodule(node.name)
            if not is_quantized(module) or getattr(module, "bias", None) is None:
                continue
            current = module.param_quantizers["bias"] if "bias" in module.param_quantizers else None
            w_q = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
            if (current is not None and not isinstance(current, DerivedBiasQuantizer)) or w_q is None:
                continue  # the config quantizes this bias itself, or the weight stays float
            in_q = module.input_quantizers[0] if len(module.input_quantizers) else None
            in_q = in_q or self._activation_quantizer_of(node.inputs[0] if node.inputs else None)
            if in_q is None:
                continue
            module.param_quantizers["bias"] = DerivedBiasQuantizer(
                module.bias.shape[0], in_q, w_q, name=f"{node.name}.param_quantizers['bias']"
            ).to(module.bias.device)
            changed.append(node.name)
        return changed

    # ------------------------------------------------------------------ quantizer access
    def named_quantizers(self) -> Iterator[tuple[str, QuantizeDequantize]]:
        """(name, quantizer) for every quantizer in the model, e.g. 'layer1.0.conv1.param_quantizers['weight']'."""
        for mname, module in self.model.named_modules():
            if isinstance(module, QuantizationMixin):
                for slot, q in module.quantizers():
                    yield f"{mname}.{slot}", q

    def quantized_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for mname, module in self.model.named_modules():
            if isinstance(module, QuantizationMixin):
                yield mname, module

    def set_percentile_value(self, percentile: float) -> None:
        """Percentile (50, 100] used by the percentile scheme (AIMET's default 100 = min/max)."""
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        if self.quant_scheme.observer_scheme != "percentile":
            warnings.warn(f"set_percentile_value has no effect with quant_scheme={self.quant_scheme.value!r}", stacklevel=2)
        for _, q in self.named_quantizers():
            if hasattr(q.observer, "percentile"):
                q.observer.percentile = float(percentile)

    def set_learn_ranges(self, enabled: bool = True) -> None:
        """Range learning (LSQ-style gradients for scale and offset) on every quantizer that uses its range: not on
        derived int32 bias or float (fp16/bf16) quantizers, whose scale takes no gradient (DDP needs one for every
        parameter that requires it)."""
        for _, q in self.named_quantizers():
            q.learn_ranges = enabled and q.dtype != "float" and not isinstance(q, DerivedBiasQuantizer)

    # ------------------------------------------------------------------ calibration
    def compute_encodings(
        self,
        forward_pass_callback: "Callable | Iterable",
        forward_pass_callback_args: Any = None,
        *,
        num_batches: int | None = None,
        forward_fn: Callable | None = None,
        progress: bool = True,
        process_group: Any = None,
    ) -> None:
        """Calibrate: parameter encodings from the current weights, activation encodings from data.

        `forward_pass_callback` is AIMET's callback(model[, args]) or an iterable of batches (a DataLoader),
        run for at most `num_batches`. Runs in eval mode under no_grad; modes are restored afterwards.
        Under torch.distributed (or with `process_group`) every rank must call it: the ranks' activation
        statistics are combined before the encodings are computed (docs/scaling.md).
        """
        group = resolve_group(process_group)
        quantizers = [q for _, q in self.named_quantizers() if q.enabled]
        params = [q for q in quantizers if q.follows_input]
        acts = [q for q in quantizers if not q.follows_input]
        weights = [(q, getattr(module, pname)) for _, module in self.quantized_modules()
                   for pname, q in module.param_quantizers.items() if q is not None and q.enabled and not q.frozen]
        background = Background()  # weight searches and histogram updates overlap the forward (identical results)
        with eval_mode(self.model), torch.no_grad():
            for q in params:
                q._observing_saved, q.enabled = q.enabled, False  # float weights while observing
            for q, w in weights:
                background.run(q.compute_from, w)
            for q in acts:
                q.start_observing()
                q._background = background
            try:
                if callable(forward_pass_callback) and not isinstance(forward_pass_callback, Iterable):
                    if forward_pass_callback_args is None:
                        forward_pass_callback(self.model)
                    else:
                        forward_pass_callback(self.model, forward_pass_callback_args)
                else:
                    run_batches(self.model, forward_pass_callback, num_batches, forward_fn, desc="compute_encodings",
                                progress=progress)
                background.join()
            finally:
                for q in acts:
                    q.__dict__.pop("_background", None)
                for q in params:
                    q.enabled = q._observing_saved
                    del q._observing_saved
                try:
                    background.drain()  # nothing left after join; after a failed forward, what was still queued
                    sync_observers([q.observer for q in acts if q.fixed_range is None], group,  # all ranks' statistics
                                   acts[0].scale.device if acts else None)
                    seen = background.map(lambda q: q.stop_observing(), acts)  # the activation searches
                finally:
                    background.close()
        if acts and not any(seen):
            raise ValueError(
                "compute_encodings: no activation quantizer saw any data; the callback must run sim.model "
                "on representative inputs"
            )
        unseen = [q.name for q, s in zip(acts, seen) if not s]
        if unseen:
            warnings.warn(
                f"compute_encodings: {len(unseen)} quantizer(s) saw no data and stay uninitialized "
                f"(first: {unseen[0]}); a forward through them will raise", stacklevel=2
            )

    # ------------------------------------------------------------------ summary
    def __str__(self) -> str:
        return summary_table(self)

    def __repr__(self) -> str:
        return f"QuantizationSimModel({type(self.model).__name__}, {sum(1 for _ in self.named_quantizers())} quantizers)"

    # ------------------------------------------------------------------ export / reload (quantsim.exporter)
    def export(self, path, filename_prefix: str, dummy_input: Any = None, *, encoding_version: str = "1.0.0",
               **kwargs):
        """Write <prefix>.onnx, .encodings, _qdq.onnx and .safetensors into `path`, all or none; returns their paths."""
        from .exporter import export

        return export(self, path, filename_prefix, dummy_input, encoding_version=encoding_version, **kwargs)

    def emulate_onnxruntime(self):
        """Context manager: inside it sim.model computes what onnxruntime's integer kernels compute for the exported
        QDQ model, bit for bit (eval mode, no gradients); yields an EmulationReport of the layers emulated and why
        others are not. See quantsim.emulation and docs/export.md."""
        from .emulation import emulate_onnxruntime

        return emulate_onnxruntime(self)

    def load_encodings(self, encodings, *, dummy_input: Any = None, partial: bool = True, **kwargs):
        """Load an AIMET encodings file (0.6.1/1.0.0/2.0.0) into the quantizers; param encodings are frozen."""
        from .exporter import load_encodings

        return load_encodings(self, encodings, dummy_input=dummy_input, partial=partial, **kwargs)

    def save_state(self, path, process_group=None) -> str:
        """Weights, encodings and quantizer flags to a safetensors file (restored by load_state); under
        torch.distributed rank 0 writes and the other ranks wait."""
        from .exporter import save_state

        return save_state(self, path, process_group=process_group)

    def load_state(self, path) -> None:
        """Restore save_state/export's safetensors file into a sim of the same model and config."""
        from .exporter import load_state

        load_state(self, path)


def _spec_str(q: QuantizeDequantize | None) -> str:
    if q is None:
        return "-"
    kind = "a" if not q.symmetric else ("s" if not q.strict_symmetric else "ss")
    ch = "/ch" if q.channel_axis is not None else ""
    init = "" if q.is_initialized() else "?"
    off = "" if q.enabled else " off"
    return f"{kind}{q.bitwidth}{ch}{init}{off}"


def summary_table(sim: QuantizationSimModel) -> str:
    """A readable table of every op: its type and the quantizers on its inputs, params and outputs."""
    rows = [("layer", "op", "inputs", "params", "outputs")]
    for node in sim.graph:
        if not node.op_type:
            continue
        module = sim.model.get_submodule(node.name)
        if not is_quantized(module):
            continue
        ins = ",".join(_spec_str(q) for q in module.input_quantizers) or "-"
        params = ",".join(f"{n}:{_spec_str(q)}" for n, q in module.param_quantizers.items()) or "-"
        outs = ",".join(_spec_str(q) for q in module.output_quantizers) or "-"
        rows.append((node.name, node.op_type, ins, params, outs))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [f"QuantizationSimModel of {type(sim.model).__name__}: quant_scheme={sim.quant_scheme.value}, "
           f"{sum(1 for _ in sim.named_quantizers())} quantizers",
           line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    out.append("legend: a=asymmetric s=symmetric ss=strict symmetric, number=bits, /ch=per-channel, "
               "?=no encoding yet, -=not quantized")
    if sim._captured.float_ops:
        out.append(f"left in float ({len(sim._captured.float_ops)}): " + ", ".join(sim._captured.float_ops))
    if sim._captured.opaque:
        out.append("not traceable (black boxes): " + ", ".join(p or "<root>" for p in sim._captured.opaque))
    return "\n".join(out)
