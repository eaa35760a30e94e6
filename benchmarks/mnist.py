"""The SmallBNCNN trained on real digits that the fidelity and accuracy suites share: trained once per process.

Same recipe as tests/test_sim_export.py (seed 0, SGD lr 0.1, batch 64), so the numbers here and there agree.
"""
from __future__ import annotations

import copy
import time
from functools import lru_cache

import torch

from quantsim.data import load_fashion_mnist, load_mnist5k, make_loader, train_classifier
from quantsim.models import SmallBNCNN

DATASETS = {"MNIST-5k": load_mnist5k, "Fashion-MNIST": load_fashion_mnist}


@lru_cache(maxsize=None)
def dataset(name: str):
    """(x_train, y_train, x_test, y_test) of a dataset in DATASETS, loaded once."""
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


@lru_cache(maxsize=None)
def _trained(name: str, epochs: int, seed: int) -> tuple[dict, float]:
    x_tr, y_tr, _, _ = dataset(name)
    torch.manual_seed(seed)
    model = SmallBNCNN()
    t0 = time.perf_counter()
    train_classifier(model, make_loader(x_tr, y_tr, batch_size=64, shuffle=True, seed=seed), epochs=epochs, lr=0.1)
    return copy.deepcopy(model.state_dict()), time.perf_counter() - t0


def trained_smallbncnn(name: str = "MNIST-5k", epochs: int = 1, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """(a fresh SmallBNCNN in eval mode with the trained weights, seconds the one training run took)."""
    state, seconds = _trained(name, int(epochs), int(seed))
    model = SmallBNCNN()
    model.load_state_dict(state)
    return model.eval(), seconds
