"""Small shared helpers: running a model over batches, mode save/restore, atomic file writes."""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from export._files import temp_beside


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without state)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run a batch the common way: a tensor is the input; (input, target, ...) uses the first item;
    a dict is passed as keyword arguments."""
    batch = to_device(batch, model_device(model))
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("empty batch (an empty tuple/list) from the data loader")
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model; pass forward_fn(model, batch)"
    )


def run_batches(
    model: nn.Module,
    data: Iterable,
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    desc: str = "",
    progress: bool = True,
) -> int:
    """Feed up to `num_batches` batches of `data` (any iterable, with or without len()) through `model`.

    Returns the number of batches run; raises ValueError if `data` yields nothing.
    """
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    forward_fn = forward_fn or default_forward
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    it: Iterator = iter(data)
    if num_batches is not None:
        it = itertools.islice(it, num_batches)
    count = 0
    for batch in tqdm(it, total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        forward_fn(model, batch)
        count += 1
    if count == 0:
        raise ValueError(f"{desc or 'run_batches'}: the data loader yielded no batches")
    return count


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each module's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`.

    Nothing is left behind if writing fails; an unwritable directory raises before anything is written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
