"""quantsim-export CLI: --help of each sub-command, exit codes, and an end-to-end validate -> qdq -> run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import Encodings, TensorEncoding, write_encodings
from export.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=120):
    """Run the CLI as a separate process, as a user would (python -m export.cli == the console script)."""
    return subprocess.run([sys.executable, "-m", "export.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _pair(tmp_path, version="1.0.0"):
    """A small AIMET-style pair: x -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y, with encodings."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(6) * 0.1).astype(np.float32)
    wf = (rng.standard_normal((4, 6)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["/conv/Conv_output_0"], name="/conv/Conv",
                              pads=[1] * 4),
             helper.make_node("Relu", ["/conv/Conv_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
             helper.make_node("GlobalAveragePool", ["/relu/Relu_output_0"], ["/pool/GAP_output_0"], name="/pool/GAP"),
             helper.make_node("Flatten", ["/pool/GAP_output_0"], ["/flat/Flatten_output_0"], name="/flat/Flatten"),
             helper.make_node("Gemm", ["/flat/Flatten_output_0", "fc.weight"], ["output"], name="/fc/Gemm", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4])],
                          [numpy_helper.from_array(w, "conv.weight"), numpy_helper.from_array(b, "conv.bias"),
                           numpy_helper.from_array(wf, "fc.weight")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    enc = Encodings()
    enc.add_activation(TensorEncoding.create("input", 6 / 255, -128, 8, False))
    enc.add_activation(TensorEncoding.create("/relu/Relu_output_0", 3 / 255, 0, 8, False))
    enc.add_activation(TensorEncoding.create("/pool/GAP_output_0", 1 / 255, 0, 8, False))
    enc.add_activation(TensorEncoding.create("output", 4 / 255, -128, 8, False))
    enc.add_param(TensorEncoding.create("conv.weight", np.abs(w).reshape(6, -1).max(1) / 127, 0, 8, True))
    enc.add_param(TensorEncoding.create("fc.weight", np.abs(wf).max(1) / 127, 0, 8, True))
    mpath, epath = tmp_path / "model.onnx", tmp_path / "model.encodings"
    onnx.save(model, mpath)
    write_encodings(enc, epath, version, model=model)
    return mpath, epath


@pytest.mark.parametrize("command", ["validate", "qdq", "run"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: quantsim-export {command}")
    assert "MODEL.onnx" in out


def test_top_level_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "{validate,qdq,run}" in proc.stdout


def test_end_to_end(tmp_path):
    mpath, epath = _pair(tmp_path, "0.6.1")
    out = tmp_path / "model_qdq.onnx"
    proc = _cli("validate", mpath, epath)
    assert proc.returncode == 0, proc.stderr
    assert "4 activation and 2 param encodings (version 0.6.1)" in proc.stdout
    proc = _cli("qdq", mpath, epath, "-o", out, "--report")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["total"] == 2 and report["integer"] == 2
    assert out.exists()
    inputs = tmp_path / "in.npz"
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(inputs, input=x[:2])
    proc = _cli("run", out, "--threads", 2, "--batch", 2, "--report", "--repeat", 2, "--save", tmp_path / "o.npz")
    assert proc.returncode == 0, proc.stderr
    assert "output output: shape [2, 4]" in proc.stdout and '"integer": 2' in proc.stdout
    proc = _cli("run", out, "--input", inputs)
    assert proc.returncode == 0, proc.stderr


def test_run_in_process_matches_saved(tmp_path, capsys):
    mpath, epath = _pair(tmp_path)
    out = tmp_path / "q.onnx"
    assert main(["qdq", str(mpath), str(epath), "-o", str(out)]) == 0
    assert main(["run", str(out), "--batch", "2", "--save", str(tmp_path / "o.npz")]) == 0
    saved = np.load(tmp_path / "o.npz")["output"]
    assert saved.shape == (2, 4) and np.isfinite(saved).all()


def test_validate_failure_names_tensor(tmp_path):
    mpath, epath = _pair(tmp_path)
    data = json.loads(epath.read_text())
    data["param_encodings"][0]["scale"] = data["param_encodings"][0]["scale"][:5]
    data["param_encodings"][0]["offset"] = data["param_encodings"][0]["offset"][:5]
    epath.write_text(json.dumps(data))
    proc = _cli("validate", mpath, epath)
    assert proc.returncode == 1
    assert "conv.weight: 5 channels but the tensor has 6" in proc.stderr


def test_qdq_failure_leaves_no_output(tmp_path, capsys):
    mpath, epath = _pair(tmp_path, "2.0.0")
    data = json.loads(epath.read_text())
    data["encodings"] = [e for e in data["encodings"] if e["name"] != "fc.weight"]
    epath.write_text(json.dumps(data))
    out = tmp_path / "q.onnx"
    assert main(["qdq", str(mpath), str(epath), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fc.weight" in err and "/fc/Gemm" in err
    assert not out.exists()


def test_console_script_if_installed(tmp_path):
    beside_python = os.path.join(os.path.dirname(sys.executable), "quantsim-export")  # a venv's bin/, not on PATH
    exe = beside_python if os.path.exists(beside_python) else shutil.which("quantsim-export")
    if exe is None:
        pytest.skip("package not installed (pip install -e .) in this environment")
    proc = subprocess.run([exe, "qdq", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: quantsim-export qdq" in proc.stdout
