"""Modules standing in for functional calls (`+`, torch.cat, torch.matmul, ...) so they can hold quantizers.

Graph capture replaces each such call in the traced graph by one of these; their forward is the call itself.
"""
from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    def forward(self, x, y):
        return x + y


class Sub(nn.Module):
    def forward(self, x, y):
        return x - y


class Mul(nn.Module):
    def forward(self, x, y):
        return x * y


class Div(nn.Module):
    def forward(self, x, y):
        return x / y


class MatMul(nn.Module):
    def forward(self, x, y):
        return torch.matmul(x, y)


class Concat(nn.Module):
    """torch.cat over the positional inputs (one input quantizer per concatenated tensor)."""

    def __init__(self, dim: int = 0):
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
