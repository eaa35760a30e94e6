"""Benchmark suite entry point: `python -m benchmarks [suite ...] [--quick] [--json F] [--markdown F] [--page]`,
and `python -m benchmarks report [--from F]` to render docs/performance.md from a saved run."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time

from .common import cpu_snapshot, machine_info, others_cpu_share, save_results

#: sub-command -> module in this package exposing run(quick: bool) -> list[Table] ("module:function" for another name)
SUITES = {
    "calibration": "calibration",
    "ort": "ort",
    "fidelity": "ort:run_fidelity",
    "qat": "qat",
    "accuracy": "bn_reestimation",
    "distributed": "distributed",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure quantsim against the float model and peers in the same run (ratios of medians). "
                    "`python -m benchmarks report --help` renders the Performance page from a saved run.",
    )
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"which suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI runs this so the suite cannot rot)")
    parser.add_argument("--json", help="write the tables and machine info as JSON to this file")
    parser.add_argument("--markdown", help="write the tables as markdown to this file")
    parser.add_argument("--page", action="store_true",
                        help="after a full run of every suite, save it to benchmarks/results.json (unless --json "
                             "says where) and regenerate docs/performance.md and its plots from it")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.page and (args.quick or args.suites):
        parser.error("--page renders the Performance page from a full run: drop --quick and the suite names")
    if args.page and not args.json:
        from .report import DEFAULT_RESULTS

        args.json = DEFAULT_RESULTS
    info = machine_info()
    print(f"machine: {info['cpu']} | {info['cores']} cores | torch {info['torch']} | threads {info['torch_threads']}"
          f" | load {info.get('load_avg_1min', '?')}")
    tables, seconds = [], {}
    start, snapshot = time.perf_counter(), cpu_snapshot()
    for suite in args.suites or list(SUITES):
        modname, _, fn = SUITES[suite].partition(":")
        module = importlib.import_module(f".{modname}", __package__)
        t0 = time.perf_counter()
        for table in getattr(module, fn or "run")(quick=args.quick):
            print()
            print(table.text())
            tables.append(table)
        seconds[suite] = round(time.perf_counter() - t0, 1)
    total = round(time.perf_counter() - start, 1)
    others = others_cpu_share(snapshot, cpu_snapshot())
    print(f"\nwall time {total} s: " + ", ".join(f"{k} {v} s" for k, v in seconds.items())
          + ("" if others is None else f"; other processes used {others:.0%} of the machine's CPU meanwhile"))
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    meta = {"quick": args.quick, "suite_seconds": seconds, "total_seconds": total, "machine_at_start": info,
            "others_cpu_share": None if others is None else round(others, 3)}
    save_results(tables, args.json, args.markdown, command.strip(), meta)
    if args.page:
        from . import report

        return report.main(["--from", args.json])
    return 0


if __name__ == "__main__":
    sys.exit(main())
