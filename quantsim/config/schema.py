"""Backend config: load, validate and normalise AIMET-format quantsim config JSON (reference: docs/config.md).

AIMET's own files load unchanged. Validation is stricter than AIMET's jsonschema where AIMET would fail later
or silently ignore a typo, and looser where a superset costs nothing (JSON booleans, optional sections).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = [
    "ConfigError", "ConfigWarning", "BackendConfig", "Defaults", "OpTypeConfig", "ParamConfig", "Kernel",
    "FrozenDict", "load_config", "parse_config", "PRESETS", "PRESET_DIR", "KNOWN_OP_TYPES",
]

PRESET_DIR = Path(__file__).resolve().parent / "presets"
#: Shipped presets: name -> file in PRESET_DIR.
PRESETS = {"default": "default.json", "per_tensor": "per_tensor.json", "onnxruntime_cpu": "onnxruntime_cpu.json"}

#: ONNX (ai.onnx, every opset up to 23) op types, plus names AIMET's shipped configs use for non-ONNX ops.
ONNX_OP_TYPES = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
Bernoulli BitCast BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu
CenterCropPad Clip Col2Im Compress Concat ConcatFromSequence Constant ConstantOfShape Conv ConvInteger ConvTranspose
Cos Cosh CumProd CumSum DFT DeformConv DepthToSpace DequantizeLinear Det Div Dropout DynamicQuantizeLinear Einsum Elu
Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid
HardSwish Hardmax Identity If ImageDecoder InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul MatMulInteger Max MaxPool MaxRoiPool MaxUnpool
Mean MeanVarianceNormalization MelWeightMatrix Min Mish Mod Mul Multinomial Neg NegativeLogLikelihoodLoss
NonMaxSuppression NonZero Not OneHot Optional OptionalGetElement OptionalHasElement Or PRelu Pad Pow QLinearConv
QLinearMatMul QuantizeLinear RMSNormalization RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare RegexFullMatch Relu Reshape Resize ReverseSequence RoiAlign RotaryEmbedding Round STFT Scan Scatter
ScatterElements ScatterND Selu SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax SoftmaxCrossEntropyLoss Softplus Softsign
SpaceToDepth Split SplitToSequence Sqrt Squeeze StringConcat StringNormalizer StringSplit Sub Sum Swish Tan Tanh
TfIdfVectorizer ThresholdedRelu Tile TopK Transpose Trilu Unique Unsqueeze Upsample Where Xor
""".split())
AIMET_EXTRA_OP_TYPES = frozenset({"BatchPermutation", "BatchToSpace", "ChannelShuffle", "CropAndResize",
                                  "SpaceToBatch"})
KNOWN_OP_TYPES = ONNX_OP_TYPES | AIMET_EXTRA_OP_TYPES

#: op_type key AIMET treats as an override of the defaults' supported_kernels / per_channel_quantization.
OP_TYPE_DEFAULTS_KEY = "defaults"

_BOOL_STRINGS = {"True": True, "False": False}


class ConfigError(ValueError):
    """A backend config problem; the message names the JSON path (and the file, when loaded from one)."""

    def __init__(self, path: str, problem: str, source: str | None = None):
        self.path, self.problem, self.source = path, problem, source
        msg = f"{path}: {problem}" if path else problem
        super().__init__(f"{msg} (in {source})" if source else msg)


class ConfigWarning(UserWarning):
    """A config entry that loads but cannot take effect (e.g. an op_type name no op can have)."""


class FrozenDict(Mapping):
    """Read-only, hashable mapping (keeps BackendConfig frozen and hashable)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping | Any = ()):
        self._d = dict(items)
        self._h = None

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._d) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenDict({self._d!r})"


@dataclass(frozen=True)
class Kernel:
    """One supported_kernels entry: an (activation, param) precision pair, each (bitwidth, "int"|"float")."""

    activation: tuple[int, str]
    param: tuple[int, str] | None = None


@dataclass(frozen=True)
class ParamConfig:
    """Settings for one parameter name; None = inherit from the less specific level."""

    is_quantized: bool | None = None
    is_symmetric: bool | None = None


@dataclass(frozen=True)
class OpTypeConfig:
    """op_type.<OnnxType>: overrides for every op of that type; None = inherit."""

    is_input_quantized: bool | None = None
    is_output_quantized: bool | None = None
    is_symmetric: bool | None = None
    per_channel_quantization: bool | None = None
    params: FrozenDict = field(default_factory=FrozenDict)  # param name -> ParamConfig
    encoding_constraints: tuple[float, float] | None = None  # fixed (min, max) of the op's output
    supported_kernels: tuple[Kernel, ...] | None = None


@dataclass(frozen=True)
class Defaults:
    """The defaults section (an absent boolean means False, as in AIMET)."""

    is_output_quantized: bool = False   # defaults.ops
    is_input_quantized: bool = False    # defaults.ops (AIMET rejects this key; quantsim accepts it)
    is_symmetric: bool = False          # defaults.ops: activations
    param_is_quantized: bool = False    # defaults.params
    param_is_symmetric: bool = False    # defaults.params
    strict_symmetric: bool = False
    unsigned_symmetric: bool = False
    per_channel_quantization: bool = False
    hw_version: str | None = None
    supported_kernels: tuple[Kernel, ...] | None = None


@dataclass(frozen=True)
class BackendConfig:
    """A parsed, validated, normalised backend config (booleans are bool, sections always present)."""

    defaults: Defaults = field(default_factory=Defaults)
    params: FrozenDict = field(default_factory=FrozenDict)    # param name -> ParamConfig
    op_type: FrozenDict = field(default_factory=FrozenDict)   # ONNX op type -> OpTypeConfig
    supergroups: tuple[tuple[str, ...], ...] = ()
    supergroup_pass_list: tuple[str, ...] = ()
    model_input_quantized: bool | None = None   # model_input.is_input_quantized
    model_output_quantized: bool | None = None  # model_output.is_output_quantized
    source: str = field(default="<dict>", compare=False)

    # --- derived views (AIMET semantics, documented in docs/config.md) ---
    def per_channel_default(self) -> bool:
        """Default per_channel_quantization; AIMET lets op_type.defaults override defaults' value."""
        od = self.op_type.get(OP_TYPE_DEFAULTS_KEY)
        if od is not None and od.per_channel_quantization is not None:
            return od.per_channel_quantization
        return self.defaults.per_channel_quantization

    def supported_kernels_for(self, op_type: str) -> tuple[Kernel, ...] | None:
        """Kernels an op type supports: its own list, else op_type.defaults', else defaults' (None = unknown)."""
        for key in (op_type, OP_TYPE_DEFAULTS_KEY):
            oc = self.op_type.get(key)
            if oc is not None and oc.supported_kernels:
                return oc.supported_kernels
        return self.defaults.supported_kernels

    def to_dict(self) -> dict:
        """The config as AIMET-format JSON data (string booleans): load_config(c.to_dict()) == c."""
        b = lambda v: "True" if v else "False"  # noqa: E731

        def kernels(ks):
            out = []
            for k in ks:
                e = {"activation": {"bitwidth": k.activation[0], "dtype": k.activation[1]}}
                if k.param is not None:
                    e["param"] = {"bitwidth": k.param[0], "dtype": k.param[1]}
                out.append(e)
            return out

        def param(pc: ParamConfig):
            return {k: b(v) for k, v in (("is_quantized", pc.is_quantized), ("is_symmetric", pc.is_symmetric))
                    if v is not None}

        d = self.defaults
        ops = {"is_output_quantized": b(d.is_output_quantized), "is_symmetric": b(d.is_symmetric)}
        if d.is_input_quantized:
            ops["is_input_quantized"] = "True"
        defaults: dict[str, Any] = {
            "ops": ops,
            "params": {"is_quantized": b(d.param_is_quantized), "is_symmetric": b(d.param_is_symmetric)},
            "strict_symmetric": b(d.strict_symmetric),
            "unsigned_symmetric": b(d.unsigned_symmetric),
            "per_channel_quantization": b(d.per_channel_quantization),
        }
        if d.hw_version is not None:
            defaults["hw_version"] = d.hw_version
        if d.supported_kernels is not None:
            defaults["supported_kernels"] = kernels(d.supported_kernels)
        op_type = {}
        for name, oc in self.op_type.items():
            e: dict[str, Any] = {}
            for key in ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization"):
                v = getattr(oc, key)
                if v is not None:
                    e[key] = b(v)
            if oc.params:
                e["params"] = {p: param(pc) for p, pc in oc.params.items()}
            if oc.encoding_constraints is not None:
                e["encoding_constraints"] = {"min": oc.encoding_constraints[0], "max": oc.encoding_constraints[1]}
            if oc.supported_kernels is not None:
                e["supported_kernels"] = kernels(oc.supported_kernels)
            op_type[name] = e
        out: dict[str, Any] = {
            "defaults": defaults,
            "params": {p: param(pc) for p, pc in self.params.items()},
            "op_type": op_type,
        }
        if self.supergroup_pass_list:
            out["supergroup_pass_list"] = list(self.supergroup_pass_list)
        out["supergroups"] = [{"op_list": list(s)} for s in self.supergroups]
        out["model_input"] = {} if self.model_input_quantized is None else {
            "is_input_quantized": b(self.model_input_quantized)}
        out["model_output"] = {} if self.model_output_quantized is None else {
            "is_output_quantized": b(self.model_output_quantized)}
        return out


# ----------------------------------------------------------------------------- loading


def load_config(config: "str | os.PathLike | Mapping | BackendConfig | None" = None) -> BackendConfig:
    """A BackendConfig from a preset name, a JSON file path, a dict, or a BackendConfig (None -> "default")."""
    if config is None:
        config = "default"
    if isinstance(config, BackendConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config, source="<dict>")
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if isinstance(config, str) and text in PRESETS:
            return _load_file(PRESET_DIR / PRESETS[text], source=f"preset '{text}'")
        path = Path(text)
        if path.is_file():
            return _load_file(path, source=str(path))
        if isinstance(config, str) and not _looks_like_path(text):
            close = difflib.get_close_matches(text, list(PRESETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError("", f"unknown preset '{text}'{hint}; presets: {', '.join(sorted(PRESETS))} "
                                  "(or give the path of a JSON config file)")
        raise ConfigError("", f"no such config file: {text}")
    raise TypeError(f"config must be a preset name, a path, a dict or a BackendConfig, got {type(config).__name__}")


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(".json") or os.sep in text or "/" in text or (os.altsep or "/") in text


def _load_file(path: Path, source: str) -> BackendConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e}", source=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=str(path)) from None
    return parse_config(data, source=source)


def parse_config(data: Any, source: str = "<dict>") -> BackendConfig:
    """Validate and normalise AIMET-format config data (the decoded JSON)."""
    return _Parser(source).config(data)


# ----------------------------------------------------------------------------- the validator

_TOP_KEYS = ("defaults", "params", "op_type", "supergroups", "supergroup_pass_list", "model_input", "model_output")
_DEFAULTS_KEYS = ("ops", "params", "strict_symmetric", "unsigned_symmetric", "per_channel_quantization",
                  "supported_kernels", "hw_version")
_DEFAULT_OPS_KEYS = ("is_output_quantized", "is_input_quantized", "is_symmetric")
_PARAM_KEYS = ("is_quantized", "is_symmetric")
_OP_TYPE_KEYS = ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization", "params",
                 "encoding_constraints", "supported_kernels")
_KERNEL_KEYS = ("activation", "param")
_PRECISION_KEYS = ("bitwidth", "dtype")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    if v is None:
        return "null"
    return json.dumps(v) if isinstance(v, (bool, int, float)) else type(v).__name__


class _Parser:
    """Walks the decoded JSON once; each method validates one kind of node and returns its normalised value."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str):
        raise ConfigError(path, problem, self.source if self.source != "<dict>" else None)

    # ------------------------------------------------------------ primitives
    def obj(self, v: Any, path: str, allowed: tuple[str, ...] | None) -> dict:
        if not isinstance(v, Mapping):
            self.fail(path, f"expected an object, got {_describe(v)}")
        for k in v:
            if not isinstance(k, str):
                self.fail(path, f"keys must be strings, got {_describe(k)}")
            if allowed is not None and k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(allowed)
                self.fail(_join(path, k), f"unknown key ({hint})")
        return dict(v)

    def boolean(self, v: Any, path: str) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v in _BOOL_STRINGS:
            return _BOOL_STRINGS[v]
        self.fail(path, f"expected a boolean ('True'/'False' or true/false), got {_describe(v)}")

    def number(self, v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(path, f"expected a finite number, got {_describe(v)}")
        return float(v)

    def string(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            self.fail(path, f"expected a string, got {_describe(v)}")
        return v

    def array(self, v: Any, path: str) -> list:
        if not isinstance(v, (list, tuple)):
            self.fail(path, f"expected a list, got {_describe(v)}")
        return list(v)

    def op_name(self, v: Any, path: str) -> str:
        name = self.string(v, path)
        if name not in KNOWN_OP_TYPES:
            close = difflib.get_close_matches(name, sorted(KNOWN_OP_TYPES), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else " (op types are ONNX names, e.g. 'Conv', 'Relu')"
            self.fail(path, f"unknown op type '{name}'{hint}")
        return name

    # ------------------------------------------------------------ sections
    def config(self, data: Any) -> BackendConfig:
        top = self.obj(data, "", _TOP_KEYS)
        mi = self.obj(top.get("model_input", {}), "model_input", ("is_input_quantized",))
        mo = self.obj(top.get("model_output", {}), "model_output", ("is_output_quantized",))
        return BackendConfig(
            defaults=self.defaults(top.get("defaults", {}), "defaults"),
            params=self.param_map(top.get("params", {}), "params"),
            op_type=self.op_types(top.get("op_type", {}), "op_type"),
            supergroups=self.supergroups(top.get("supergroups", []), "supergroups"),
            supergroup_pass_list=tuple(self.string(s, f"supergroup_pass_list[{i}]") for i, s in
                                       enumerate(self.array(top.get("supergroup_pass_list", []),
                                                            "supergroup_pass_list"))),
            model_input_quantized=(self.boolean(mi["is_input_quantized"], "model_input.is_input_quantized")
                                   if "is_input_quantized" in mi else None),
            model_output_quantized=(self.boolean(mo["is_output_quantized"], "model_output.is_output_quantized")
                                    if "is_output_quantized" in mo else None),
            source=self.source,
        )

    def defaults(self, v: Any, path: str) -> Defaults:
        d = self.obj(v, path, _DEFAULTS_KEYS)
        ops = self.obj(d.get("ops", {}), _join(path, "ops"), _DEFAULT_OPS_KEYS)
        params = self.obj(d.get("params", {}), _join(path, "params"), _PARAM_KEYS)

        def flag(section: dict, key: str, p: str) -> bool:
            return self.boolean(section[key], _join(p, key)) if key in section else False

        ops_p, params_p = _join(path, "ops"), _join(path, "params")
        return Defaults(
            is_output_quantized=flag(ops, "is_output_quantized", ops_p),
            is_input_quantized=flag(ops, "is_input_quantized", ops_p),
            is_symmetric=flag(ops, "is_symmetric", ops_p),
            param_is_quantized=flag(params, "is_quantized", params_p),
            param_is_symmetric=flag(params, "is_symmetric", params_p),
            strict_symmetric=flag(d, "strict_symmetric", path),
            unsigned_symmetric=flag(d, "unsigned_symmetric", path),
            per_channel_quantization=flag(d, "per_channel_quantization", path),
            hw_version=self.string(d["hw_version"], _join(path, "hw_version")) if "hw_version" in d else None,
            supported_kernels=(self.kernels(d["supported_kernels"], _join(path, "supported_kernels"), need_param=True)
                               if "supported_kernels" in d else None),
        )

    def param(self, v: Any, path: str) -> ParamConfig:
        p = self.obj(v, path, _PARAM_KEYS)
        return ParamConfig(**{k: self.boolean(p[k], _join(path, k)) for k in _PARAM_KEYS if k in p})

    def param_map(self, v: Any, path: str) -> FrozenDict:
        m = self.obj(v, path, None)
        return FrozenDict((name, self.param(cfg, _join(path, name))) for name, cfg in m.items())

    def op_types(self, v: Any, path: str) -> FrozenDict:
        m = self.obj(v, path, None)
        out = {}
        for name, cfg in m.items():
            p = _join(path, name)
            if name not in KNOWN_OP_TYPES and name != OP_TYPE_DEFAULTS_KEY:
                close = difflib.get_close_matches(name, sorted(KNOWN_OP_TYPES), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                where = f" in {self.source}" if self.source != "<dict>" else ""
                warnings.warn(f"{p}: unknown op type '{name}'{hint}; no op will match it{where}",
                              ConfigWarning, stacklevel=4)
            out[name] = self.op_type(cfg, p)
        return FrozenDict(out)

    def op_type(self, v: Any, path: str) -> OpTypeConfig:
        o = self.obj(v, path, _OP_TYPE_KEYS)
        kw: dict[str, Any] = {k: self.boolean(o[k], _join(path, k)) for k in
                              ("is_input_quantized", "is_output_quantized", "is_symmetric", "per_channel_quantization")
                              if k in o}
        if "params" in o:
            kw["params"] = self.param_map(o["params"], _join(path, "params"))
        if "encoding_constraints" in o:
            ep = _join(path, "encoding_constraints")
            ec = self.obj(o["encoding_constraints"], ep, ("min", "max"))
            for k in ("min", "max"):
                if k not in ec:
                    self.fail(ep, f"missing key '{k}' (encoding_constraints needs both min and max)")
            lo, hi = self.number(ec["min"], _join(ep, "min")), self.number(ec["max"], _join(ep, "max"))
            if not lo < hi:
                self.fail(ep, f"min must be smaller than max, got min={lo}, max={hi}")
            kw["encoding_constraints"] = (lo, hi)
        if "supported_kernels" in o:
            kw["supported_kernels"] = self.kernels(o["supported_kernels"], _join(path, "supported_kernels"),
                                                   need_param=False)
        return OpTypeConfig(**kw)

    def kernels(self, v: Any, path: str, need_param: bool) -> tuple[Kernel, ...]:
        items = self.array(v, path)
        if not items:
            self.fail(path, "expected at least one kernel")
        out = []
        for i, item in enumerate(items):
            p = f"{path}[{i}]"
            k = self.obj(item, p, _KERNEL_KEYS)
            if "activation" not in k:
                self.fail(p, "missing key 'activation'")
            if need_param and "param" not in k:
                self.fail(p, "missing key 'param' (required in defaults.supported_kernels)")
            out.append(Kernel(self.precision(k["activation"], _join(p, "activation")),
                              self.precision(k["param"], _join(p, "param")) if "param" in k else None))
        return tuple(out)

    def precision(self, v: Any, path: str) -> tuple[int, str]:
        d = self.obj(v, path, _PRECISION_KEYS)
        for k in _PRECISION_KEYS:
            if k not in d:
                self.fail(path, f"missing key '{k}'")
        bw, bp = d["bitwidth"], _join(path, "bitwidth")
        if isinstance(bw, float) and bw.is_integer():
            bw = int(bw)
        if isinstance(bw, bool) or not isinstance(bw, int):
            self.fail(bp, f"expected an integer bit-width, got {_describe(bw)}")
        if not 1 <= bw <= 32:
            self.fail(bp, f"bit-width must be in [1, 32], got {bw}")
        dtype = d["dtype"]
        if dtype not in ("int", "float"):
            self.fail(_join(path, "dtype"), f"expected 'int' or 'float', got {_describe(dtype)}")
        if dtype == "float" and bw not in (16, 32):
            self.fail(bp, f"dtype 'float' needs bit-width 16 or 32, got {bw}")
        return bw, dtype

    def supergroups(self, v: Any, path: str) -> tuple[tuple[str, ...], ...]:
        out = []
        for i, sg in enumerate(self.array(v, path)):
            p = f"{path}[{i}]"
            s = self.obj(sg, p, ("op_list",))
            if "op_list" not in s:
                self.fail(p, "missing key 'op_list'")
            ops = self.array(s["op_list"], _join(p, "op_list"))
            if len(ops) < 2:
                self.fail(_join(p, "op_list"), f"a supergroup needs at least 2 ops, got {len(ops)}")
            out.append(tuple(self.op_name(op, f"{p}.op_list[{j}]") for j, op in enumerate(ops)))
        return tuple(out)
