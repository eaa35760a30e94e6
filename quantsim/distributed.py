"""torch.distributed glue: which group to combine statistics over, collectives every backend takes, rank-0-only
writing, SyncBatchNorm conversion that keeps quantizers, and a local launcher (gloo processes on this machine).

Every function taking a `group` is a no-op for group None (a single process), so calibration, BN re-estimation and
export call them unconditionally. What is combined, and how exactly, is in docs/scaling.md.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["resolve_group", "world_size", "rank", "all_reduce", "gather_rows", "on_rank_zero",
           "convert_sync_batchnorm", "revert_sync_batchnorm", "launch"]


def resolve_group(process_group: Any = None):
    """The process group to combine statistics over, or None when there is nothing to combine.

    An explicit `process_group` needs an initialised default group; otherwise the default (WORLD) group is used
    when torch.distributed is initialised with more than one rank. The functions that take the resolved group
    are collective: every rank of it must call them, in the same order.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group given but torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def world_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def rank(group=None) -> int:
    """This process's rank within `group` (0 in a single process)."""
    return dist.get_rank(group) if group is not None else 0


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce with op in {"sum", "min", "max"} (use float64: exact for float32 values and counts)."""
    if op not in _OPS:
        raise ValueError(f"all_reduce: op must be one of {sorted(_OPS)}, got {op!r}")
    if group is None:
        return tensor
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return tensor


def gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """(world size, n) float64: every rank's 1-d `row` (n equal on all ranks), in rank order.

    An all-reduce sum of a zero matrix holding this rank's row in its own line: adding zeros is exact, and
    all_reduce is the one collective every backend supports for every dtype.
    """
    row = row.reshape(-1).to(torch.float64)
    if group is None:
        return row[None].clone()
    rows = torch.zeros(world_size(group), row.numel(), dtype=torch.float64, device=row.device)
    rows[rank(group)] = row
    return all_reduce(rows, "sum", group)


# ============================================================================ rank-0-only work


def _broadcast(obj: Any, group) -> Any:
    """`obj` of rank 0 on every rank of `group` (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure: fall back to the text
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_rank_zero(fn: Callable[[], Any], group) -> Any:
    """Run fn() on rank 0 of `group` only and return its result on every rank; an error there is raised on every
    rank (same type and message). The other ranks wait for rank 0 to finish: its broadcast is the barrier, so no
    rank reads a file that is still being written."""
    if group is None:
        return fn()
    if rank(group) == 0:
        try:
            result = fn()
        except BaseException as e:
            _broadcast((False, _portable(e)), group)
            raise
        _broadcast((True, result), group)
        return result
    ok, payload = _broadcast(None, group)
    if ok:
        return payload
    if hasattr(payload, "add_note"):
        payload.add_note(f"(raised on rank 0 of the process group; rank {rank(group)} did nothing)")
    raise payload


# ============================================================================ SyncBatchNorm


_SYNC_ORIGINAL = "_quantsim_bn_class"


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Turn every BatchNorm1d/2d/3d of `model` into a SyncBatchNorm in place and return `model`.

    Unlike torch.nn.SyncBatchNorm.convert_sync_batchnorm, which builds new modules, this changes each module's class
    only: a sim's quantized BN keeps its quantizers (as `Quantized<SyncBatchNorm>`), frozen-BN hooks, parameters and
    state_dict keys. torch's SyncBatchNorm synchronises only on GPU-like devices; revert_sync_batchnorm undoes this.
    """
    from .qmodule import QuantizationMixin, quantized_class

    for module in model.modules():
        if not isinstance(module, _BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            continue
        cls = type(module)
        base = cls.__bases__[-1] if QuantizationMixin in cls.__bases__ else cls
        if base not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            continue  # a user subclass with its own forward: leave it (torch's conversion would drop that forward)
        module.__dict__[_SYNC_ORIGINAL] = cls
        module.__class__ = quantized_class(nn.SyncBatchNorm) if base is not cls else nn.SyncBatchNorm
        module.process_group = process_group
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BN converted by convert_sync_batchnorm its original class back (in place); returns `model`."""
    for module in model.modules():
        cls = module.__dict__.pop(_SYNC_ORIGINAL, None)
        if cls is not None:
            module.__class__ = cls
            module.__dict__.pop("process_group", None)
    return model


# ============================================================================ local launcher


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn: Callable[..., Any], *args: Any, nprocs: int = 2, backend: str = "gloo", start_method: str = "spawn",
           threads: int | None = None) -> list:
    """Run ``fn(*args)`` in `nprocs` new processes on this machine, each with torch.distributed initialised (and
    RANK, WORLD_SIZE, MASTER_ADDR, ... set as torchrun sets them); returns the ranks' return values in rank order.
    `fn` must be importable by name (a module-level function). `threads`: torch threads per process
    (default: cores / nprocs). start_method "forkserver" imports torch (with torch._dynamo, which DDP loads) and
    quantsim once in a server process and forks every rank from it: much faster for repeated launches than
    "spawn", which imports them in every new process. For tests, examples and benchmarks; on a cluster use torchrun.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    if start_method == "forkserver":  # the server imports torch once; every process is forked from it
        torch.multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", "quantsim"])
    with tempfile.TemporaryDirectory(prefix="quantsim-launch-") as tmp:
        torch.multiprocessing.start_processes(
            _run_rank, args=(fn, args, nprocs, _free_port(), backend, threads, tmp), nprocs=nprocs, join=True,
            start_method=start_method,
        )
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(nprocs)]


def _run_rank(rank_: int, fn, args, nprocs: int, port: int, backend: str, threads: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), LOCAL_RANK=str(rank_),
                      WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    if backend == "gloo" and sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local ranks talk over loopback, whatever the hostname
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=nprocs)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(tmp, f"{rank_}.pt"))
    finally:
        dist.destroy_process_group()
