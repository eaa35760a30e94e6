"""Shared benchmark machinery: interleaved repeated timing (medians and ratios), peak tensor memory, tables.

These machines are noisy: every comparison runs its candidates interleaved in one process and reports the
median of repeats and ratios against a baseline measured in the same run, never a lone absolute time.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quantsim.utils import atomic_write


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each callable, run round-robin so machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio_medians(baseline: Callable[[], object], fns: dict[str, Callable[[], object]], repeats: int = 5,
                         warmup: int = 1) -> dict[str, float]:
    """Median over repeats of time(fn) / time(baseline), the baseline timed just before each fn, candidates in an order
    rotated every round. Pairing cancels the drift of a shared machine's speed over seconds, which a ratio of
    separately taken medians keeps (seen here: the same code's ratio moving by 1.0 between runs)."""
    for _ in range(warmup):
        for fn in (baseline, *fns.values()):
            fn()
    names = list(fns)
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            baseline()
            t1 = time.perf_counter()
            fns[k]()
            ratios[k].append((time.perf_counter() - t1) / (t1 - t0))
    return {k: statistics.median(v) for k, v in ratios.items()}


class _PeakTensorMemory(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created by ops (autograd's saved tensors included); results that
    alias an input (views, in-place ops) are not new allocations and are skipped, and so are copy-on-write clones
    (torch._lazy_clone shares memory; asking for its address would make the copy)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        nbytes = st.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes):
            self.live -= nbytes
            self._seen.discard(key)

        weakref.finalize(st, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            if i < len(returns) and returns[i].alias_info is not None:
                continue
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not _is_cow(t):
                self._track(t)
        return out


_is_cow_tensor = getattr(torch._C, "_is_cow_tensor", None)


def _is_cow(t: torch.Tensor) -> bool:
    return bool(_is_cow_tensor is not None and _is_cow_tensor(t))


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated by `fn` on top of what already existed (activations, grads, temps)."""
    mode = _PeakTensorMemory()
    with mode:
        fn()
    return mode.peak


def machine_info() -> dict:
    """What the numbers depend on: CPU, cores, library versions, threads, and the load average right now."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return info


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock s, CPU-seconds the whole machine has been busy (Linux /proc/stat; steal included), CPU-seconds of
    this process and its finished children), or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    t = os.times()
    return (time.perf_counter(), (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"),
            t.user + t.system + t.children_user + t.children_system)


def others_cpu_share(start, end) -> float | None:
    """Fraction of the machine's CPU capacity (all cores) that other processes used between two cpu_snapshot()s:
    a direct measure of how loaded the machine was while the benchmarks ran."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return min(1.0, max(0.0, others / ((end[0] - start[0]) * (os.cpu_count() or 1))))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Table:
    """A titled result table that prints as text and serialises to JSON/markdown."""

    title: str
    headers: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    key: str = ""  # stable name the report looks tables up by (titles change with sizes)
    formats: dict[str, str] = field(default_factory=dict)  # header -> format spec, e.g. ".2%" (default: 3 digits)

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        return cls(d["title"], list(d["headers"]), [list(r) for r in d["rows"]], list(d.get("notes", [])),
                   d.get("key", ""), dict(d.get("formats", {})))

    def add(self, *row) -> None:
        if len(row) != len(self.headers):
            raise ValueError(f"table {self.title!r}: row has {len(row)} cells, headers {len(self.headers)}")
        self.rows.append(list(row))

    def column(self, header: str) -> list:
        return [r[self.headers.index(header)] for r in self.rows]

    def _fmt(self, v, header: str = "") -> str:
        if isinstance(v, float):
            if header in self.formats:
                return format(v, self.formats[header])
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    def _cells(self, row: list) -> list[str]:
        return [self._fmt(v, h) for v, h in zip(row, self.headers)]

    def text(self) -> str:
        cells = [self.headers] + [self._cells(r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "headers": self.headers, "rows": self.rows, "notes": self.notes,
                "formats": self.formats}


def save_results(tables: list[Table], json_path: str | None, md_path: str | None, command: str,
                 meta: dict | None = None) -> None:
    """Write the tables (JSON with machine info, command and `meta`; and/or markdown), each file atomically."""
    info = machine_info()
    if json_path:
        doc = {"machine": info, "command": command, **(meta or {}), "tables": [t.as_dict() for t in tables]}
        _write_text(json_path, json.dumps(doc, indent=2) + "\n")
    if md_path:
        head = f"Command: `{command}`  \nMachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}\n\n"
        _write_text(md_path, head + "\n".join(t.markdown() for t in tables))


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
