"""2 processes (gloo, DistributedDataParallel) vs 1 process: calibration and one QAT step on the same global data,
as time ratios; and how far the combined encodings are from one process's over the same batches.

All candidates run interleaved inside one 2-rank launch (the 1-process baseline on rank 0 while rank 1 waits at a
barrier), so machine noise hits every candidate alike. Every process runs one torch thread, as under torchrun.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from quantsim import QuantizationSimModel
from quantsim.distributed import launch
from quantsim.models import SmallBNCNN

from .common import Table

SCHEMES = ("min_max", "tf_enhanced", "percentile", "mse")


def _timed(fn, active: bool, threads: int) -> float:
    """Wall time of fn() on the ranks where `active`, from a common start (barrier) to the last rank's end."""
    dist.barrier()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if active:
        fn()
    elapsed = torch.tensor([time.perf_counter() - t0 if active else 0.0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    torch.set_num_threads(1)
    return float(elapsed)


def _worker(model, images, labels, n_batches: int, batch: int, repeats: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = [dist.new_group([r]) for r in range(world)]  # size-1 groups: calibration that combines nothing
    mine = [images[(i * world + rank) * batch:(i * world + rank + 1) * batch] for i in range(n_batches // world)]
    every = [images[i * batch:(i + 1) * batch] for i in range(n_batches)]
    sims = {k: QuantizationSimModel(model, quant_scheme="tf_enhanced") for k in ("one", "two", "two_local")}
    fns = {
        "calib 1 process": (lambda: sims["one"].compute_encodings(every, progress=False, process_group=solo[0]),
                            rank == 0, 1),
        "calib 2 processes": (lambda: sims["two"].compute_encodings(mine, progress=False), True, 1),
        "calib 2 processes, not combined": (
            lambda: sims["two_local"].compute_encodings(mine, progress=False, process_group=solo[rank]), True, 1),
    }
    # QAT: one SGD step on a global batch of 2 * batch (one process) or batch per rank (DDP averages gradients)
    x, y = images[: world * batch], labels[: world * batch]
    qat_one = QuantizationSimModel(model, quant_scheme="min_max")
    qat_one.compute_encodings([x], progress=False, process_group=solo[rank])
    qat_two = QuantizationSimModel(model, quant_scheme="min_max")
    qat_two.compute_encodings([x[rank * batch:(rank + 1) * batch]], progress=False)
    ddp = DistributedDataParallel(qat_two.model)
    opt_one = torch.optim.SGD(qat_one.model.parameters(), lr=1e-3)
    opt_two = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    qat_one.model.train(), ddp.train()

    def step_one():
        opt_one.zero_grad()
        F.cross_entropy(qat_one.model(x), y).backward()
        opt_one.step()

    def step_two():
        opt_two.zero_grad()
        F.cross_entropy(ddp(x[rank * batch:(rank + 1) * batch]), y[rank * batch:(rank + 1) * batch]).backward()
        opt_two.step()

    fns["QAT step 1 process"] = (step_one, rank == 0, 1)
    fns["QAT step 2 processes (DDP)"] = (step_two, True, 1)
    for fn, active, threads in fns.values():  # warm-up
        _timed(fn, active, threads)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (fn, active, threads) in fns.items():
            times[k].append(_timed(fn, active, threads))
    # encodings: combined over 2 ranks vs one process over the same batches (rank 0's, then rank 1's)
    ordered = [b for r in range(world) for b in every[r::world]]  # 'mine' of rank 0, then of rank 1
    agreement = {}
    for scheme in SCHEMES:
        two, one = (QuantizationSimModel(model, quant_scheme=scheme) for _ in range(2))
        if scheme == "percentile":
            two.set_percentile_value(99.9), one.set_percentile_value(99.9)
        two.compute_encodings(mine, progress=False)
        if rank == 0:
            one.compute_encodings(ordered, progress=False, process_group=solo[0])
            diffs = [float(((a.scale - b.scale).abs() / b.scale).max())
                     for (_, a), (_, b) in zip(two.named_quantizers(), one.named_quantizers()) if not a.follows_input]
            agreement[scheme] = (sum(d == 0.0 for d in diffs), len(diffs), max(diffs))
        dist.barrier()
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "agreement": agreement}


def run(quick: bool = False) -> list[Table]:
    from quantsim.data import load_mnist5k

    n_batches, batch, repeats = (8, 64, 3) if quick else (32, 128, 7)
    x, y = load_mnist5k()[:2]
    torch.manual_seed(0)
    model = SmallBNCNN(width=8 if quick else 16).eval()
    r = launch(_worker, model, x, y, n_batches, batch, repeats, nprocs=2, threads=1)[0]
    t = r["times"]
    timing = Table(
        "2 processes vs 1: time ratio on the same global data (lower is better; 0.5 = perfect use of 2 workers)",
        ["what", "1 process (s)", "2 processes (s)", "ratio"],
        notes=[f"SmallBNCNN on MNIST-5k; calibration tf_enhanced over {n_batches} batches of {batch} in total; QAT: "
               f"one SGD step on {2 * batch} images (DDP: {batch} per rank); gloo; one torch thread per process "
               f"(torchrun's default); medians of {repeats} interleaved repeats; load average when run: "
               f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
               "'not combined': each rank calibrates its half alone; the difference to 'combined' is the cost of "
               "combining the statistics (five collectives)"],
    )
    rows = [("calibration, statistics combined", "calib 1 process", "calib 2 processes"),
            ("calibration, not combined", "calib 1 process", "calib 2 processes, not combined"),
            ("one QAT step (DDP)", "QAT step 1 process", "QAT step 2 processes (DDP)")]
    for label, one, two in rows:
        timing.add(label, t[one], t[two], t[two] / t[one])
    agree = Table(
        "2 processes vs 1: activation encodings combined over the ranks vs one process over the same batches",
        ["scheme", "identical", "max relative scale difference"],
        notes=["min_max combines exactly; histogram schemes are exact when every rank's histogram range is the "
               "common one from its first batch on, else a rank's counts are moved onto the common bins "
               "(docs/scaling.md)"],
    )
    for scheme, (same, total, worst) in r["agreement"].items():
        agree.add(scheme, f"{same}/{total}", worst)
    return [timing, agree]
