"""torch.distributed glue: which group to synchronise over, and rank-0-only writing.

Everything here is a no-op in a single process, so calibration, BN re-estimation and export call it
unconditionally.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


def resolve_group(process_group: Any = None):
    """The process group to combine statistics over, or None when there is nothing to combine.

    An explicit `process_group` needs an initialised default group; otherwise the default (WORLD) group is used
    when torch.distributed is initialised with more than one rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce with op in {"sum", "min", "max"}; float64 and bool-free so every backend takes it."""
    if group is None:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def rank(group=None) -> int:
    return dist.get_rank(group) if group is not None else 0


@contextlib.contextmanager
def rank_zero_writes(group):
    """Run the body on rank 0 only (yields True there, False elsewhere); every rank waits at a barrier after,
    so no rank reads a file that is still being written. An error on rank 0 is re-raised on every rank."""
    if group is None:
        yield True
        return
    failed = torch.zeros(1)
    error: BaseException | None = None
    try:
        yield rank(group) == 0
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        error = e
        failed.fill_(1)
    all_reduce(failed, "max", group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("export failed on rank 0; nothing was written")
