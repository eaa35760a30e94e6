"""Backend config loading: presets, AIMET's own files unchanged, normalisation, and every error class."""
import json
import warnings
from pathlib import Path

import pytest

from quantsim.config import (PRESETS, BackendConfig, ConfigError, ConfigWarning, Kernel, OpTypeConfig, ParamConfig,
                             load_config, parse_config)

AIMET_DIR = Path(__file__).parent / "data" / "aimet_configs"
AIMET_FILES = sorted(AIMET_DIR.glob("*.json"))


def minimal(**sections):
    base = {"defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True"}},
            "params": {}, "op_type": {}, "supergroups": [], "model_input": {}, "model_output": {}}
    base.update(sections)
    return base


def error(config) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return info.value


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_round_trip(name):
    cfg = load_config(name)
    assert isinstance(cfg, BackendConfig)
    assert cfg.defaults.is_output_quantized and cfg.defaults.param_is_quantized
    assert not cfg.defaults.is_symmetric and cfg.defaults.param_is_symmetric  # asym activations, sym weights
    assert cfg.params["bias"] == ParamConfig(is_quantized=False)
    assert cfg.model_input_quantized is True
    assert load_config(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(load_config(cfg.to_dict()))


def test_preset_contents():
    default, per_tensor, ort = (load_config(n) for n in ("default", "per_tensor", "onnxruntime_cpu"))
    assert default.defaults.per_channel_quantization and not per_tensor.defaults.per_channel_quantization
    assert default.op_type["Gemm"].per_channel_quantization is False  # as AIMET's default_config_per_channel.json
    assert ("Conv", "Relu") in default.supergroups and ("Gemm", "Relu") in per_tensor.supergroups
    assert ort.defaults.per_channel_quantization and not ort.defaults.strict_symmetric
    assert "Gemm" not in ort.op_type  # ORT: Linear weights per channel too
    for first in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add"):
        for act in ("Relu", "Clip"):
            assert (first, act) in ort.supergroups
    # ORT's QLinearSoftmax output: scale 1/256, zero point 0 on uint8 -> range [0, 255/256]
    assert ort.op_type["Softmax"].encoding_constraints == (0.0, 255 / 256)


def test_none_is_default_and_config_passes_through():
    cfg = load_config(None)
    assert cfg == load_config("default")
    assert load_config(cfg) is cfg


def test_preset_files_are_aimet_format():
    """Presets use AIMET's string booleans and only keys AIMET's schema knows, so AIMET can load them too."""
    for name, file in PRESETS.items():
        data = json.loads((Path(load_config.__code__.co_filename).parent / "presets" / file).read_text())
        assert set(data) == {"defaults", "params", "op_type", "supergroups", "model_input", "model_output"}

        def strings_only(v):
            if isinstance(v, dict):
                return all(strings_only(x) for x in v.values())
            if isinstance(v, list):
                return all(strings_only(x) for x in v)
            return not isinstance(v, bool)

        assert strings_only(data), name


# ----------------------------------------------------------------------------- AIMET's own files


@pytest.mark.parametrize("path", AIMET_FILES, ids=[p.name for p in AIMET_FILES])
def test_aimet_files_load_unchanged(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # AIMET's "LayerNorm" entry (see below)
        cfg = load_config(path)
        assert load_config(str(path)) == cfg
        assert load_config(json.loads(path.read_text())) == cfg
    assert cfg.defaults.is_output_quantized and cfg.defaults.param_is_quantized and cfg.defaults.param_is_symmetric
    assert cfg.params["bias"].is_quantized is False
    assert cfg.model_input_quantized is True and cfg.model_output_quantized is None


def test_aimet_file_values():
    v75 = load_config(AIMET_DIR / "htp_quantsim_config_v75.json")
    assert v75.defaults.hw_version == "V75" and v75.defaults.per_channel_quantization
    assert v75.op_type["Softmax"].encoding_constraints == (0.0, 1.0)
    assert v75.op_type["LayerNormalization"].params["weight"] == ParamConfig(is_symmetric=False)
    assert v75.op_type["GroupNormalization"].params["bias"] == ParamConfig(is_quantized=True)
    assert v75.op_type["Gather"] == OpTypeConfig(is_output_quantized=False, per_channel_quantization=False)
    assert v75.supergroup_pass_list == ("LayerNormalization", "RMSNormalization")
    assert v75.supergroups[1] == ("Conv", "BatchNormalization", "HardSwish")
    v69 = load_config(AIMET_DIR / "htp_quantsim_config_v69.json")
    assert "Softmax" not in v69.op_type and len(v69.supergroups) == 7


def test_aimet_legacy_op_name_warns_but_loads():
    # AIMET's default_config_per_channel.json names "LayerNorm", which no ONNX op is: AIMET ignores it too.
    with pytest.warns(ConfigWarning, match=r"op_type\.LayerNorm: unknown op type 'LayerNorm' \(did you mean "
                                           r"'LayerNormalization'\?\)"):
        cfg = load_config(AIMET_DIR / "default_config_per_channel.json")
    assert cfg.op_type["LayerNorm"].per_channel_quantization is False


def test_backend_aware_layout_loads():
    """AIMET's backend_aware_* files: op_type.defaults carries default kernels; kernels may omit 'param'."""
    cfg = load_config(minimal(op_type={
        "defaults": {"supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "int"},
                                            "param": {"bitwidth": 8, "dtype": "int"}}]},
        "Cast": {"is_output_quantized": "False", "supported_kernels": [
            {"activation": {"bitwidth": 8, "dtype": "int"}}, {"activation": {"bitwidth": 32, "dtype": "float"}},
            {"activation": {"bitwidth": 16, "dtype": "float"}}]},
    }))
    assert cfg.op_type["Cast"].supported_kernels == (Kernel((8, "int")), Kernel((32, "float")), Kernel((16, "float")))
    assert cfg.supported_kernels_for("Cast")[1] == Kernel((32, "float"))
    assert cfg.supported_kernels_for("Conv") == (Kernel((8, "int"), (8, "int")),)  # from op_type.defaults
    assert load_config(minimal()).supported_kernels_for("Conv") is None


# ----------------------------------------------------------------------------- normalisation


def test_string_and_json_booleans_are_equal():
    strings = minimal(defaults={"ops": {"is_output_quantized": "True", "is_symmetric": "False"},
                                "params": {"is_quantized": "True", "is_symmetric": "True"},
                                "strict_symmetric": "False", "unsigned_symmetric": "True",
                                "per_channel_quantization": "True"},
                      params={"bias": {"is_quantized": "False"}},
                      op_type={"Conv": {"is_input_quantized": "True", "params": {"weight": {"is_symmetric": "False"}}}},
                      model_input={"is_input_quantized": "True"}, model_output={"is_output_quantized": "True"})
    booleans = json.loads(json.dumps(strings).replace('"True"', "true").replace('"False"', "false"))
    a, b = load_config(strings), load_config(booleans)
    assert a == b
    assert a.defaults.unsigned_symmetric is True and a.defaults.is_symmetric is False
    assert a.op_type["Conv"].params["weight"].is_symmetric is False
    assert a.model_output_quantized is True


def test_absent_flags_default_to_false_and_sections_are_optional():
    cfg = load_config({})
    d = cfg.defaults
    assert not (d.is_output_quantized or d.param_is_quantized or d.per_channel_quantization or d.strict_symmetric)
    assert cfg.supergroups == () and cfg.model_input_quantized is None


def test_numbers_and_kernels_normalised():
    cfg = load_config(minimal(defaults={"ops": {}, "params": {}, "supported_kernels": [
        {"activation": {"bitwidth": 16.0, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}}]},
        op_type={"Sigmoid": {"encoding_constraints": {"min": 0, "max": 1}}}))
    assert cfg.defaults.supported_kernels == (Kernel((16, "int"), (8, "int")),)
    assert cfg.op_type["Sigmoid"].encoding_constraints == (0.0, 1.0)


# ----------------------------------------------------------------------------- errors


def test_misspelled_key_suggests_the_right_one():
    e = error(minimal(op_type={"Conv": {"is_symetric": "True"}}))
    assert str(e) == "op_type.Conv.is_symetric: unknown key (did you mean 'is_symmetric'?)"
    assert e.path == "op_type.Conv.is_symetric" and isinstance(e, ValueError)
    assert "defaults.ops.is_output_quantised" in str(error(minimal(defaults={"ops": {"is_output_quantised": "True"}})))
    assert "did you mean 'supergroups'" in str(error({"supergroup": []}))
    e = error(minimal(defaults={"ops": {}, "params": {}, "per_channel": "True"}))
    assert "defaults.per_channel: unknown key (did you mean 'per_channel_quantization'?)" in str(e)
    e = error(minimal(model_input={"quantize": "True"}))
    assert str(e).startswith("model_input.quantize: unknown key") and "is_input_quantized" in str(e)


def test_wrong_types():
    e = error(minimal(defaults={"ops": {"is_output_quantized": 3}, "params": {}}))
    assert str(e) == "defaults.ops.is_output_quantized: expected a boolean ('True'/'False' or true/false), got 3"
    assert "got 'true'" in str(error(minimal(params={"bias": {"is_quantized": "true"}})))
    assert str(error(minimal(params={"bias": "False"}))) == "params.bias: expected an object, got 'False'"
    assert str(error(minimal(supergroups={"op_list": ["Conv", "Relu"]}))).startswith("supergroups: expected a list")
    with pytest.raises(ConfigError, match="^expected an object, got a list$"):
        parse_config([])
    e = error(minimal(op_type={"Softmax": {"encoding_constraints": {"min": "0", "max": 1}}}))
    assert str(e).startswith("op_type.Softmax.encoding_constraints.min: expected a finite number")
    assert "op_type.Softmax.encoding_constraints: min must be smaller than max" in str(
        error(minimal(op_type={"Softmax": {"encoding_constraints": {"min": 1, "max": 0}}})))
    assert "missing key 'max'" in str(error(minimal(op_type={"Softmax": {"encoding_constraints": {"min": 0}}})))
    e = error(minimal(defaults={"ops": {}, "params": {}, "hw_version": 75}))
    assert str(e) == "defaults.hw_version: expected a string, got 75"


def test_unknown_supergroup_op():
    e = error(minimal(supergroups=[{"op_list": ["Conv", "Relu"]}, {"op_list": ["Add", "Relu"]},
                                   {"op_list": ["Conv", "Rleu"]}]))
    assert str(e) == "supergroups[2].op_list[1]: unknown op type 'Rleu' (did you mean 'Relu'?)"
    assert "supergroups[0].op_list: a supergroup needs at least 2 ops" in str(
        error(minimal(supergroups=[{"op_list": ["Conv"]}])))
    assert "supergroups[0]: missing key 'op_list'" in str(error(minimal(supergroups=[{}])))


@pytest.mark.parametrize("bw", [0, 33, -8])
def test_bitwidth_out_of_range(bw):
    kernels = [{"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}},
               {"activation": {"bitwidth": 16, "dtype": "int"}, "param": {"bitwidth": bw, "dtype": "int"}}]
    e = error(minimal(op_type={"Conv": {"supported_kernels": kernels}}))
    assert str(e) == f"op_type.Conv.supported_kernels[1].param.bitwidth: bit-width must be in [1, 32], got {bw}"
    e = error(minimal(defaults={"ops": {}, "params": {}, "supported_kernels": [
        {"activation": {"bitwidth": bw, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}}]}))
    assert e.path == "defaults.supported_kernels[0].activation.bitwidth"


def test_kernel_errors():
    k8 = {"bitwidth": 8, "dtype": "int"}
    assert "defaults.supported_kernels[0]: missing key 'param'" in str(
        error(minimal(defaults={"ops": {}, "params": {}, "supported_kernels": [{"activation": k8}]})))
    assert "op_type.Conv.supported_kernels: expected at least one kernel" in str(
        error(minimal(op_type={"Conv": {"supported_kernels": []}})))
    assert "op_type.Conv.supported_kernels[0].activation.dtype: expected 'int' or 'float', got 'fp'" in str(
        error(minimal(op_type={"Conv": {"supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "fp"}}]}})))
    assert "dtype 'float' needs bit-width 16 or 32, got 8" in str(
        error(minimal(op_type={"Conv": {"supported_kernels": [{"activation": {"bitwidth": 8, "dtype": "float"}}]}})))
    assert "bitwidth: expected an integer bit-width, got 8.5" in str(
        error(minimal(op_type={"Conv": {"supported_kernels": [{"activation": {"bitwidth": 8.5, "dtype": "int"}}]}})))


def test_invalid_json_file_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "defaults": {\n    "ops": {"is_output_quantized": "True",}\n  }\n}\n')
    e = error(bad)
    assert "invalid JSON at line 3 column" in str(e) and str(bad) in str(e)


def test_errors_in_files_name_the_file(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(minimal(op_type={"Conv": {"is_symetric": "True"}})))
    e = error(f)
    assert e.path == "op_type.Conv.is_symetric" and str(f) in str(e)


def test_unknown_preset_lists_presets():
    e = error("defualt")
    assert "unknown preset 'defualt'" in str(e) and "did you mean 'default'" in str(e)
    for name in PRESETS:
        assert name in str(e)
    assert "no such config file" in str(error("missing/config.json"))
    with pytest.raises(TypeError):
        load_config(42)


def test_unknown_op_type_name_warns():
    with pytest.warns(ConfigWarning, match=r"op_type\.Rleu: unknown op type 'Rleu' \(did you mean 'Relu'\?\)"):
        cfg = load_config(minimal(op_type={"Rleu": {"is_output_quantized": "False"}}))
    assert "Rleu" in cfg.op_type
