"""Render docs/performance.md (and its plots) from a saved benchmark run: `python -m benchmarks report [--from F]`.

The page shows the machine and command of the run, where each target stands, two plots (when matplotlib is
installed: per-layer SQNR, latency bars) and every table of the run. `python -m benchmarks --page` runs the full
suite and then this.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from quantsim.utils import atomic_write

from .common import Table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = str(ROOT / "benchmarks" / "results.json")
DEFAULT_PAGE = str(ROOT / "docs" / "performance.md")
SQNR_PNG = "performance_sqnr.png"
LATENCY_PNG = "performance_latency.png"
REGENERATE = "python -m benchmarks --page"
RERENDER = "python -m benchmarks report"
#: other processes used more than this fraction of the machine's CPU during the run: call the machine loaded
LOADED_SHARE = 0.2
#: without that measurement (no /proc/stat): 1-minute load average at the start above this fraction of the cores
LOADED_FRACTION = 0.5


# ------------------------------------------------------------------------------------------------ targets
def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _status(oks: list[bool]) -> str:
    if not oks:
        return "not measured"
    if all(oks):
        return "met"
    return "not met" if not any(oks) else f"partly ({sum(oks)}/{len(oks)})"


def _per_model(table: Table, select: dict, value: str, limit: float, fmt: str = "{:.2f}x") -> tuple[str, str]:
    """Rows matching `select` (header -> value): '<model> <value>' each, and whether all are <= limit."""
    rows = [r for r in table.rows if all(r[table.headers.index(h)] == v for h, v in select.items())]
    vals = [(r[table.headers.index("model")], _num(r[table.headers.index(value)])) for r in rows]
    stands = ", ".join(f"{m} {fmt.format(v)}" if v is not None else f"{m} n/a" for m, v in vals)
    return stands or "-", _status([v is not None and v <= limit for _, v in vals])


def _targets(tables: dict[str, Table]) -> list[tuple[str, str, str]]:
    """(target, where it stands, status) for every target of the benchmark issue, from the run's tables."""
    out = []
    cal = tables.get("calibration")
    if cal:
        for scheme, limit in (("min_max", 1.3), ("tf_enhanced", 2.0), ("percentile", 2.0), ("mse", 2.0)):
            out.append((f"{scheme} calibration <= {limit:g}x float forward",
                        *_per_model(cal, {"scheme": scheme}, "ratio", limit)))
    qat = tables.get("qat")
    if qat:
        out.append(("QAT step <= 1.4x float step", *_per_model(qat, {"candidate": "sim"}, "step ratio", 1.4)))
        ours = {r[0]: _num(r[2]) for r in qat.rows if r[1] == "sim"}
        theirs = {r[0]: _num(r[2]) for r in qat.rows if r[1] == "torch.ao"}
        pairs = [(m, ours[m], theirs.get(m)) for m in ours]
        stands = ", ".join(f"{m} {o:.2f}x vs {t:.2f}x" if o is not None and t is not None else f"{m} n/a"
                           for m, o, t in pairs)
        out.append(("QAT step faster than PyTorch's QAT (torch.ao prepare_qat_fx)", stands,
                    _status([o is not None and t is not None and o < t for _, o, t in pairs])))
        out.append(("QAT peak memory <= 1.3x float",
                    *_per_model(qat, {"candidate": "sim"}, "peak mem ratio", 1.3)))
    lat = tables.get("ort_latency")
    if lat:
        def speedups(column: str) -> dict[str, list[float]]:
            out: dict[str, list[float]] = {}
            for model, v in zip(lat.column("model"), map(_num, lat.column(column))):
                if v:
                    out.setdefault(model, []).append(1 / v)
            return out

        ours, peer = speedups("ours int8"), speedups("ORT U8S8 per-channel")
        stands = "; ".join(f"{m} {min(v):.2f}x to {max(v):.2f}x faster (onnxruntime's U8S8 per-channel: "
                           f"{min(peer.get(m, [0])):.2f}x to {max(peer.get(m, [0])):.2f}x)" for m, v in ours.items())
        out.append(("onnxruntime int8 >= 3x faster than fp32 (every model, batch, thread count)", stands or "-",
                    _status([x >= 3 for v in ours.values() for x in v])))
        rel = [v for v in map(_num, lat.column("ours / ORT default")) if v]
        out.append(("onnxruntime int8 faster than onnxruntime's own quantize_static default output",
                    f"ours takes {min(rel):.2f}x to {max(rel):.2f}x of its time over {len(rel)} configurations"
                    if rel else "-", _status([v < 1 for v in rel])))
    fid = tables.get("fidelity")
    if fid:
        e2e = [(r[0], _num(r[2])) for r in fid.rows]
        layer = [(r[0], _num(r[6])) for r in fid.rows]
        stands = ("end to end: " + ", ".join(f"{m} {v:.2%}" for m, v in e2e if v is not None)
                  + "; per layer: " + ", ".join(f"{m} {v:.2%}" for m, v in layer if v is not None))
        out.append(("sim vs onnxruntime within 1 LSB on >= 99.9 % of elements", stands,
                    _status([v is not None and v >= 0.999 for _, v in e2e + layer])))
        if "emulated e2e exact" in fid.headers:
            i, j = fid.headers.index("emulated e2e exact"), fid.headers.index("emulated per-layer exact")
            emu = [(r[0], _num(r[i])) for r in fid.rows] + [(r[0], _num(r[j])) for r in fid.rows]
            stands = ", ".join(f"{r[0]} {_num(r[i]):.2%} end to end, {_num(r[j]):.4%} per layer" for r in fid.rows
                               if _num(r[i]) is not None)
            out.append(("sim inside emulate_onnxruntime() equals onnxruntime bit for bit", stands or "-",
                        _status([v is not None and v >= 0.999 for _, v in emu])))
    return out


# -------------------------------------------------------------------------------------------------- plots
def _plot_sqnr(table: Table, path: str) -> None:
    import matplotlib.pyplot as plt

    layers = table.column("layer")
    fig, ax = plt.subplots(figsize=(10, 4), layout="constrained")
    for header in table.headers[1:]:
        ax.plot(range(len(layers)), [_num(v) for v in table.column(header)], marker="o", ms=3,
                label=header.replace("SQNR ", ""))
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(table.title.split(":")[0], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _plot_latency(table: Table, path: str) -> None:
    import matplotlib.pyplot as plt

    series = ["fp32", "ours int8", "ORT default", "ORT U8S8 per-channel"]
    models = list(dict.fromkeys(table.column("model")))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    width = 0.8 / len(series)
    for ax, model in zip(axes[0], models):
        rows = [r for r in table.rows if r[0] == model]
        for i, s in enumerate(series):
            vals = [1.0 if s == "fp32" else _num(r[table.headers.index(s)]) or 0.0 for r in rows]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))], vals, width, label=s)
        ax.axhline(1 / 3, color="k", ls="--", lw=0.8, label="3x faster than fp32")
        ax.set_xticks(range(len(rows)), [f"batch {r[1]}\n{r[2]} thr" for r in rows], fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("latency / fp32 latency")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(series) + 1,
               fontsize=8)
    _save(fig, path)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _plots(tables: dict[str, Table], static_dir: str) -> tuple[dict[str, str], str | None]:
    """{kind: file name written under static_dir}, or why no plots were made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (`pip install -c constraints.txt matplotlib`)"
    os.makedirs(static_dir, exist_ok=True)
    made = {}
    if "sqnr" in tables:
        _plot_sqnr(tables["sqnr"], os.path.join(static_dir, SQNR_PNG))
        made["sqnr"] = SQNR_PNG
    if "ort_latency" in tables:
        _plot_latency(tables["ort_latency"], os.path.join(static_dir, LATENCY_PNG))
        made["latency"] = LATENCY_PNG
    return made, None


# --------------------------------------------------------------------------------------------------- page
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render(results: dict, plots: dict[str, str], static_rel: str, plot_note: str | None = None) -> str:
    """The Performance page (MyST markdown) for a loaded results.json."""
    tables = [Table.from_dict(t) for t in results["tables"]]
    by_key = {t.key: t for t in tables if t.key}
    m = results["machine"]
    start = results.get("machine_at_start", m)
    load = start.get("load_avg_1min")
    others = results.get("others_cpu_share")
    if others is not None:
        loaded = others > LOADED_SHARE
        load_line = (f"- Other processes used {others:.0%} of the machine's CPU while this ran (from /proc/stat: all "
                     "busy time minus this run's own)")
    else:
        loaded = load is not None and load > LOADED_FRACTION * (m.get("cores") or 1)
        load_line = f"- Load average (1 min) at the start: {load:.2f}" if load is not None else None
    if load_line:
        load_line += (". **The machine was loaded**: ratios measured side by side still hold, absolute times are "
                      "inflated and noisier." if loaded else ": the machine was otherwise idle.")
    lines = ["# Performance", ""]
    if results.get("quick"):
        lines += ["```{warning}", "This page was generated from a `--quick` run: tiny inputs and one or two "
                  "repeats, which only check that the suite runs. Its numbers mean nothing.", "```", ""]
    lines += [
        "Every number on this page comes from one run of the benchmark suite (`benchmarks/`). Each comparison runs "
        "its candidates interleaved in the same process and reports medians of repeats and ratios against a "
        "baseline measured in the same run, because absolute times on a shared machine mean little.",
        "",
        "## The run",
        "",
        f"- Command: `{results['command']}`"
        + (f" (wall time {results['total_seconds'] / 60:.1f} min)" if "total_seconds" in results else ""),
        f"- Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}"
        + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; torch threads {m['torch_threads']}",
    ]
    if load_line:
        lines.append(load_line)
    took = f"; the run above took {results['total_seconds'] / 60:.0f} min" if "total_seconds" in results else ""
    lines += [
        f"- Regenerate this page: `{REGENERATE}` (the full suite{took}; writes `benchmarks/results.json`, this page "
        f"and its plots). Re-render from the saved results without measuring again: `{RERENDER}`.",
        "",
        "## Targets",
        "",
        "| target | where it stands | status |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(t)} | {_cell(s)} | {st} |" for t, s, st in _targets(by_key)]
    lines += ["", "Details of each measurement are in the tables below.", ""]
    if plots or plot_note:
        lines += ["## Plots", ""]
        if "latency" in plots:
            lines += ["onnxruntime latency relative to the fp32 ONNX model (lower is faster; dashed: the 3x target), "
                      "for our int8 export and onnxruntime's own `quantize_static` outputs:", "",
                      f"![latency bars]({static_rel}/{plots['latency']})", ""]
        if "sqnr" in plots:
            lines += ["Per-layer SQNR of the quantized model against its float activations (higher is closer):", "",
                      f"![per-layer SQNR]({static_rel}/{plots['sqnr']})", ""]
        if plot_note:
            lines += [plot_note, ""]
    lines += ["## Tables", ""]
    for t in tables:
        lines += [t.markdown()]
    if "suite_seconds" in results:
        lines += ["Wall time per suite: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["suite_seconds"].items())
                  + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_page(results_path: str, page_path: str, static_dir: str | None = None) -> list[str]:
    """Render `results_path` into `page_path` (+ PNGs in static_dir, default <page dir>/_static); paths written."""
    try:
        with open(results_path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no benchmark results at {results_path}: run `{REGENERATE}` (or `python -m "
                                "benchmarks --json FILE`) first") from None
    if "tables" not in results or "machine" not in results:
        raise ValueError(f"{results_path} is not a results file of `python -m benchmarks --json` (no tables/machine)")
    page_dir = os.path.dirname(os.path.abspath(page_path))
    static_dir = static_dir or os.path.join(page_dir, "_static")
    tables = {t["key"]: Table.from_dict(t) for t in results["tables"] if t.get("key")}
    plots, note = _plots(tables, static_dir)
    static_rel = os.path.relpath(os.path.abspath(static_dir), page_dir).replace(os.sep, "/")
    text = render(results, plots, static_rel, note)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(page_path, write)
    return [page_path] + [os.path.join(static_dir, p) for p in plots.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report",
                                     description="Render the Performance page and its plots from a saved run.")
    parser.add_argument("--from", dest="results", default=DEFAULT_RESULTS,
                        help="results JSON of `python -m benchmarks --json` (default: benchmarks/results.json)")
    parser.add_argument("--out", default=DEFAULT_PAGE, help="page to write (default: docs/performance.md)")
    parser.add_argument("--static-dir", help="where the PNGs go (default: _static beside the page)")
    args = parser.parse_args(argv)
    for path in write_page(args.results, args.out, args.static_dir):
        print(f"wrote {path}")
    return 0
