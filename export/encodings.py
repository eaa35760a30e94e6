"""AIMET encodings files (versions 0.6.1, 1.0.0, 2.0.0) as an in-memory model: read, write, validate.

Internal convention (the simulation's): q = clamp(round(x / scale) - offset, qmin, qmax), x_hat = (q + offset) * scale,
so offset = -zero_point. Field names, sign conventions and version quirks are documented in docs/export.md.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._files import atomic_write

__all__ = [
    "SUPPORTED_VERSIONS",
    "EncodingsError",
    "TensorEncoding",
    "Encodings",
    "grid",
    "quantize_array",
    "read_encodings",
    "load_encodings",
    "dump_encodings",
    "write_encodings",
    "validate",
    "infer_channel_axes",
    "atomic_write",
]

SUPPORTED_VERSIONS = ("0.6.1", "1.0.0", "2.0.0")


class EncodingsError(ValueError):
    """An encodings file or encoding that does not fit; `tensor` names the offending tensor when there is one."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


def grid(bitwidth: int, symmetric: bool, strict: bool = False, unsigned: bool = False) -> tuple[int, int]:
    """(qmin, qmax): asymmetric/unsigned symmetric [0, 2^b-1], symmetric [-2^(b-1), 2^(b-1)-1], strict drops -2^(b-1)."""
    b = int(bitwidth)
    if not 1 <= b <= 32:
        raise EncodingsError(f"bitwidth must be in [1, 32], got {bitwidth}")
    if not symmetric or unsigned:
        return 0, 2**b - 1
    qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return (qmin + 1, qmax) if strict else (qmin, qmax)


def _grid_kind(bitwidth: int, symmetric: bool, qmin: int, qmax: int) -> str | None:
    """Which of the four grids (qmin, qmax) is: 'asymmetric', 'signed', 'strict', 'unsigned' or None."""
    b = int(bitwidth)
    if not symmetric:
        return "asymmetric" if (qmin, qmax) == (0, 2**b - 1) else None
    if (qmin, qmax) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1):
        return "signed"
    if (qmin, qmax) == (-(2 ** (b - 1)) + 1, 2 ** (b - 1) - 1):
        return "strict"
    if (qmin, qmax) == (0, 2**b - 1):
        return "unsigned"
    return None


@dataclass(eq=False)
class TensorEncoding:
    """One tensor's encoding in the simulation's convention (offset = -zero_point); per-channel when scale has shape (C,).

    channel_axis is None for per-tensor encodings, and also for per-channel ones read from 0.6.1/1.0.0 files, which do
    not record the axis: `infer_channel_axes` fills it from the graph. dtype "float" marks a float (e.g. fp16)
    encoding, which has no grid: scale/offset/qmin/qmax are then None.
    """

    name: str
    bitwidth: int
    symmetric: bool
    scale: np.ndarray | None
    offset: np.ndarray | None
    qmin: int | None
    qmax: int | None
    channel_axis: int | None = None
    dtype: str = "int"

    def __post_init__(self):
        self.bitwidth = int(self.bitwidth)
        self.symmetric = bool(self.symmetric)
        if self.dtype not in ("int", "float"):
            raise EncodingsError(f"{self.name}: dtype must be 'int' or 'float', got {self.dtype!r}", self.name)
        if self.dtype == "float":
            self.scale = self.offset = self.qmin = self.qmax = None
            return
        scale = np.asarray(self.scale, dtype=np.float32)
        offset_f = np.asarray(self.offset, dtype=np.float64)
        if scale.ndim > 1:
            scale = scale.reshape(-1)
        if offset_f.ndim > 1:
            offset_f = offset_f.reshape(-1)
        if offset_f.shape != scale.shape:
            if offset_f.size == 1:
                offset_f = np.full(scale.shape, float(offset_f.reshape(-1)[0]))
            else:
                raise EncodingsError(
                    f"{self.name}: offset shape {offset_f.shape} does not match scale shape {scale.shape}", self.name
                )
        if not np.all(np.isfinite(offset_f)) or np.any(offset_f != np.round(offset_f)):
            raise EncodingsError(f"{self.name}: offsets must be integers, got {offset_f.tolist()}", self.name)
        self.scale = scale
        self.offset = offset_f.astype(np.int64)
        if self.qmin is None or self.qmax is None:
            raise EncodingsError(f"{self.name}: an int encoding needs qmin and qmax", self.name)
        self.qmin, self.qmax = int(self.qmin), int(self.qmax)
        if self.channel_axis is not None:
            self.channel_axis = int(self.channel_axis)

    @classmethod
    def create(
        cls,
        name: str,
        scale,
        offset=0,
        bitwidth: int = 8,
        symmetric: bool = False,
        strict: bool = False,
        unsigned: bool = False,
        channel_axis: int | None = None,
    ) -> "TensorEncoding":
        """An int encoding on one of the four grids (see `grid`)."""
        qmin, qmax = grid(bitwidth, symmetric, strict, unsigned)
        scale = np.asarray(scale, dtype=np.float32)
        offset = np.broadcast_to(np.asarray(offset), scale.shape)
        return cls(name, bitwidth, symmetric, scale, offset, qmin, qmax, channel_axis, "int")

    @classmethod
    def float_encoding(cls, name: str, bitwidth: int = 16) -> "TensorEncoding":
        """A float (e.g. fp16) encoding: the tensor is simulated in a float format, not on an integer grid."""
        return cls(name, bitwidth, False, None, None, None, None, None, "float")

    @property
    def is_float(self) -> bool:
        return self.dtype == "float"

    @property
    def per_channel(self) -> bool:
        return self.scale is not None and self.scale.ndim == 1

    @property
    def zero_point(self) -> np.ndarray:
        """ONNX zero point: -offset."""
        return -self.offset

    @property
    def kind(self) -> str | None:
        """'asymmetric', 'signed' (symmetric), 'strict' (strict symmetric), 'unsigned' (unsigned symmetric) or None."""
        if self.is_float:
            return None
        return _grid_kind(self.bitwidth, self.symmetric, self.qmin, self.qmax)

    @property
    def min(self) -> np.ndarray:
        """Smallest representable value per channel: (qmin + offset) * scale (float32)."""
        return ((self.qmin + self.offset).astype(np.float32) * self.scale).astype(np.float32)

    @property
    def max(self) -> np.ndarray:
        """Largest representable value per channel: (qmax + offset) * scale (float32)."""
        return ((self.qmax + self.offset).astype(np.float32) * self.scale).astype(np.float32)

    def with_name(self, name: str) -> "TensorEncoding":
        return TensorEncoding(
            name, self.bitwidth, self.symmetric, self.scale, self.offset, self.qmin, self.qmax, self.channel_axis,
            self.dtype,
        )

    def with_axis(self, axis: int | None) -> "TensorEncoding":
        return TensorEncoding(
            self.name, self.bitwidth, self.symmetric, self.scale, self.offset, self.qmin, self.qmax, axis, self.dtype
        )

    def quantize(self, x: np.ndarray, axis: int | None = None) -> np.ndarray:
        """Integer grid values of x (int64), rounded exactly as the simulation does (see `quantize_array`)."""
        if axis is None:
            axis = self.channel_axis
        return quantize_array(x, self.scale, self.offset, self.qmin, self.qmax, axis if self.per_channel else None)

    def dequantize(self, q: np.ndarray, axis: int | None = None) -> np.ndarray:
        """(q + offset) * scale in float32."""
        q = np.asarray(q)
        scale, offset = self.scale, self.offset
        if self.per_channel:
            ax = (self.channel_axis if axis is None else axis) % q.ndim
            shape = [1] * q.ndim
            shape[ax] = -1
            scale, offset = scale.reshape(shape), offset.reshape(shape)
        return ((q + offset).astype(np.float32) * scale).astype(np.float32)

    def same_as(self, other: "TensorEncoding", check_name: bool = True) -> bool:
        """Exact equality of every field (arrays compared element-wise, scale bit-exact)."""
        if not isinstance(other, TensorEncoding):
            return False
        if check_name and self.name != other.name:
            return False
        head = (self.bitwidth, self.symmetric, self.qmin, self.qmax, self.channel_axis, self.dtype)
        if head != (other.bitwidth, other.symmetric, other.qmin, other.qmax, other.channel_axis, other.dtype):
            return False
        if self.is_float:
            return True
        return (
            self.scale.shape == other.scale.shape
            and np.array_equal(self.scale.view(np.uint32), other.scale.view(np.uint32))
            and np.array_equal(self.offset, other.offset)
        )

    def __eq__(self, other):
        return self.same_as(other)

    def __repr__(self):
        if self.is_float:
            return f"TensorEncoding({self.name!r}, float{self.bitwidth})"
        s = self.scale.tolist() if self.scale.size <= 4 else f"<{self.scale.size} scales>"
        o = self.offset.tolist() if self.offset.size <= 4 else f"<{self.offset.size} offsets>"
        return (
            f"TensorEncoding({self.name!r}, bw={self.bitwidth}, {self.kind}, scale={s}, offset={o}, "
            f"grid=[{self.qmin},{self.qmax}], axis={self.channel_axis})"
        )


def quantize_array(x, scale, offset, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    """q = clamp(nearbyint(x * float32(1/scale)) - offset, qmin, qmax) as int64, float32 arithmetic, ties to even.

    This is what the simulation's fused fake-quant kernels compute (reciprocal multiply, not a division), so an
    exported weight is bit-identical to the simulated one.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    offset = np.asarray(offset, dtype=np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, offset = scale.reshape(shape), offset.reshape(shape)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint((x * inv).astype(np.float32)).astype(np.float64)
    r = np.nan_to_num(r, nan=0.0, posinf=float(qmax) - offset.min() + 1, neginf=float(qmin) - offset.max() - 1)
    return np.clip(r - offset, qmin, qmax).astype(np.int64)


@dataclass(eq=False)
class Encodings:
    """An encodings file in memory: activation and param encodings by tensor name, plus the file's other fields.

    `extra` keeps unknown top-level keys (e.g. AIMET's "producer") so that a read/write round trip preserves them.
    A 2.0.0 file does not separate activations from params: without a model every entry is read into `activations`;
    `assign_params(model)` moves those naming initializers into `params`.
    """

    activations: dict[str, TensorEncoding] = field(default_factory=dict)
    params: dict[str, TensorEncoding] = field(default_factory=dict)
    version: str = "1.0.0"
    excluded_layers: list | None = None
    quantizer_args: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> TensorEncoding | None:
        """The encoding of a tensor, looked up in params then activations."""
        return self.params.get(name) or self.activations.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.params or name in self.activations

    def __len__(self) -> int:
        return len(self.params) + len(self.activations)

    def all(self) -> dict[str, TensorEncoding]:
        """Every encoding, activations first, then params."""
        return {**self.activations, **self.params}

    def add_activation(self, enc: TensorEncoding) -> None:
        self.activations[enc.name] = enc

    def add_param(self, enc: TensorEncoding) -> None:
        self.params[enc.name] = enc

    def assign_params(self, model) -> "Encodings":
        """Move entries named after the model's initializers (or Constant outputs) from activations to params."""
        consts = _constant_names(model)
        for name in [n for n in self.activations if n in consts]:
            self.params[name] = self.activations.pop(name)
        return self

    def same_as(self, other: "Encodings") -> bool:
        """Same encodings (activations and params, order-insensitive) and same excluded_layers/quantizer_args."""
        def eq(a: dict, b: dict) -> bool:
            return a.keys() == b.keys() and all(a[k].same_as(b[k]) for k in a)

        return (
            eq(self.activations, other.activations)
            and eq(self.params, other.params)
            and (self.excluded_layers or []) == (other.excluded_layers or [])
            and self.quantizer_args == other.quantizer_args
        )


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------

def _num(value, what: str, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EncodingsError(f"{name}: {what} must be a number, got {value!r}", name) from None
    return v


def _int_exact(value, what: str, name: str) -> int:
    v = _num(value, what, name)
    if not math.isfinite(v) or v != round(v):
        raise EncodingsError(f"{name}: {what} must be an integer, got {value!r}", name)
    return int(round(v))


def _bool_str(value, name: str) -> bool:
    """AIMET writes is_symmetric as the strings "True"/"False" in 0.6.1; accept real bools too."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise EncodingsError(f"{name}: is_symmetric must be 'True' or 'False', got {value!r}", name)


def _from_written(name: str, bitwidth: int, symmetric: bool, scale, written_offsets, axis=None) -> TensorEncoding:
    """Encoding from a 0.6.1/1.0.0 entry, whose offset is in AIMET's unsigned representation (= offset + qmin).

    Asymmetric: grid [0, 2^b-1], offset as written. Symmetric: the written offset names the grid: -2^(b-1) -> signed,
    -(2^(b-1)-1) -> strict symmetric, 0 -> unsigned symmetric; the internal offset is then 0.
    """
    b = bitwidth
    offs = np.asarray(written_offsets, dtype=np.int64)
    if not symmetric:
        qmin, qmax = grid(b, False)
        return TensorEncoding(name, b, False, scale, offs, qmin, qmax, axis)
    kinds = {-(2 ** (b - 1)): (False, False), -(2 ** (b - 1)) + 1: (True, False), 0: (False, True)}
    uniq = set(offs.reshape(-1).tolist())
    if len(uniq) != 1 or next(iter(uniq)) not in kinds:
        raise EncodingsError(
            f"{name}: symmetric {b}-bit encoding has offsets {sorted(uniq)}; expected all equal to "
            f"{-(2 ** (b - 1))} (signed), {-(2 ** (b - 1)) + 1} (strict) or 0 (unsigned symmetric)",
            name,
        )
    strict, unsigned = kinds[next(iter(uniq))]
    qmin, qmax = grid(b, True, strict, unsigned)
    return TensorEncoding(name, b, True, scale, np.zeros_like(offs), qmin, qmax, axis)


def _parse_061_entry(name: str, entries) -> TensorEncoding:
    if isinstance(entries, dict):
        if any(k in entries for k in ("output", "input")):
            raise EncodingsError(
                f"{name}: looks like a *_torch.encodings file (layer -> input/output); use the ONNX .encodings", name
            )
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise EncodingsError(f"{name}: a 0.6.1 encoding must be a non-empty list of dicts", name)
    first = entries[0]
    if not isinstance(first, dict):
        raise EncodingsError(f"{name}: a 0.6.1 encoding must be a list of dicts", name)
    dtype = str(first.get("dtype", "int")).lower()
    if "bitwidth" not in first:
        raise EncodingsError(f"{name}: missing 'bitwidth'", name)
    bw = _int_exact(first["bitwidth"], "bitwidth", name)
    if dtype == "float":
        return TensorEncoding.float_encoding(name, bw)
    if dtype != "int":
        raise EncodingsError(f"{name}: dtype must be 'int' or 'float', got {first.get('dtype')!r}", name)
    sym = _bool_str(first.get("is_symmetric", "False"), name)
    scales, offsets = [], []
    for i, e in enumerate(entries):
        for key in ("scale", "offset"):
            if key not in e:
                raise EncodingsError(f"{name}: channel {i} has no '{key}'", name)
        if _int_exact(e.get("bitwidth", bw), "bitwidth", name) != bw or _bool_str(e.get("is_symmetric", sym), name) != sym:
            raise EncodingsError(f"{name}: channels disagree on bitwidth/is_symmetric", name)
        scales.append(_num(e["scale"], "scale", name))
        offsets.append(_int_exact(e["offset"], "offset", name))
    scale = np.asarray(scales, dtype=np.float32)
    offs = np.asarray(offsets, dtype=np.int64)
    if len(entries) == 1:
        scale, offs = scale.reshape(()), offs.reshape(())
    return _from_written(name, bw, sym, scale, offs)


def _parse_100_entry(d) -> TensorEncoding:
    if not isinstance(d, dict) or "name" not in d:
        raise EncodingsError(f"a 1.0.0 encoding must be a dict with a 'name', got {d!r:.80}")
    name = str(d["name"])
    for key in ("dtype", "bw"):
        if key not in d:
            raise EncodingsError(f"{name}: missing '{key}'", name)
    bw = _int_exact(d["bw"], "bw", name)
    dtype = str(d["dtype"]).upper()
    if dtype == "FLOAT":
        return TensorEncoding.float_encoding(name, bw)
    if dtype != "INT":
        raise EncodingsError(f"{name}: dtype must be 'INT' or 'FLOAT', got {d['dtype']!r}", name)
    enc_type = d.get("enc_type", "PER_TENSOR")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
        raise EncodingsError(f"{name}: enc_type {enc_type!r} is not supported (only PER_TENSOR, PER_CHANNEL)", name)
    if "zero_point_shift" in d and any(float(v) != 0 for v in np.ravel(d["zero_point_shift"])):
        raise EncodingsError(f"{name}: zero_point_shift is not supported", name)
    for key in ("is_sym", "scale", "offset"):
        if key not in d:
            raise EncodingsError(f"{name}: missing '{key}'", name)
    if not isinstance(d["is_sym"], bool):
        raise EncodingsError(f"{name}: is_sym must be a JSON bool, got {d['is_sym']!r}", name)
    scales = [_num(v, "scale", name) for v in np.ravel(d["scale"]).tolist()]
    offsets = [_int_exact(v, "offset", name) for v in np.ravel(d["offset"]).tolist()]
    if len(scales) != len(offsets) or not scales:
        raise EncodingsError(f"{name}: {len(scales)} scales but {len(offsets)} offsets", name)
    scale = np.asarray(scales, dtype=np.float32)
    offs = np.asarray(offsets, dtype=np.int64)
    if enc_type == "PER_TENSOR":
        if len(scales) != 1:
            raise EncodingsError(f"{name}: PER_TENSOR encoding with {len(scales)} scales", name)
        scale, offs = scale.reshape(()), offs.reshape(())
    return _from_written(name, bw, bool(d["is_sym"]), scale, offs)


def _parse_dtype_str(s: str, name: str) -> tuple[bool, int]:
    s = str(s).lower()
    signed = s.startswith("int")
    digits = s[3:] if signed else s[4:] if s.startswith("uint") else ""
    if not digits.isdigit():
        raise EncodingsError(f"{name}: output_dtype {s!r} is not an integer type (only intN/uintN are supported)", name)
    return signed, int(digits)


def _parse_200_entry(d) -> TensorEncoding:
    if not isinstance(d, dict) or "name" not in d:
        raise EncodingsError(f"a 2.0.0 encoding must be a dict with a 'name', got {d!r:.80}")
    name = str(d["name"])
    for key in ("block_size", "per_block_int_scale", "per_channel_float_scale"):
        if key in d:
            raise EncodingsError(f"{name}: '{key}' (blockwise/LPBQ) encodings are not supported", name)
    if "output_dtype" not in d or "y_scale" not in d:
        raise EncodingsError(f"{name}: a 2.0.0 encoding needs 'output_dtype' and 'y_scale'", name)
    if isinstance(d["y_scale"], dict):
        raise EncodingsError(f"{name}: meta-encoded y_scale (2.1.0) is not supported", name)
    signed, bw = _parse_dtype_str(d["output_dtype"], name)
    scale = np.asarray(d["y_scale"], dtype=np.float64)
    if scale.ndim > 1:
        raise EncodingsError(f"{name}: y_scale must be a number or a 1-D list", name)
    zp_raw = d.get("y_zero_point", 0)
    zp = np.asarray(zp_raw, dtype=np.float64)
    if np.any(zp != np.round(zp)):
        raise EncodingsError(f"{name}: fractional y_zero_point {zp.tolist()} is not supported", name)
    zp = np.broadcast_to(zp, scale.shape).astype(np.int64)
    axis = d.get("axis")
    if scale.ndim == 1 and axis is None:
        raise EncodingsError(f"{name}: per-channel y_scale without 'axis'", name)
    if scale.ndim == 0:
        axis = None
    if signed and np.all(zp == 0):
        qmin, qmax = grid(bw, True)
        return TensorEncoding(name, bw, True, scale.astype(np.float32), -zp, qmin, qmax, axis)
    offset = -zp
    if signed:
        # A signed grid with a zero point: same values on the unsigned grid, q_u = q_s + 2^(b-1).
        offset = offset - 2 ** (bw - 1)
    qmin, qmax = grid(bw, False)
    return TensorEncoding(name, bw, False, scale.astype(np.float32), offset, qmin, qmax, axis)


def load_encodings(data: dict, model=None) -> Encodings:
    """An `Encodings` from a parsed encodings JSON object (any supported version)."""
    if not isinstance(data, dict):
        raise EncodingsError("an encodings file must hold a JSON object")
    version = data.get("version")
    if version is None:
        version = "2.0.0" if "encodings" in data else "0.6.1"
    version = str(version)
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsError(f"encodings version {version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})")
    known = {"version", "activation_encodings", "param_encodings", "encodings", "excluded_layers", "quantizer_args"}
    enc = Encodings(
        version=version,
        excluded_layers=data.get("excluded_layers"),
        quantizer_args=data.get("quantizer_args"),
        extra={k: v for k, v in data.items() if k not in known},
    )
    if version == "0.6.1":
        for section, target in (("activation_encodings", enc.activations), ("param_encodings", enc.params)):
            entries = data.get(section, {})
            if not isinstance(entries, dict):
                raise EncodingsError(f"0.6.1 '{section}' must be an object mapping tensor names to lists")
            for name, e in entries.items():
                target[name] = _parse_061_entry(str(name), e)
    elif version == "1.0.0":
        for section, target in (("activation_encodings", enc.activations), ("param_encodings", enc.params)):
            entries = data.get(section, [])
            if not isinstance(entries, list):
                raise EncodingsError(f"1.0.0 '{section}' must be a list of encodings")
            for e in entries:
                te = _parse_100_entry(e)
                if te.name in target:
                    raise EncodingsError(f"{te.name}: appears twice in '{section}'", te.name)
                target[te.name] = te
    else:
        entries = data.get("encodings", [])
        if not isinstance(entries, list):
            raise EncodingsError("2.0.0 'encodings' must be a list of encodings")
        for e in entries:
            te = _parse_200_entry(e)
            if te.name in enc.activations:
                raise EncodingsError(f"{te.name}: appears twice in 'encodings'", te.name)
            enc.activations[te.name] = te
    if model is not None:
        enc.assign_params(model)
    return enc


def read_encodings(path, model=None) -> Encodings:
    """Read an AIMET encodings file (0.6.1, 1.0.0 or 2.0.0); with a model, 2.0.0 initializer entries become params."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise EncodingsError(f"{path}: not valid JSON ({e})") from None
    if model is not None and not hasattr(model, "graph"):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    return load_encodings(data, model)


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------

def _written_offsets(te: TensorEncoding) -> list[int]:
    """AIMET's 0.6.1/1.0.0 offset: offset + qmin, i.e. the offset on the unsigned grid (-2^(b-1) for signed symmetric)."""
    return (te.offset.reshape(-1) + te.qmin).astype(np.int64).tolist()


def _entry_061(te: TensorEncoding) -> list[dict]:
    if te.is_float:
        return [{"bitwidth": te.bitwidth, "dtype": "float"}]
    mins, maxs = te.min.reshape(-1).tolist(), te.max.reshape(-1).tolist()
    return [
        {
            "bitwidth": te.bitwidth,
            "dtype": "int",
            "is_symmetric": str(te.symmetric),
            "max": float(mx),
            "min": float(mn),
            "offset": int(o),
            "scale": float(s),
        }
        for s, o, mn, mx in zip(te.scale.reshape(-1).tolist(), _written_offsets(te), mins, maxs)
    ]


def _entry_100(te: TensorEncoding) -> dict:
    if te.is_float:
        return {"name": te.name, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": te.bitwidth}
    return {
        "name": te.name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if te.per_channel else "PER_TENSOR",
        "bw": te.bitwidth,
        "is_sym": te.symmetric,
        "scale": [float(s) for s in te.scale.reshape(-1).tolist()],
        "offset": _written_offsets(te),
    }


def _entry_200(te: TensorEncoding) -> dict:
    """{name, output_dtype, y_scale, [y_zero_point], [axis]}; zero point = -offset, omitted when all zero."""
    kind = te.kind
    if kind == "strict":
        warnings.warn(f"{te.name}: 2.0.0 cannot mark a strict symmetric grid; written as int{te.bitwidth}", stacklevel=3)
    signed = te.qmin < 0
    out: dict[str, Any] = {"name": te.name, "output_dtype": f"{'int' if signed else 'uint'}{te.bitwidth}"}
    zp = (-te.offset).astype(np.int64)
    if te.per_channel:
        if te.channel_axis is None:
            raise EncodingsError(
                f"{te.name}: per-channel encoding without a channel axis cannot be written as 2.0.0; "
                "pass the model to write_encodings (or call infer_channel_axes)",
                te.name,
            )
        out["y_scale"] = [float(s) for s in te.scale.tolist()]
        if np.any(zp != 0):
            out["y_zero_point"] = zp.tolist()
        out["axis"] = int(te.channel_axis)
    else:
        out["y_scale"] = float(te.scale)
        if int(zp) != 0:
            out["y_zero_point"] = int(zp)
    return out


def dump_encodings(enc: Encodings, version: str | None = None, model=None) -> dict:
    """The JSON object of `enc` in the given AIMET version (default: enc.version)."""
    version = str(version or enc.version)
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsError(f"cannot write encodings version {version!r} (supported: {', '.join(SUPPORTED_VERSIONS)})")
    if model is not None:
        enc = infer_channel_axes(enc, model)
    out: dict[str, Any] = {"version": version}
    if version == "0.6.1":
        out["activation_encodings"] = {n: _entry_061(te) for n, te in enc.activations.items()}
        out["param_encodings"] = {n: _entry_061(te) for n, te in enc.params.items()}
    elif version == "1.0.0":
        out["activation_encodings"] = [_entry_100(te) for te in enc.activations.values()]
        out["param_encodings"] = [_entry_100(te) for te in enc.params.values()]
    else:
        entries = []
        for te in enc.all().values():
            if te.is_float:
                warnings.warn(f"{te.name}: float encodings have no 2.0.0 form (AIMET omits them); skipped", stacklevel=2)
                continue
            entries.append(_entry_200(te))
        out["encodings"] = entries
    if enc.excluded_layers is not None or version != "2.0.0":
        out["excluded_layers"] = list(enc.excluded_layers or [])
    if enc.quantizer_args is not None:
        out["quantizer_args"] = enc.quantizer_args
    for k, v in enc.extra.items():
        out.setdefault(k, v)
    return out


def write_encodings(enc: Encodings, path, version: str | None = None, model=None) -> None:
    """Write `enc` as an AIMET encodings file of `version`, atomically; `model` resolves channel axes (needed by 2.0.0)."""
    data = dump_encodings(enc, version, model)
    text = json.dumps(data, indent=4, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# Graph checks
# ----------------------------------------------------------------------------------------------------------------------

def _constant_names(model) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            names.update(n.output)
    return names


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name:
                out.setdefault(name, []).append((n, i))
    return out


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def param_channel_axis(node, input_index: int, rank: int) -> int | None:
    """The output-channel axis of a weight consumed by `node` at `input_index` (None when the op has no such notion)."""
    op = node.op_type
    if input_index == 1 and op == "Conv":
        return 0
    if input_index == 1 and op == "ConvTranspose":
        return 1
    if input_index == 1 and op == "Gemm":
        return 0 if int(_attr(node, "transB", 0)) else 1
    if input_index == 1 and op == "MatMul":
        return rank - 1
    if input_index in (1, 2) and op in ("Conv", "Gemm", "ConvTranspose") and rank == 1:
        return 0
    return None


def _shapes(model) -> dict[str, tuple]:
    """Known tensor shapes: initializers, Constant outputs, graph inputs/outputs and inferred value_info."""
    import onnx
    from onnx import numpy_helper

    shapes: dict[str, tuple] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort here
        inferred = model
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for n in model.graph.node:
        if n.op_type == "Constant":
            v = _attr(n, "value")
            if v is not None:
                shapes[n.output[0]] = tuple(numpy_helper.to_array(v).shape)
    return shapes


def infer_channel_axes(enc: Encodings, model) -> Encodings:
    """A copy of `enc` whose per-channel encodings without an axis get it from the graph (weight consumers; axis 1
    for activations, the NCHW channel)."""
    shapes = _shapes(model)
    consumers = _consumers(model)
    out = Encodings(
        dict(enc.activations), dict(enc.params), enc.version, enc.excluded_layers, enc.quantizer_args, dict(enc.extra)
    )
    for section in (out.activations, out.params):
        for name, te in section.items():
            if not te.per_channel or te.channel_axis is not None:
                continue
            rank = len(shapes.get(name, ())) or None
            axis = None
            for node, idx in consumers.get(name, []):
                axis = param_channel_axis(node, idx, rank or 2)
                if axis is not None:
                    break
            if axis is None and section is out.activations and rank and rank >= 2:
                axis = 1
            if axis is not None:
                section[name] = te.with_axis(axis)
    return out


def validate(enc: Encodings, onnx_model) -> None:
    """Raise EncodingsError naming the first tensor whose encoding does not fit the model; return None if all fit.

    Checks: the tensor exists (params: as an initializer/Constant), dtype/bitwidth range, grid, scale finite and > 0,
    offsets on the grid (zero point representable), channel count == tensor dim on the channel axis.
    """
    import onnx

    model = onnx_model
    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)
    g = model.graph
    tensors = {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
    for n in g.node:
        tensors.update(x for x in n.output if x)
        tensors.update(x for x in n.input if x)
    consts = _constant_names(model)
    shapes = _shapes(model)
    resolved = infer_channel_axes(enc, model)
    for is_param, section in ((False, resolved.activations), (True, resolved.params)):
        for name, te in section.items():
            if name not in tensors:
                raise EncodingsError(f"{name}: tensor not found in the model", name)
            if is_param and name not in consts:
                raise EncodingsError(f"{name}: param encoding for a tensor that is not an initializer/constant", name)
            _check_one(te, shapes.get(name))


def _check_one(te: TensorEncoding, shape: tuple | None) -> None:
    name = te.name
    if te.is_float:
        if te.bitwidth not in (8, 16, 32):
            raise EncodingsError(f"{name}: float bitwidth must be 8, 16 or 32, got {te.bitwidth}", name)
        return
    if not 2 <= te.bitwidth <= 32:
        raise EncodingsError(f"{name}: bitwidth {te.bitwidth} out of range [2, 32]", name)
    if te.kind is None:
        raise EncodingsError(
            f"{name}: grid [{te.qmin}, {te.qmax}] is not a {te.bitwidth}-bit "
            f"{'symmetric' if te.symmetric else 'asymmetric'} grid", name)
    if not np.all(np.isfinite(te.scale)) or np.any(te.scale <= 0):
        raise EncodingsError(f"{name}: scale must be finite and > 0, got {te.scale.reshape(-1)[:8].tolist()}", name)
    zp = -te.offset
    if np.any(zp < te.qmin) or np.any(zp > te.qmax):
        raise EncodingsError(
            f"{name}: offset {te.offset.reshape(-1)[:8].tolist()} puts the zero point outside the grid "
            f"[{te.qmin}, {te.qmax}]", name)
    if te.symmetric and np.any(te.offset != 0):
        raise EncodingsError(f"{name}: symmetric encoding with a nonzero offset", name)
    if te.per_channel:
        if shape is None:
            return
        if te.channel_axis is None:
            raise EncodingsError(f"{name}: per-channel encoding ({te.scale.size} channels) with unknown axis", name)
        rank = len(shape)
        if not -rank <= te.channel_axis < rank:
            raise EncodingsError(f"{name}: channel axis {te.channel_axis} out of range for rank {rank}", name)
        dim = shape[te.channel_axis % rank]
        if dim is not None and dim != te.scale.size:
            raise EncodingsError(
                f"{name}: {te.scale.size} channels but the tensor has {dim} on axis {te.channel_axis} "
                f"(shape {list(shape)})", name)

