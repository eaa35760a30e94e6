"""quantsim-export: validate encodings against a model, build a QDQ model, run/benchmark a model (torch-free)."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quantsim-export",
        description="Torch-free tools for AIMET encodings and int8 QDQ ONNX models (onnx + onnxruntime only).",
    )
    sub = p.add_subparsers(dest="command", metavar="{validate,qdq,run}")
    sub.required = True

    v = sub.add_parser("validate", help="check that an encodings file fits an ONNX model",
                       description="Read ENC (AIMET 0.6.1, 1.0.0 or 2.0.0) and check every encoding against MODEL: "
                                   "tensor present, bitwidth, grid, scale > 0, offset on the grid, channel count.")
    v.add_argument("model", metavar="MODEL.onnx")
    v.add_argument("encodings", metavar="ENC.encodings")

    q = sub.add_parser("qdq", help="build a QDQ model onnxruntime runs with integer kernels",
                       description="Insert QuantizeLinear/DequantizeLinear from ENC into the float MODEL (weights "
                                   "pre-quantized to int8, bias to int32) and write OUT atomically.")
    q.add_argument("model", metavar="MODEL.onnx")
    q.add_argument("encodings", metavar="ENC.encodings")
    q.add_argument("-o", "--output", required=True, metavar="OUT_qdq.onnx")
    q.add_argument("--int8-activations", action="store_true",
                   help="emit symmetric 8-bit activations as int8 (default: uint8 with zero point 128, same grid)")
    q.add_argument("--allow-16bit", action="store_true", help="emit 16-bit encodings as (u)int16 Q/DQ (opset 21)")
    q.add_argument("--allow-float-op", action="append", default=[], metavar="OP",
                   help="op type allowed to stay float (repeatable)")
    q.add_argument("--report", action="store_true", help="print the integer-kernel report of the result (JSON)")

    r = sub.add_parser("run", help="run a model with onnxruntime (random or given inputs), optionally report kernels",
                       description="Run MODEL on CPU. Without --input, random inputs are made from the model's input "
                                   "shapes, the batch dimension set to --batch.")
    r.add_argument("model", metavar="MODEL.onnx")
    r.add_argument("--threads", type=int, default=1, metavar="N", help="intra-op threads (default 1)")
    r.add_argument("--batch", type=int, default=None, metavar="B",
                   help="batch size of random inputs; with --input, run in chunks of B rows")
    r.add_argument("--input", metavar="FILE.npz", help="inputs as an .npz keyed by input name (or one .npy)")
    r.add_argument("--repeat", type=int, default=1, metavar="R", help="timed repetitions (default 1)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save", metavar="OUT.npz", help="write the outputs to an .npz")
    r.add_argument("--report", action="store_true", help="print which Conv/Gemm/MatMul became integer kernels")
    return p


def _random_inputs(session, batch: int | None, seed: int) -> dict[str, np.ndarray]:
    from .runner import input_specs

    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(session):
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, int) and d > 0:
                dims.append(batch if (i == 0 and batch) else d)
            elif i == 0:
                dims.append(batch or 1)
            else:
                raise SystemExit(f"error: input '{name}' has a free dimension {i} ({d!r}); pass --input")
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[name] = np.zeros(dims, dtype=dtype)
    return feeds


def _load_inputs(path: str) -> dict | np.ndarray:
    data = np.load(path)
    if isinstance(data, np.ndarray):
        return data
    return {k: data[k] for k in data.files}


def _cmd_validate(args) -> int:
    import onnx

    from .encodings import read_encodings, validate

    model = onnx.load(args.model, load_external_data=False)
    enc = read_encodings(args.encodings, model)
    validate(enc, model)
    print(f"OK: {len(enc.activations)} activation and {len(enc.params)} param encodings "
          f"(version {enc.version}) fit {args.model}")
    return 0


def _cmd_qdq(args) -> int:
    from .qdq import QDQOptions, build_qdq_file

    opts = QDQOptions(int8_activations=args.int8_activations, allow_16bit=args.allow_16bit,
                      allow_float_ops=tuple(args.allow_float_op))
    out = build_qdq_file(args.model, args.encodings, args.output, opts)
    counts: dict[str, int] = {}
    for n in out.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print(f"wrote {args.output}: {counts.get('QuantizeLinear', 0)} QuantizeLinear, "
          f"{counts.get('DequantizeLinear', 0)} DequantizeLinear, {len(out.graph.node)} nodes")
    if args.report:
        from .runner import integer_kernel_report

        print(json.dumps(integer_kernel_report(out, int8_activations=args.int8_activations), indent=2))
    return 0


def _cmd_run(args) -> int:
    from .runner import integer_kernel_report, make_session, run

    if args.threads < 1 or (args.batch is not None and args.batch < 1) or args.repeat < 1:
        raise SystemExit("error: --threads, --batch and --repeat must be >= 1")
    sess = make_session(args.model, threads=args.threads)
    if args.input:
        inputs = _load_inputs(args.input)
        chunk = args.batch
    else:
        inputs = _random_inputs(sess, args.batch, args.seed)
        chunk = None
    outs = run(args.model, inputs, threads=args.threads, batch=chunk, session=sess)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        outs = run(args.model, inputs, threads=args.threads, batch=chunk, session=sess)
        times.append(time.perf_counter() - t0)
    for meta, o in zip(sess.get_outputs(), outs):
        print(f"output {meta.name}: shape {list(o.shape)} dtype {o.dtype} mean {float(np.mean(o)):.6g}")
    print(f"time: median {1e3 * float(np.median(times)):.3f} ms over {len(times)} run(s), threads={args.threads}")
    if args.save:
        np.savez(args.save, **{m.name: o for m, o in zip(sess.get_outputs(), outs)})
    if args.report:
        print(json.dumps(integer_kernel_report(args.model), indent=2))
    return 0


def main(argv=None) -> int:
    """Entry point of the quantsim-export console script; returns the process exit code."""
    from .encodings import EncodingsError
    from .qdq import QDQError

    args = build_parser().parse_args(argv)
    handlers = {"validate": _cmd_validate, "qdq": _cmd_qdq, "run": _cmd_run}
    try:
        return handlers[args.command](args)
    except (EncodingsError, QDQError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. protobuf DecodeError for a file that is not ONNX
        if type(e).__name__ != "DecodeError":
            raise
        print(f"error: not an ONNX model: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
