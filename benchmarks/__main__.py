"""Benchmark suite entry point: `python -m benchmarks [suite ...] [--quick] [--json F] [--markdown F]`."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .common import machine_info, save_results

#: sub-command -> module in this package exposing run(quick: bool) -> list[Table] ("module:function" for another name)
SUITES = {
    "calibration": "calibration",
    "ort": "ort",
    "fidelity": "ort:run_fidelity",
    "qat": "qat",
    "accuracy": "bn_reestimation",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure quantsim against the float model and peers in the same run (ratios of medians).",
    )
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"which suites to run (default: all): {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI runs this so the suite cannot rot)")
    parser.add_argument("--json", help="write the tables and machine info as JSON to this file")
    parser.add_argument("--markdown", help="write the tables as markdown to this file")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    info = machine_info()
    print(f"machine: {info['cpu']} | {info['cores']} cores | torch {info['torch']} | threads {info['torch_threads']}")
    tables = []
    for suite in args.suites or list(SUITES):
        modname, _, fn = SUITES[suite].partition(":")
        module = importlib.import_module(f".{modname}", __package__)
        for table in getattr(module, fn or "run")(quick=args.quick):
            print()
            print(table.text())
            tables.append(table)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    save_results(tables, args.json, args.markdown, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
