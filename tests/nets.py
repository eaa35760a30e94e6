"""Hand-made test models shared by several test files (pytest puts tests/ on sys.path)."""
import torch
import torch.nn.functional as F
from torch import nn


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (reflect padding): the sim must keep this forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.dw(y)
        return F.relu(y + x)  # functional residual add + functional relu


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Wrapper(Block(8)))
        self.padded = PaddedConv(8, 8, 3)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = torch.cat([x, self.padded(x)], dim=1)
        x = self.up(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) * 2.0
