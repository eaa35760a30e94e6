"""export.encodings: AIMET file formats (0.6.1, 1.0.0, 2.0.0), sign conventions, round trips, validation, atomic writes.

Expected values are written out by hand from AIMET's conventions (offset + qmin in 0.6.1/1.0.0, zero point = -offset in
2.0.0), not computed with the module under test.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.encodings import (
    Encodings,
    EncodingsError,
    TensorEncoding,
    dump_encodings,
    grid,
    load_encodings,
    quantize_array,
    read_encodings,
    validate,
    write_encodings,
)

VERSIONS = ("0.6.1", "1.0.0", "2.0.0")


def _model():
    """x[1,3,8,8] -> Conv(w[4,3,3,3], b[4]) -> c -> Relu -> y; fc: Flatten -> Gemm(wf[10,256], transB=1)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    wf = rng.standard_normal((10, 256)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf"], ["z"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(wf, "wf")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _encodings() -> Encodings:
    """One encoding of each grid kind, per-tensor and per-channel."""
    enc = Encodings(excluded_layers=["head"], quantizer_args={"activation_bitwidth": 8, "param_bitwidth": 8,
                                                                "dtype": "int", "is_symmetric": True,
                                                                "per_channel_quantization": True,
                                                                "quant_scheme": "post_training_tf"})
    enc.add_activation(TensorEncoding.create("x", 0.018501389771699905, -114, 8, False))
    enc.add_activation(TensorEncoding.create("y", 0.0105, 0, 8, True, unsigned=True))
    enc.add_activation(TensorEncoding.create("c", 0.02, 0, 8, True))
    enc.add_activation(TensorEncoding.float_encoding("z", 16))
    enc.add_param(TensorEncoding.create("w", [0.01, 0.02, 0.03, 0.04], 0, 8, True, channel_axis=0))
    enc.add_param(TensorEncoding.create("wf", 0.005, 0, 4, True, strict=True))
    return enc


def test_grid_kinds():
    assert grid(8, False) == (0, 255)
    assert grid(8, True) == (-128, 127)
    assert grid(8, True, strict=True) == (-127, 127)
    assert grid(8, True, unsigned=True) == (0, 255)
    assert grid(4, True) == (-8, 7)
    assert grid(16, False) == (0, 65535)


def test_symmetric_061_offset_is_aimets_unsigned_representation():
    """A symmetric 8-bit encoding is written in 0.6.1 with offset -128 and min/max = (-128, 127) * scale."""
    enc = Encodings(params={"w": TensorEncoding.create("w", 0.5, 0, 8, True)})
    d = dump_encodings(enc, "0.6.1")
    (entry,) = d["param_encodings"]["w"]
    assert entry == {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "offset": -128, "scale": 0.5,
                     "min": -64.0, "max": 63.5}
    assert d["version"] == "0.6.1"
    # 1.0.0: the same unsigned offset in a list, is_sym a real bool.
    d1 = dump_encodings(enc, "1.0.0")
    assert d1["param_encodings"] == [{"name": "w", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8,
                                      "is_sym": True, "scale": [0.5], "offset": [-128]}]
    # 2.0.0: ONNX QuantizeLinear form, int8 with zero point 0 (omitted).
    d2 = dump_encodings(enc, "2.0.0")
    assert d2["encodings"] == [{"name": "w", "output_dtype": "int8", "y_scale": 0.5}]


def test_other_grids_written_offsets():
    def written(te, version):
        d = dump_encodings(Encodings(activations={te.name: te}), version)
        return d["activation_encodings"][te.name][0]["offset"] if version == "0.6.1" else \
            d["activation_encodings"][0]["offset"]

    strict = TensorEncoding.create("t", 0.1, 0, 8, True, strict=True)
    unsigned = TensorEncoding.create("t", 0.1, 0, 8, True, unsigned=True)
    asym = TensorEncoding.create("t", 0.1, -37, 8, False)
    sym4 = TensorEncoding.create("t", 0.1, 0, 4, True)
    assert written(strict, "0.6.1") == -127 and written(strict, "1.0.0") == [-127]
    assert written(unsigned, "0.6.1") == 0 and written(unsigned, "1.0.0") == [0]
    assert written(asym, "0.6.1") == -37 and written(asym, "1.0.0") == [-37]
    assert written(sym4, "0.6.1") == -8
    # 2.0.0 zero point is -offset: positive for AIMET's usual negative asymmetric offsets.
    d2 = dump_encodings(Encodings(activations={"t": asym}), "2.0.0")["encodings"][0]
    assert d2 == {"name": "t", "output_dtype": "uint8", "y_scale": pytest.approx(0.1), "y_zero_point": 37}


def test_read_aimet_061_file(tmp_path):
    """A file as AIMET writes it (strings for booleans, float offsets, per-channel lists, quantizer_args)."""
    data = {
        "version": "0.6.1",
        "activation_encodings": {
            "x": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 2.6086959838867188,
                   "min": -2.109158515930176, "offset": -114.0, "scale": 0.018501389771699905}],
        },
        "param_encodings": {
            "w": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 0.127 * (i + 1), "min": -0.128 * (i + 1),
                   "offset": -128, "scale": 0.001 * (i + 1)} for i in range(4)],
        },
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": "True", "param_bitwidth": 8,
                           "per_channel_quantization": "True", "quant_scheme": "post_training_tf_enhanced"},
    }
    p = tmp_path / "a.encodings"
    p.write_text(json.dumps(data))
    enc = read_encodings(p)
    x, w = enc.activations["x"], enc.params["w"]
    assert (x.qmin, x.qmax, int(x.offset), x.symmetric) == (0, 255, -114, False)
    assert np.float32(x.scale) == np.float32(0.018501389771699905)
    assert (w.qmin, w.qmax, w.symmetric, w.per_channel, w.channel_axis) == (-128, 127, True, True, None)
    assert w.offset.tolist() == [0, 0, 0, 0]
    assert enc.quantizer_args["quant_scheme"] == "post_training_tf_enhanced"
    # Axis resolved from the graph: Conv weight -> 0.
    validate(enc, _model())


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0"])
def test_round_trip_exact(tmp_path, version):
    enc = _encodings()
    p = tmp_path / f"e_{version}.encodings"
    write_encodings(enc, p, version)
    back = read_encodings(p)
    assert back.version == version
    assert back.same_as(_with_axis_none(enc)), (back.activations, back.params)
    # Writing what was read gives the same file.
    p2 = tmp_path / "again.encodings"
    write_encodings(back, p2, version)
    assert json.loads(p.read_text()) == json.loads(p2.read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask  # written through a temp file, mode as open() gives


def _with_axis_none(enc: Encodings) -> Encodings:
    """0.6.1 and 1.0.0 do not store the channel axis: what a reader gets back."""
    out = Encodings(dict(enc.activations), dict(enc.params), enc.version, enc.excluded_layers, enc.quantizer_args)
    for section in (out.activations, out.params):
        for k, te in section.items():
            section[k] = te.with_axis(None)
    return out


def test_round_trip_200(tmp_path):
    """2.0.0 stores the axis but not symmetric-ness of uint grids nor strictness, and no float encodings."""
    model = _model()
    enc = Encodings(version="2.0.0")
    enc.add_activation(TensorEncoding.create("x", 0.0185, -114, 8, False))
    enc.add_activation(TensorEncoding.create("c", 0.02, 0, 8, True))
    enc.add_activation(TensorEncoding.create("y", 0.01, 0, 16, False))
    enc.add_param(TensorEncoding.create("w", [0.01, 0.02, 0.03, 0.04], 0, 8, True))  # axis from the model
    enc.add_param(TensorEncoding.create("wf", 0.005, 0, 4, True))
    p = tmp_path / "e.encodings"
    write_encodings(enc, p, "2.0.0", model=model)
    raw = json.loads(p.read_text())
    assert raw["version"] == "2.0.0" and "activation_encodings" not in raw
    by_name = {e["name"]: e for e in raw["encodings"]}
    assert by_name["w"] == {"name": "w", "output_dtype": "int8", "axis": 0,
                            "y_scale": [float(np.float32(v)) for v in (0.01, 0.02, 0.03, 0.04)]}
    assert by_name["x"]["y_zero_point"] == 114 and by_name["x"]["output_dtype"] == "uint8"
    assert by_name["y"]["output_dtype"] == "uint16" and "y_zero_point" not in by_name["y"]
    assert by_name["wf"]["output_dtype"] == "int4"

    no_model = read_encodings(p)
    assert set(no_model.activations) == {"x", "c", "y", "w", "wf"} and not no_model.params
    back = read_encodings(p, model)
    assert set(back.params) == {"w", "wf"}
    expected = Encodings(enc.activations, {"w": enc.params["w"].with_axis(0), "wf": enc.params["wf"]})
    assert back.same_as(expected)


def test_200_lossy_grids_keep_numerics():
    """Unsigned symmetric reads back as asymmetric offset 0, strict as the full signed grid: documented losses."""
    unsigned = TensorEncoding.create("u", 0.1, 0, 8, True, unsigned=True)
    strict = TensorEncoding.create("s", 0.1, 0, 8, True, strict=True)
    with pytest.warns(UserWarning, match="strict"):
        d = dump_encodings(Encodings(activations={"u": unsigned, "s": strict}), "2.0.0")
    back = load_encodings(d)
    u, s = back.activations["u"], back.activations["s"]
    assert (u.qmin, u.qmax, int(u.offset), u.symmetric) == (0, 255, 0, False)
    assert (s.qmin, s.qmax, int(s.offset), s.symmetric) == (-128, 127, 0, True)


def test_200_signed_asymmetric_becomes_unsigned():
    """An int8 entry with a zero point is the same grid shifted onto uint8: offset -zp - 128."""
    back = load_encodings({"version": "2.0.0", "encodings": [
        {"name": "t", "output_dtype": "int8", "y_scale": 0.5, "y_zero_point": -10}]})
    t = back.activations["t"]
    assert (t.qmin, t.qmax, int(t.offset), t.symmetric) == (0, 255, 10 - 128, False)
    x = np.array([-5.0, 0.0, 3.0], np.float32)
    # int8 grid: q = round(x/0.5) - 10 ... dequant (q + 10) * 0.5; uint8: same values.
    np.testing.assert_array_equal(t.dequantize(t.quantize(x)), x)


@pytest.mark.parametrize("version", VERSIONS)
def test_float_encoding(version, tmp_path):
    enc = Encodings(activations={"z": TensorEncoding.float_encoding("z", 16)})
    p = tmp_path / "f.encodings"
    if version == "2.0.0":
        with pytest.warns(UserWarning):
            write_encodings(enc, p, version)
        assert json.loads(p.read_text())["encodings"] == []
        return
    write_encodings(enc, p, version)
    back = read_encodings(p)
    assert back.activations["z"].is_float and back.activations["z"].bitwidth == 16


def test_unknown_top_level_keys_preserved(tmp_path):
    data = {"version": "1.0.0", "producer": {"package": "aimet-torch", "version": "2.0"},
            "activation_encodings": [], "param_encodings": [], "excluded_layers": []}
    enc = load_encodings(data)
    p = tmp_path / "p.encodings"
    write_encodings(enc, p)
    assert json.loads(p.read_text())["producer"] == {"package": "aimet-torch", "version": "2.0"}


@pytest.mark.parametrize("bad, match", [
    ({"version": "0.5.0"}, "not supported"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "t", "dtype": "INT", "bw": 8, "enc_type": "PER_BLOCK",
                                                    "is_sym": True, "scale": [1.0], "offset": [-128]}]}, "t: enc_type"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "t", "dtype": "INT", "bw": 8, "enc_type": "PER_TENSOR",
                                                    "is_sym": True, "scale": [1.0], "offset": [-5]}]}, "t: symmetric"),
    ({"version": "0.6.1", "param_encodings": {"t": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "maybe",
                                                     "scale": 1.0, "offset": 0}]}}, "t: is_symmetric"),
    ({"version": "2.0.0", "encodings": [{"name": "t", "output_dtype": "int4", "y_scale": [[1.0]], "axis": 1,
                                         "block_size": 32}]}, "t: 'block_size'"),
    ({"version": "0.6.1", "activation_encodings": {"layer": {"output": {"0": {}}}}}, "torch.encodings"),
])
def test_read_errors_name_the_tensor(bad, match):
    with pytest.raises(EncodingsError, match=match):
        load_encodings(bad)


def test_read_not_json(tmp_path):
    p = tmp_path / "x.encodings"
    p.write_text("{not json")
    with pytest.raises(EncodingsError, match="not valid JSON"):
        read_encodings(p)


def _validate_error(enc: Encodings) -> EncodingsError:
    with pytest.raises(EncodingsError) as info:
        validate(enc, _model())
    return info.value


def test_validate_ok():
    validate(_encodings(), _model())


@pytest.mark.parametrize("case, tensor, match", [
    ("missing", "ghost", "not found"),
    ("channels", "w", "5 channels but the tensor has 4 on axis 0"),
    ("bitwidth", "x", "bitwidth 1 out of range"),
    ("scale_zero", "x", "scale must be finite and > 0"),
    ("scale_nan", "x", "scale must be finite and > 0"),
    ("offset", "x", "outside the grid"),
    ("not_param", "y", "not an initializer"),
])
def test_validate_names_first_bad_tensor(case, tensor, match):
    enc = _encodings()
    if case == "missing":
        enc.add_activation(TensorEncoding.create("ghost", 0.1, 0, 8, False))
    elif case == "channels":
        enc.add_param(TensorEncoding.create("w", [0.1] * 5, 0, 8, True))
    elif case == "bitwidth":
        enc.activations["x"] = TensorEncoding("x", 1, False, np.float32(0.1), 0, 0, 1)
    elif case == "scale_zero":
        enc.activations["x"] = TensorEncoding.create("x", 0.0, -3, 8, False)
    elif case == "scale_nan":
        enc.activations["x"] = TensorEncoding.create("x", float("nan"), -3, 8, False)
    elif case == "offset":
        enc.activations["x"] = TensorEncoding.create("x", 0.1, 3, 8, False)  # zero point -3 < 0
    elif case == "not_param":
        enc.params["y"] = enc.activations.pop("y")
    err = _validate_error(enc)
    assert err.tensor == tensor
    assert str(err).startswith(tensor + ":") and match in str(err)


def test_validate_accepts_paths(tmp_path):
    m = tmp_path / "m.onnx"
    onnx.save(_model(), m)
    validate(_encodings(), str(m))


def test_quantize_array_reciprocal_and_ties():
    """q = clamp(rint(x * float32(1/scale)) - offset): ties to even, float32 reciprocal multiply."""
    q = quantize_array(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0], np.float32), 1.0, 0, -128, 127)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    rng = np.random.default_rng(0)
    scale = np.float32(0.0123)
    x = (rng.integers(-20000, 20000, 200000).astype(np.float32) * np.float32(0.5) * scale).astype(np.float32)
    inv = np.float32(1) / scale
    by_recip = np.clip(np.rint(x * inv), -128, 127)
    by_div = np.clip(np.rint(x / scale), -128, 127)
    assert np.any(by_recip != by_div), "the sample must contain ties where the two roundings differ"
    np.testing.assert_array_equal(quantize_array(x, scale, 0, -128, 127), by_recip.astype(np.int64))
    # Per-channel along axis 1 with offsets.
    w = rng.standard_normal((3, 4)).astype(np.float32)
    s = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    o = np.array([-3, 0, 2, -1])
    ref = np.clip(np.rint(w * (np.float32(1) / s)[None]) - o[None], 0, 255)
    np.testing.assert_array_equal(quantize_array(w, s, o, 0, 255, axis=1), ref)


def test_dequantize_convention():
    te = TensorEncoding.create("t", 0.25, -10, 8, False)
    np.testing.assert_array_equal(te.dequantize(np.array([0, 10, 255])), np.array([-2.5, 0.0, 61.25], np.float32))
    assert te.zero_point == 10
    assert float(te.min) == -2.5 and float(te.max) == 61.25


def _listing(d):
    return sorted(os.listdir(d))


def test_write_unwritable_parent_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    before = _listing(tmp_path)
    with pytest.raises(OSError):
        write_encodings(_encodings(), f / "out.encodings", "1.0.0")
    assert _listing(tmp_path) == before


def test_write_missing_directory(tmp_path):
    with pytest.raises(OSError):
        write_encodings(_encodings(), tmp_path / "nope" / "out.encodings", "1.0.0")
    assert _listing(tmp_path) == []


def test_write_onto_directory_leaves_nothing(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    before = _listing(tmp_path)
    with pytest.raises(OSError):
        write_encodings(_encodings(), target, "0.6.1")
    assert _listing(tmp_path) == before and _listing(target) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / "e.encodings"
    write_encodings(_encodings(), p, "1.0.0")
    old = p.read_bytes()
    bad = _encodings()
    bad.add_param(TensorEncoding.create("v", [0.1, 0.2], 0, 8, True))  # per-channel, no axis, no model
    with pytest.raises(EncodingsError, match="v: per-channel"):
        write_encodings(bad, p, "2.0.0")
    assert p.read_bytes() == old and _listing(tmp_path) == ["e.encodings"]


def test_unknown_version_write(tmp_path):
    with pytest.raises(EncodingsError, match="cannot write"):
        write_encodings(_encodings(), tmp_path / "e", "3.0.0")
